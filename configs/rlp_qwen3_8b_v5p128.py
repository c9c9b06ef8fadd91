"""The paper's RLP recipe (configs/rlp_paper.py) for Qwen3-8B-Base on a TPU v5p-128 slice.

Hardware: v5p-128 counts TensorCores: 64 chips (one JAX device each, 95 GiB HBM) on 16 hosts of 4.
Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_qwen3_8b_v5p128.py \
              --workdir /mnt/shared/RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Mesh (1, 16, 4) over ('data', 'fsdp', 'tensor'): FSDP over 16 and tensor parallelism over 4 chips.
  The tensor axis splits the 32 query / 8 key-value heads, the MLP (12288) and the vocabulary
  (151936) 4 ways, which divides the attention scores and the thought logits — the two largest
  activations — by 4 for the same thoughts per chip.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (16 ways); embed →
  fsdp; heads, kv_heads, mlp, vocab → tensor (4 ways); layers, length, head_dim, norm replicated.
Micro-batching: rollouts in 2 chunks of 256 prompts (256 thoughts per chip, the cache split by
  kv heads, each prompt's part once); one update per step accumulated over 16 micro-batches of
  32 prompts (32 thoughts per chip). Sized by `rlp-jax compile`: all 512 prompts at once needed
  110.2 GiB per chip of 85.5 usable; 2 chunks need 63.8 GiB (docs/launch.md; 63.7 since the decode
  loop stopped copying its cache blocks on XLA:TPU: the update sets this step's peak).
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_8b_v5p128.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "tpu-v5p"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v5p:4x4x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.model.preset = "qwen3-8b"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.mesh.shape = (1, 16, 4)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 16
    return c
