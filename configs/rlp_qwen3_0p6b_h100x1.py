"""RLP for Qwen3-0.6B-Base on ONE NVIDIA H100 80GB: a smoke test and benchmark of the single-device
path, not the paper's scale (16 prompts × 8 thoughts of ≤ 1024 tokens per step).

Launch:   launch/gpu_host.sh --gpus 1 --config configs/rlp_qwen3_0p6b_h100x1.py --workdir RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
          (or --config.init.kind=scratch with a tokenizer, for random weights of the same shapes)
Why smaller: the update's smallest micro-batch is one prompt's G thoughts, and their logits over
  the 151936-token vocabulary take 14 bytes × L × V per thought (~4 GiB at L = 2048): 16 thoughts
  of 2048 tokens need ~70 GiB on one device. 8 thoughts of 1024 tokens need ~17 GiB.
Mesh (1, 1, 1); logical-axis rules rlp_jax.sharding.DEFAULT_RULES (everything on one device).
Micro-batching: rollouts in 2 chunks of 8 prompts (64 thoughts); the update accumulated over 16
  micro-batches of one prompt.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_0p6b_h100x1.py` (docs/launch.md).
"""

import runpy
from pathlib import Path

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)


def get_config():
    c = runpy.run_path(str(Path(__file__).with_name("rlp_paper.py")))["get_config"]()
    c.model.preset = "qwen3-0.6b"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.train.batch_size = 16
    c.rlp.num_rollouts = 8
    c.rlp.max_thought_len = 1024
    c.mesh.shape = (1, 1, 1)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 16
    return c
