"""The Qwen3 / Llama-3 decoder (rlp_jax.models.transformer) as a `ModelFamily`: its config and
presets (config.py), HF folders (hf.py), sampler on the rollout cache (transformer_sampling.py)
and model FLOPs and bytes (docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from rlp_jax.models import decode, hf, transformer_sampling
from rlp_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from rlp_jax.models.family import Costs, ModelFamily, Sampler
from rlp_jax.models.transformer import Transformer


def config_from_fields(fields: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a model_config.json's fields (its `family` is the config's own field)."""
    if fields.get("rope_scaling") is not None:
        fields = fields | {"rope_scaling": RopeScaling(**fields["rope_scaling"])}
    return ModelConfig(**fields)


# ---------------------------------------------------------------- model FLOPs and bytes

def matmul_params(c: ModelConfig) -> int:
    """q, k, v, o, gate, up, down of every layer."""
    d, f, h, k, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return c.num_layers * (d * hd * (2 * h + 2 * k) + 3 * d * f)


def forward_flops(c: ModelConfig, rows: int, seq_len: int, scored: int) -> float:
    """2·N_mm per token, causal attention in every layer (QKᵀ and PV over the S(S+1)/2 key
    positions a query may see), and 2·D·V per scored position."""
    body = 2.0 * matmul_params(c) * rows * seq_len
    attention = 4.0 * c.num_layers * c.num_heads * c.head_dim * rows * seq_len * (seq_len + 1) / 2
    head = 2.0 * c.hidden_size * c.vocab_size * rows * scored
    return body + attention + head


def decode_flops_per_token(c: ModelConfig, context: float) -> float:
    return (2.0 * matmul_params(c) + 4.0 * c.num_layers * c.num_heads * c.head_dim * context
            + 2.0 * c.hidden_size * c.vocab_size)


def decode_step_bytes(c: ModelConfig, *, prompts: int, prompt_tokens: float, rows: int,
                      suffix_tokens: float) -> dict[str, float]:
    """The body matmul weights and the LM head once, each prompt's keys and values once (shared
    by its rows) and each row's own suffix, in the compute dtype."""
    itemsize = jnp.dtype(c.dtype).itemsize
    weights = (matmul_params(c) + c.hidden_size * c.vocab_size) * itemsize
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize
    return {"weights": float(weights), "kv": float(kv_per_token * (prompts * prompt_tokens + rows * suffix_tokens))}


FAMILY = ModelFamily(
    name="transformer",
    title="Qwen3 / Llama-3 decoder",
    config_type=ModelConfig,
    model_class=Transformer,
    presets=PRESETS,
    preset=preset,
    hf_model_types=("qwen3", "llama"),
    config_from_hf=hf.config_from_hf,
    load_hf=hf.load_hf,
    save_hf=hf.save_hf,
    json_tag=lambda c: c.family,  # `qwen3` or `llama`: the config's own first field
    json_tags=("qwen3", "llama"),
    config_from_fields=config_from_fields,
    sampler=Sampler(weights=transformer_sampling.weights_of, prefill=transformer_sampling.prefill,
                    decode_loop=transformer_sampling.decode_loop, feed=transformer_sampling.feed,
                    logits=decode.logits, rewrites_slots=True),
    costs=Costs(matmul_params=matmul_params, forward_flops=forward_flops,
                decode_flops_per_token=decode_flops_per_token, decode_step_bytes=decode_step_bytes),
    test_preset="tiny",
)
