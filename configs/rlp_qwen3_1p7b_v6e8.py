"""RLP for Qwen3-1.7B-Base on a TPU v6e-8 host (Trillium): the paper's recipe
(configs/rlp_paper.py), 512 prompts per step for 200 steps.

Hardware: 8 v6e chips (32 GiB HBM each) on one host.
Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_qwen3_1p7b_v6e8.py \
              --workdir RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Mesh (1, 8, 1) over ('data', 'fsdp', 'tensor'): pure FSDP over the host's 2x4 ICI.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (8 ways); embed →
  fsdp; heads, kv_heads, mlp, vocab → tensor (size 1 here); the rest replicated.
Micro-batching: rollouts and the EMA no-think baseline in 64 chunks of 8 prompts (128 thoughts,
  16 per chip; with 32 chunks the compiled step needed 29.5 GiB per chip of 28.8 usable, with 64
  it needed 19.2, and 18.8 since the decode loop stopped copying its cache blocks: docs/launch.md); one update per step accumulated over 128 micro-batches of four prompts (64
  thoughts, 8 per chip).
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_v6e8.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "tpu-v6e"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v6e:2x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (1, 8, 1)
    c.rlp.rollout_microbatches = 64
    c.rlp.grad_accum_steps = 128
    return c
