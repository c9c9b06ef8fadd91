"""The paper's RLP recipe for Qwen3-1.7B-Base, independent of the hardware.

Hatamizadeh et al. (arXiv 2510.01265): 512 prompts per step, G = 16 thoughts of at most 2048
tokens at temperature 0.7, contexts of up to 2048 tokens, one target token, constant learning rate
1e-6, clip range 0.2, EMA τ = 0.999, no KL (β = 0). One optimizer update per rollout batch, so the
importance ratio is exactly 1 (the paper's GRPO stack does the same).

The `rlp_qwen3_*_<platform>.py` files start from this and set the mesh, micro-batching, remat and
dtypes for their hardware; `rlp-jax plan --config FILE` prints what each needs per device. This file
alone uses every device on the fsdp axis with the memory knobs of one 8×H100 host.

Dtypes: parameters, AdamW moments and gradients stay float32 — an update of lr 1e-6 vanishes in
bfloat16 parameters (its spacing near 0.02 is ~1e-4) — while matmuls and activations run in
bfloat16 (`model.dtype`); log-probs, losses and the EMA are float32 regardless.

Before a run, point three keys at files on every host:
  --config.init.path=/data/Qwen3-1.7B-Base    (HF folder: config.json + safetensors)
  --config.tokenizer=/data/Qwen3-1.7B-Base    (its tokenizer.json, or the folder holding it)
  --config.data.corpus=/data/corpus/*.jsonl   (or a corpus directory built before)
`model.preset` names the same shapes, so `rlp-jax plan` works without the weights.
"""

from rlp_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "qwen3-1.7b"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.init.kind = "hf"
    c.init.path = ""  # set on the command line
    c.tokenizer = ""  # set on the command line
    c.data.corpus = ""  # set on the command line
    c.data.max_context = 2048
    c.data.target_len = 1
    c.data.strategy = "uniform"
    c.data.positions_per_document = 4

    c.train.steps = 200
    c.train.batch_size = 512
    c.train.learning_rate = 1e-6
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.rlp.objective = "rlp"
    c.rlp.num_rollouts = 16
    c.rlp.max_thought_len = 2048
    c.rlp.min_thought_len = 1
    c.rlp.temperature = 0.7
    c.rlp.eps_low = 0.2
    c.rlp.eps_high = 0.2
    c.rlp.kl_coef = 0.0
    c.rlp.ema_decay = 0.999
    c.rlp.ppo_epochs = 1
    c.rlp.num_minibatches = 1
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 3
    # Held-out evaluation (multi-process too) samples thoughts for every position; off by default
    # at this scale: set eval.num_positions to turn it on, or run `rlp-jax eval` on the result.
    c.eval.num_positions = 0

    c.mesh.shape = (1, -1, 1)  # ('data', 'fsdp', 'tensor'): every device on fsdp
    c.rlp.rollout_microbatches = 8
    c.rlp.grad_accum_steps = 32
    # Thoughts end when the policy says so: each update micro-batch runs at the shortest of 4
    # widths that holds its rows (rows sorted by length first; the same update, docs/train_step.md).
    c.rlp.update_length_buckets = 4
    # The update's LM head + softmax over 256 thought positions at a time: a thought's full
    # [2048, 151936] logits would take ~4 GiB of the update's memory (docs/train_step.md).
    c.rlp.head_chunk_len = 256
    return c
