"""RLP for Qwen3-1.7B-Base on a TPU v5e-16 slice (v5litepod-16): the paper's recipe
(configs/rlp_paper.py), 512 prompts per step for 200 steps.

Hardware: 16 v5e chips (16 GiB HBM each) on 4 hosts of 4.
Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_qwen3_1p7b_v5e16.py \
              --workdir /mnt/shared/RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Mesh (1, 16, 1) over ('data', 'fsdp', 'tensor'): pure FSDP; the float32 state is 1.6 GiB per chip.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (16 ways); embed →
  fsdp; heads, kv_heads, mlp, vocab → tensor (size 1 here); the rest replicated.
Micro-batching: rollouts and the EMA no-think baseline in 64 chunks of 8 prompts (128 thoughts,
  8 per chip); one update per step accumulated over 128 micro-batches of four prompts' 64
  thoughts (four per chip). Sized by `rlp-jax compile`: with 32 rollout chunks the step needed
  16.9 GiB per chip of 14.4 usable; with 64 it needs 13.95 GiB (docs/launch.md). The price: a
  chunk's 8 prompts do not divide over 16 chips, so every chip prefills all 8 and computes their
  no-think baseline (`rlp-jax plan` warns), 16 times the prefill work of an even split.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_v5e16.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "tpu-v5e"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v5e:4x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (1, 16, 1)
    c.rlp.rollout_microbatches = 64
    c.rlp.grad_accum_steps = 128
    return c
