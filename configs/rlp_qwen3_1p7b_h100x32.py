"""Paper-scale RLP for Qwen3-1.7B-Base on a SLURM cluster of 4 hosts × 8 NVIDIA H100 80GB — the
paper's own hardware (32 H100s) and recipe (configs/rlp_paper.py).

Launch:   sbatch --nodes=4 launch/slurm_gpu.sbatch configs/rlp_qwen3_1p7b_h100x32.py RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
Mesh (4, 8, 1) over ('data', 'fsdp', 'tensor'): hybrid sharded data parallelism. fsdp (8) spans
  the GPUs of one host, so parameter all-gathers and gradient reduce-scatters stay on NVLink;
  data (4) spans the hosts, which only all-reduce the gradient shards over InfiniBand. make_mesh
  orders devices by process, so the last axes are the ones inside a host.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (32 ways); embed →
  fsdp (8 ways); heads, kv_heads, mlp, vocab → tensor (size 1 here); the rest replicated.
Micro-batching: rollouts in 2 chunks of 256 prompts (4096 thoughts, 128 per GPU; each prompt's
  cache once); one update per step accumulated over 8 micro-batches of 64 prompts (1024 thoughts,
  32 per GPU; fused attention keeps no S×S scores).
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_h100x32.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:4x8"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (4, 8, 1)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 8
    return c
