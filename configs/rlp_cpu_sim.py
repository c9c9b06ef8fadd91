"""A rehearsal of a multi-host RLP run on CPU: 8 simulated devices, as 1 process × 8 or as
2 processes × 4 joined by jax.distributed (`launch/local_cpu.sh`), with every knob of the paper
configs exercised at toy size: the demo's RLP stage (configs/demo.py) on a 107K-parameter `tiny`
Qwen3-shaped model.

Launch:   launch/local_cpu.sh -n 2 -d 4 -- --config configs/rlp_cpu_sim.py --workdir runs/cpu_sim
          XLA_FLAGS=--xla_force_host_platform_device_count=8 rlp-jax train \
              --config configs/rlp_cpu_sim.py --workdir runs/cpu_sim      (one process)
Mesh (2, 2, 2) over ('data', 'fsdp', 'tensor'): every axis used, so data parallelism, FSDP and
  tensor parallelism all run (on 2 processes the data axis spans them).
Logical-axis rules: `mesh.rules`, here rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp')
  (4 ways); embed → fsdp; heads, kv_heads, mlp, vocab → tensor (2 ways); the rest replicated.
Micro-batching: 16 prompts × 4 thoughts of ≤ 8 tokens; rollouts in 2 chunks of 8 prompts; one
  update per step accumulated over 4 micro-batches of 4 prompts.
Remat and dtypes: remat 'full'; float32 everywhere (CPUs have no fast bf16).
Memory and FLOPs: `rlp-jax plan --config configs/rlp_cpu_sim.py` (docs/launch.md).
"""

from rlp_jax.configs import demo

PLATFORM = "cpu"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)


def get_config():
    c = demo.get_config()
    c.model.preset = "tiny"
    c.model.remat = "full"
    c.data.max_context = 16
    c.data.shuffle_window = 64
    c.train.steps = 20
    c.train.batch_size = 16
    c.train.learning_rate = 1e-3
    c.train.weight_decay = 0.1
    c.train.log_every = 1
    c.rlp.num_rollouts = 4
    c.rlp.max_thought_len = 8
    c.rlp.temperature = 0.7
    c.rlp.ema_decay = 0.999
    c.rlp.mask_markers_in_scoring = False
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 4
    c.checkpoint.every_steps = 10
    c.eval.every_steps = 0
    c.eval.num_positions = 64  # held-out evaluation at the start and the end, on every process
    c.eval.batch_size = 16
    c.mesh.shape = (2, 2, 2)
    return c
