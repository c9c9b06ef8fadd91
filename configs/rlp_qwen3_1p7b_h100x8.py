"""Paper-scale RLP for Qwen3-1.7B-Base on one host with 8 NVIDIA H100 80GB (the paper's recipe,
configs/rlp_paper.py, on 8 of its 32 GPUs: each step takes 4× longer than on 32).

Launch:   launch/gpu_host.sh --config configs/rlp_qwen3_1p7b_h100x8.py --workdir RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
Mesh (1, 8, 1) over ('data', 'fsdp', 'tensor'): pure FSDP. Parameters, EMA and AdamW moments are
  sharded 8 ways over NVLink; every batch dimension (prompts, thoughts) is split 8 ways.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES — batch → ('data', 'fsdp'); embed → fsdp;
  heads, kv_heads, mlp, vocab → tensor (size 1 here); layers, length, head_dim, norm replicated.
Micro-batching: rollouts in 8 chunks of 64 prompts (1024 thoughts, 128 per GPU: each prompt's
  2049 cache slots once, each thought's 2050, ~17 GiB per GPU); one update per step accumulated
  over 32 micro-batches of 16 prompts (256 thoughts, 32 per GPU; the LM head over 256 thought
  positions at a time keeps their 2048 × 151936 thought logits from dominating the update's
  memory, and fused attention keeps no S×S scores).
Remat and dtypes: remat 'full' (one layer's activations at a time in the backward pass); bf16
  compute, float32 parameters, AdamW moments, gradients and EMA.
Memory and FLOPs: `rlp-jax plan --config configs/rlp_qwen3_1p7b_h100x8.py` (docs/launch.md).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:1x8"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.mesh.shape = (1, 8, 1)
    c.rlp.rollout_microbatches = 8
    c.rlp.grad_accum_steps = 32
    return c
