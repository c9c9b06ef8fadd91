"""Paper-scale RLP for Qwen3-1.7B-Base on a TPU v5p-128 slice (the paper's recipe,
configs/rlp_paper.py).

Hardware: v5p-128 counts TensorCores: 64 chips (one JAX device each, 95 GiB HBM) on 16 hosts of 4.
Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_qwen3_1p7b_v5p128.py \
              --workdir /mnt/shared/RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Mesh (1, 64, 1) over ('data', 'fsdp', 'tensor'): pure FSDP over the 4x4x4 ICI torus (every axis is
  ICI inside one slice, so a flat fsdp axis costs no slow links).
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (64 ways); embed →
  fsdp; heads, kv_heads, mlp, vocab → tensor (size 1 here); the rest replicated.
Micro-batching: rollouts in 2 chunks of 256 prompts (4096 thoughts, 64 per chip; each prompt's
  cache once); one update per step accumulated over 4 micro-batches of 128 prompts (2048
  thoughts, 32 per chip). Sized by `rlp-jax compile`: all 512 prompts at once needed 90.4 GiB
  per chip of 85.5 usable; 2 chunks needed 48.3 GiB, and 44.3 since the decode loop stopped
  copying its cache blocks on XLA:TPU (docs/launch.md).
Remat and dtypes: remat 'full'; bf16 compute (the MXU's native type), float32 parameters, AdamW
  moments, gradients and EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_v5p128.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "tpu-v5p"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v5p:4x4x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (1, 64, 1)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 4
    return c
