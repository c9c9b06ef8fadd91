"""RLP for Qwen3-1.7B-Base on a TPU v5e-16 slice (v5litepod-16): the paper's recipe
(configs/rlp_paper.py), 512 prompts per step for 200 steps.

Hardware: 16 v5e chips (16 GiB HBM each) on 4 hosts of 4.
Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_qwen3_1p7b_v5e16.py \
              --workdir /mnt/shared/RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Mesh (1, 8, 2) over ('data', 'fsdp', 'tensor'): FSDP over 8 chips and tensor parallelism over
  2; the float32 state is 1.6 GiB per chip.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp') (8 ways); embed →
  fsdp; heads, kv_heads, mlp, vocab → tensor (2 ways); the rest replicated.
Micro-batching: rollouts and the EMA no-think baseline in 64 chunks of 8 prompts (128 thoughts,
  16 per chip pair); one update per step accumulated over 256 micro-batches of two prompts' 32
  thoughts (four per chip pair).
Sized by `rlp-jax compile` (docs/launch.md): as mesh (1, 16, 1) with 32 rollout chunks the step
  needed 16.9 GiB per chip of 14.4 usable. With 64 chunks it needed 13.95, but a chunk's 8
  prompts then do not divide over 16 batch devices (every chip prefills all 8). This layout
  divides them over 8 and needed 10.3 GiB; since the decode loop stopped copying its cache
  blocks on XLA:TPU, 9.2 GiB.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_v5e16.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "tpu-v5e"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v5e:4x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (1, 8, 2)
    c.rlp.rollout_microbatches = 64
    c.rlp.grad_accum_steps = 256
    return c
