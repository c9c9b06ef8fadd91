"""Incremental decoding of the Nemotron-H hybrid (rlp_jax.models.nemotron_h) on the rollout-cache
design of rlp_jax.models.decode.

The cache of B prompts × G rows (`HybridCache`):
- the attention layers' keys and values, as the Transformer keeps them (`decode.RolloutCache`, one
  entry per ATTENTION layer): each prompt's once (its PREFIX, shared by its G rows), and each row's
  own tokens in SUFFIX blocks of `block_len` slots; a query reads its prompt's prefix and the
  blocks up to its own (`decode.cached_attention`), never the unfilled rest;
- the Mamba layers' recurrent state, per Mamba layer and row: the conv history (the last K−1
  inputs of x, B and C, compute dtype) and the SSM state `[Hm, P, N]` (`mamba_ssm_cache_dtype`).
  A row's state is what it continues from; a recurrent state cannot take a token back, so it is
  advanced only for the rows a caller names (`extend(..., advance_N=...)`).

The layers run unrolled over per-layer weights sliced out of the stacks and cast to the compute
dtype once per rollout (`decode_weights`), each block type's layer function traced once: inside a
decode loop no weight or state array is sliced out of a stack or copied (tests/test_decode.py
checks the compiled loops of both families). `extend` feeds T tokens per row in ONE pass over the
layers (RLP's `[</think>, x_t, …]`): the attention layers take them as one block of queries, each
Mamba layer runs its recurrence over them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd

from rlp_jax.models import decode, mamba2
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import transformer as tfm
from rlp_jax.models.decode import RolloutCache
from rlp_jax.sharding import constrain

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("layers", "embed_VxD", "head_DxV", "final_norm_D"), meta_fields=("config",))
@dataclasses.dataclass(frozen=True)
class HybridDecodeWeights:
    """The hybrid's weights for decoding: per layer (its type is `config.block_types[z]`), matrices
    in the compute dtype (the Mamba `A_log`, `D`, `dt_bias` in float32, as the model keeps them)."""

    config: nh.NemotronHConfig
    layers: tuple[dict[str, Array], ...]
    embed_VxD: Array
    head_DxV: Array
    final_norm_D: Array


def decode_weights(w: nh.Weights) -> HybridDecodeWeights:
    """Every layer's weights sliced out of its type's stack and cast, once per rollout (call it
    outside any loop). Under a mesh they are not split over `embed` (the FSDP axis): a sharded model
    gathers each weight once here rather than at every decode step; tensor-parallel axes stay split."""
    c = w.config
    dtype = jnp.dtype(c.dtype)
    cast = lambda name, a: a if name in nh.FLOAT32_WEIGHTS else a.astype(dtype)
    unsplit = lambda axes: tuple(None if a == "embed" else a for a in axes[1:])
    seen = dict.fromkeys(nh.BLOCK_TYPES, 0)
    layers = []
    for block_type in c.block_types:
        i = seen[block_type]
        seen[block_type] += 1
        layers.append({name: constrain(cast(name, stack[i]), unsplit(nh.AXES[block_type][name]))
                       for name, stack in w.blocks[block_type].items()})
    head = constrain(w.head_DxV.astype(dtype), (None, "vocab"))
    return HybridDecodeWeights(c, tuple(layers), w.embed_VxD, head, w.final_norm_D.astype(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
    """Keys and values of the attention layers (prefix once per prompt, suffix blocks per row) and
    the Mamba layers' recurrent state per row."""

    kv: RolloutCache  # per ATTENTION layer (empty tuples when the pattern has none)
    conv: tuple[dict[str, Array], ...]  # per Mamba layer: 'x' [N, K−1, Hm, P], 'B' and 'C' [N, K−1, G, N]
    ssm: tuple[Array, ...]  # per Mamba layer: [N, Hm, P, N]


def empty_blocks(c: nh.NemotronHConfig, num_rows: int, block_len: int) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """One suffix block of every attention layer, zeros."""
    return decode.empty_layer_blocks(c.count("attention"), num_rows, c.num_kv_heads, c.head_dim, block_len, c.dtype)


def _context():
    """Part of each layer function's jit cache key: the rules and mesh decide its sharding constraints."""
    return flax_spmd.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()


def _constrain_mamba_state(conv: dict[str, Array], ssm: Array) -> tuple[dict[str, Array], Array]:
    return ({k: constrain(v, mamba2.CONV_STATE_AXES[k]) for k, v in conv.items()},
            constrain(ssm, mamba2.SSM_STATE_AXES))


def _norm(x: Array, w: dict[str, Array], c: nh.NemotronHConfig) -> Array:
    return nh.block_norm(x, w["norm"], c.layer_norm_epsilon)


# ---------------------------------------------------------------- prefill

def prefill(weights: HybridDecodeWeights, tokens_BxP: Array, lengths_B: Array):
    """The prompts' causal forward (right-padded, row b's tokens its first `lengths_B[b]`): the
    final-norm hidden states `[B, P, D]`, each attention layer's keys `[B, J, H, P]` and values
    `[B, J, P, H]` (slots past a prompt's length hold pad tokens' keys; `lengths_B` masks them
    later), and each Mamba layer's conv history and SSM state after each prompt's own tokens."""
    c = weights.config
    P = tokens_BxP.shape[1]
    lengths_B = lengths_B.astype(jnp.int32)
    valid_BxP = jnp.arange(P)[None, :] < lengths_B[:, None]
    x = tfm.embed_tokens(weights.embed_VxD, tokens_BxP, c.dtype)
    prefix_k, prefix_v, conv, ssm = [], [], [], []
    for block_type, w in zip(c.block_types, weights.layers):
        if block_type == "mamba":
            x, history, final = _prefill_mamba(w, x, valid_BxP, lengths_B, config=c, context=_context())
            conv.append(history)
            ssm.append(final)
        elif block_type == "attention":
            x, k, v = _prefill_attention(w, x, config=c, context=_context())
            prefix_k.append(k)
            prefix_v.append(v)
        else:
            x = _mlp(w, x, config=c, context=_context())
    hidden = nh.block_norm(x, weights.final_norm_D, c.layer_norm_epsilon)
    return hidden, tuple(prefix_k), tuple(prefix_v), tuple(conv), tuple(ssm)


