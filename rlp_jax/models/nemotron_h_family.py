"""The Nemotron-H hybrid (rlp_jax.models.nemotron_h) as a `ModelFamily`: its config and presets,
HF folders (nemotron_h_hf.py), sampler on its rollout cache (nemotron_h_sampling.py over
nemotron_h_decode.py) and model FLOPs and bytes (docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_decode, nemotron_h_hf, nemotron_h_sampling
from rlp_jax.models.family import Costs, ModelFamily, Sampler

JSON_TAG = "nemotron_h"  # the `family` a model_config.json of this family records (as its HF model_type)


def config_from_fields(fields: dict[str, Any]) -> nh.NemotronHConfig:
    """The NemotronHConfig of a model_config.json's fields (JSON has no tuples, no `family` field)."""
    fields = {k: v for k, v in fields.items() if k != "family"}
    fields["time_step_limit"] = tuple(fields["time_step_limit"])
    return nh.NemotronHConfig(**fields)


# ---------------------------------------------------------------- model FLOPs and bytes

def matmul_params(c: nh.NemotronHConfig) -> int:
    """Each Mamba layer's in_proj and out_proj, each attention layer's q, k, v, o, each MLP
    layer's up and down."""
    D, di, G, N, Hm = c.hidden_size, c.mamba_inner, c.n_groups, c.ssm_state_size, c.mamba_num_heads
    mamba = D * (2 * di + 2 * G * N + Hm) + di * D
    attention = D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 2 * D * c.intermediate_size
    return c.count("mamba") * mamba + c.count("attention") * attention + c.count("mlp") * mlp


def mamba_flops_per_token(c: nh.NemotronHConfig) -> float:
    """All Mamba layers' sequence mixing for one token, as the recurrence does it: the depthwise
    causal conv (2·conv_dim·K) and the SSM (the input outer product Δx⊗B into the state and the
    readout C·h: 2·Hm·P·N each). The chunked SSD of the training forward does more arithmetic than
    this (its intra-chunk quadratic form); model FLOPs count the recurrence's."""
    conv_dim = c.mamba_inner + 2 * c.n_groups * c.ssm_state_size
    ssm = 4.0 * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
    return c.count("mamba") * (2.0 * conv_dim * c.conv_kernel + ssm)


def forward_flops(c: nh.NemotronHConfig, rows: int, seq_len: int, scored: int) -> float:
    """2·N_mm per token, each Mamba layer's conv and SSM per token, causal attention only in the
    `*` layers, and 2·D·V per scored position."""
    body = 2.0 * matmul_params(c) * rows * seq_len
    attention = 4.0 * c.count("attention") * c.num_heads * c.head_dim * rows * seq_len * (seq_len + 1) / 2
    head = 2.0 * c.hidden_size * c.vocab_size * rows * scored
    return body + mamba_flops_per_token(c) * rows * seq_len + attention + head


def decode_flops_per_token(c: nh.NemotronHConfig, context: float) -> float:
    return (2.0 * matmul_params(c) + mamba_flops_per_token(c)
            + 4.0 * c.count("attention") * c.num_heads * c.head_dim * context
            + 2.0 * c.hidden_size * c.vocab_size)


def decode_step_bytes(c: nh.NemotronHConfig, *, prompts: int, prompt_tokens: float, rows: int,
                      suffix_tokens: float) -> dict[str, float]:
    """Every weight but the embedding table (of which a step reads one row per token), each row's
    Mamba conv history ((K−1)·conv_dim per Mamba layer, compute dtype) and SSM state (Hm·P·N per
    Mamba layer, `mamba_ssm_cache_dtype`), and the keys and values of the attention layers: each
    prompt's once (shared by its rows) and each row's own suffix."""
    itemsize = jnp.dtype(c.dtype).itemsize
    conv_dim = c.mamba_inner + 2 * c.n_groups * c.ssm_state_size
    conv = c.count("mamba") * (c.conv_kernel - 1) * conv_dim * itemsize
    ssm = (c.count("mamba") * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
           * jnp.dtype(c.mamba_ssm_cache_dtype).itemsize)
    kv_per_token = 2 * c.count("attention") * c.num_kv_heads * c.head_dim * itemsize
    return {"weights": float((c.num_params() - c.vocab_size * c.hidden_size) * itemsize),
            "recurrent_state": float(rows * (conv + ssm)),
            "kv": float(kv_per_token * (prompts * prompt_tokens + rows * suffix_tokens))}


FAMILY = ModelFamily(
    name="nemotron_h",
    title="Nemotron-H hybrid",
    config_type=nh.NemotronHConfig,
    model_class=nh.NemotronH,
    presets=nh.PRESETS,
    preset=nh.preset,
    hf_model_types=("nemotron_h",),
    config_from_hf=nemotron_h_hf.config_from_hf,
    load_hf=nemotron_h_hf.load_hf,
    save_hf=nemotron_h_hf.save_hf,
    json_tag=lambda c: JSON_TAG,
    json_tags=(JSON_TAG,),
    config_from_fields=config_from_fields,
    sampler=Sampler(weights=nemotron_h_sampling.weights_of, prefill=nemotron_h_sampling.prefill,
                    decode_loop=nemotron_h_sampling.decode_loop, feed=nemotron_h_sampling.feed,
                    logits=nemotron_h_decode.logits, rewrites_slots=False),
    costs=Costs(matmul_params=matmul_params, forward_flops=forward_flops,
                decode_flops_per_token=decode_flops_per_token, decode_step_bytes=decode_step_bytes),
    test_preset="nemotron-h-tiny",
    hybrid=True,
)
