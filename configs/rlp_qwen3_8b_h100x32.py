"""The paper's RLP recipe (configs/rlp_paper.py) for Qwen3-8B-Base on a SLURM cluster of 4 hosts ×
8 NVIDIA H100 80GB.

Launch:   sbatch --nodes=4 launch/slurm_gpu.sbatch configs/rlp_qwen3_8b_h100x32.py RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
Mesh (4, 8, 1) over ('data', 'fsdp', 'tensor'): hybrid sharded data parallelism as for 1.7B —
  fsdp (8) inside a host over NVLink, data (4) across hosts. The float32 state (parameters, EMA,
  two AdamW moments: 16 bytes per parameter, 8.2B parameters) is 16 GiB per GPU.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (32 ways); embed →
  fsdp (8 ways); heads, kv_heads, mlp, vocab → tensor (size 1 here); the rest replicated.
Micro-batching: rollouts in 4 chunks of 128 prompts (64 thoughts per GPU; the 36-layer cache is
  ~0.3 GiB per thought, each prompt's part once); one update per step accumulated over 32
  micro-batches of 16 prompts (8 thoughts per GPU).
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_8b_h100x32.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:4x8"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.model.preset = "qwen3-8b"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.mesh.shape = (4, 8, 1)
    c.rlp.rollout_microbatches = 4
    c.rlp.grad_accum_steps = 32
    return c
