"""RLP for Qwen3-0.6B-Base on ONE NVIDIA H100 80GB: a smoke test and benchmark of the single-device
path with the paper's thoughts (16 per prompt, ≤ 2048 tokens) but 16 prompts per step, not 512.

Launch:   launch/gpu_host.sh --gpus 1 --config configs/rlp_qwen3_0p6b_h100x1.py --workdir RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
          (or --config.init.kind=scratch with a tokenizer, for random weights of the same shapes)
What makes it fit: the update's LM head runs over 256 thought positions at a time
  (rlp.head_chunk_len, from rlp_paper.py); whole, one prompt's 16 thoughts of 2048 tokens would
  need ~70 GiB of logits on one device.
Mesh (1, 1, 1); logical-axis rules rlp_jax.sharding.DEFAULT_RULES (everything on one device).
Micro-batching: rollouts and S_ema in 2 chunks of 8 prompts (128 thoughts; each prompt's cache
  once, not 16 times); the update accumulated over 8 micro-batches of two prompts' 32 thoughts.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_0p6b_h100x1.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:1x1"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.model.preset = "qwen3-0.6b"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.train.batch_size = 16
    c.rlp.num_rollouts = 16
    c.rlp.max_thought_len = 2048
    c.mesh.shape = (1, 1, 1)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 8
    return c