@functools.partial(jax.jit, static_argnames=("config", "context"))
def _prefill_mamba(w, x_BxPxD, valid_BxP, lengths_B, *, config, context):
    del context
    out, (history, final) = mamba2.mamba_mixer(_norm(x_BxPxD, w, config), w, config, valid_BxP, lengths_B)
    history, final = _constrain_mamba_state(history, final.astype(config.mamba_ssm_cache_dtype))
    return x_BxPxD + out, history, final


@functools.partial(jax.jit, static_argnames=("config", "context"))
def _prefill_attention(w, x_BxPxD, *, config, context):
    del context
    q, k, v = nh.attention_qkv(_norm(x_BxPxD, w, config), w)
    # Right padding needs no key mask: no real query sees a key after it (so a fused kernel runs).
    attn = tfm.self_attention(q, k, v, None, config.attention, config.platform)
    return (x_BxPxD + nh.attention_out(attn, w, jnp.dtype(config.dtype)), *decode.cache_layout(k, v))


@functools.partial(jax.jit, static_argnames=("config", "context"))
def _mlp(w, x_BxTxD, *, config, context):
    del context
    return x_BxTxD + nh.relu2_mlp(_norm(x_BxTxD, w, config), w)


# ---------------------------------------------------------------- decode / extend

def extend(weights: HybridDecodeWeights, cache: HybridCache, tokens_NxT: Array, slots_NxT: Array, *,
           attend_blocks: int, write_blocks: tuple[int, ...], advance_N: Array | None = None,
           decode_slot: Array | None = None) -> tuple[Array, HybridCache]:
    """Feeds T tokens per row, row n's at suffix slots `slots_NxT[n]` (consecutive): the attention
    layers write their keys and values into the blocks `write_blocks` and attend to the prefix and
    to blocks `0 … attend_blocks − 1` (slots ≤ each query's own); the Mamba layers continue each
    row's recurrence over the T tokens, keeping the new state only on rows with `advance_N` (every
    row when None). `decode_slot`: a one-token step in which every row that writes writes this
    same slot (`decode.write_slots`). Returns the final-norm hidden states `[N, T, D]` and the cache."""
    c = weights.config
    kv = cache.kv
    block_k = [list(b) for b in kv.block_k]
    block_v = [list(b) for b in kv.block_v]
    conv, ssm = list(cache.conv), list(cache.ssm)
    x = tfm.embed_tokens(weights.embed_VxD, tokens_NxT, c.dtype)
    a = m = 0
    for block_type, w in zip(c.block_types, weights.layers):
        if block_type == "mamba":
            x, conv[m], ssm[m] = _mamba_layer(w, x, conv[m], ssm[m], advance_N, config=c, context=_context())
            m += 1
        elif block_type == "attention":
            x, new_k, new_v = _attention_layer(
                w, x, kv.prefix_k[a], kv.prefix_v[a], kv.prefix_len_B,
                tuple(block_k[b][a] for b in range(attend_blocks)), tuple(block_v[b][a] for b in range(attend_blocks)),
                slots_NxT, decode_slot, config=c, write_blocks=write_blocks, context=_context())
            for b in range(attend_blocks):
                block_k[b][a], block_v[b][a] = new_k[b], new_v[b]
            a += 1
        else:
            x = _mlp(w, x, config=c, context=_context())
    kv = dataclasses.replace(kv, block_k=tuple(map(tuple, block_k)), block_v=tuple(map(tuple, block_v)))
    cache = HybridCache(kv, tuple(conv), tuple(ssm))
    return nh.block_norm(x, weights.final_norm_D, c.layer_norm_epsilon), cache


@functools.partial(jax.jit, static_argnames=("config", "context"))
def _mamba_layer(w, x_NxTxD, conv, ssm, advance_N, *, config, context):
    del context
    out, new_conv, new_ssm = mamba2.mamba_extend(_norm(x_NxTxD, w, config), w, config, conv, ssm, advance_N)
    return (x_NxTxD + out, *_constrain_mamba_state(new_conv, new_ssm))


@functools.partial(jax.jit, static_argnames=("config", "write_blocks", "context"))
def _attention_layer(w, x_NxTxD, prefix_k, prefix_v, prefix_len_B, blocks_k, blocks_v, slots_NxT, decode_slot, *,
                     config, write_blocks, context):
    del context
    q, k, v = nh.attention_qkv(_norm(x_NxTxD, w, config), w)
    blocks_k, blocks_v = decode.write_slots(blocks_k, blocks_v, k, v, slots_NxT, write_blocks, decode_slot)
    attn = decode.cached_attention(q, prefix_k, prefix_v, prefix_len_B, blocks_k, blocks_v, slots_NxT, config.platform)
    return x_NxTxD + nh.attention_out(attn, w, jnp.dtype(config.dtype)), blocks_k, blocks_v


def logits(weights: HybridDecodeWeights, hidden_NxTxD: Array) -> Array:
    """LM-head logits `[N, T, V]` from final-norm hidden states."""
    return tfm.head_logits(hidden_NxTxD, weights.head_DxV)
