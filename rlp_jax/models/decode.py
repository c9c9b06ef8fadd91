"""Incremental decoding for rollouts: each prompt's keys and values stored once, attention that
reads only the filled part of the cache, and the weights cast once per rollout.

The cache of a batch of B prompts × G rows (`RolloutCache`):
- the PREFIX: each prompt's keys and values, one copy per prompt however many rows sample from it,
  per layer keys `[B, J, H, P]` and values `[B, J, P, H]`, and the prompts' lengths;
- the SUFFIX: each row's own tokens (thought, `</think>`, targets) in blocks of `block_len` slots,
  per block and layer keys `[N, J, H, block_len]` and values `[N, J, block_len, H]`. Slot s of row
  n holds the token at position `prompt_len[b] + s`.

Heads come before slots, and keys hold the head dimension before the slots, so that both matmuls
of attention read the cache in its memory order: `q·K` as `[M, H] @ [H, S]`, `p·V` as
`[M, S] @ [S, H]`. (Keys stored `[S, H]` made XLA:CPU transpose every layer's keys at every
decode step: 4.8× slower for the score matmul, measured; GPU and TPU matmuls take either.)

A query of row n at suffix slot s attends to its prompt's prefix and to slots `0 … s` of its row:
one partial softmax over the prefix — the G rows' queries of a prompt stacked into one matmul, so
the prefix is read once per prompt, not G times — and one per suffix block, merged exactly by
log-sum-exp (`_merge`). Which blocks a call reads and writes is static: a decode loop over slots
`[i·block_len, (i+1)·block_len)` reads blocks `0 … i` (the filled part, at block granularity) and
writes block i.

The layers run unrolled over per-layer weight buffers (`DecodeWeights`) sliced out of the stacked
parameters and cast to the compute dtype once, before the decode loop: inside the loop no layer's
weights or cache are sliced or copied (tests/test_decode.py checks the compiled loop).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd

from rlp_jax.models import transformer as tfm
from rlp_jax.models.config import ModelConfig
from rlp_jax.sharding import constrain

Array = jax.Array
_NEG = float(jnp.finfo(jnp.float32).min)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("layers", "embed_VxD", "head_DxV", "final_norm_D"), meta_fields=("config",))
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """The model's weights for decoding: per layer, in the compute dtype."""

    config: ModelConfig
    layers: tuple[dict[str, Array], ...]
    embed_VxD: Array
    head_DxV: Array
    final_norm_D: Array


def _decode_axes(logical: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """A weight's logical axes for decoding: without the stacked `layers` axis and not split over
    `embed` (the FSDP axis), so that a sharded model all-gathers each weight once per rollout,
    outside the decode loop, rather than at every step; tensor-parallel axes stay split."""
    return tuple(None if a == "embed" else a for a in logical[1:])


def decode_weights(model: tfm.Transformer) -> DecodeWeights:
    """Every layer's weights sliced out of the stacked parameters and cast to the compute dtype:
    once per rollout (call it outside any loop)."""
    c = model.config
    dtype = jnp.dtype(c.dtype)
    stacked = model.layers.weights()
    layers = tuple({name: constrain(w[z].astype(dtype), _decode_axes(tfm.LAYER_AXES[name]))
                    for name, w in stacked.items()} for z in range(c.num_layers))
    head = constrain(model.head_weights().astype(dtype), (None, "vocab"))
    return DecodeWeights(c, layers, model.embed[...], head, model.final_norm[...].astype(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutCache:
    """Keys and values of B prompts (once each) and of their N = B·G rows' own tokens."""

    prefix_k: tuple[Array, ...]  # per layer [B, J, H, P]
    prefix_v: tuple[Array, ...]  # per layer [B, J, P, H]
    prefix_len_B: Array  # int32: filled prefix slots of each prompt
    block_k: tuple[tuple[Array, ...], ...]  # [block][layer] → [N, J, H, block_len]
    block_v: tuple[tuple[Array, ...], ...]  # [block][layer] → [N, J, block_len, H]

    @property
    def group_size(self) -> int:
        return self.block_k[0][0].shape[0] // self.prefix_len_B.shape[0]

    @property
    def block_len(self) -> int:
        return self.block_v[0][0].shape[2]

    @property
    def num_blocks(self) -> int:
        return len(self.block_k)


def num_blocks(suffix_len: int, block_len: int) -> int:
    return -(-suffix_len // block_len)


def empty_block(config: ModelConfig, num_rows: int, block_len: int) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """One suffix block of every layer, zeros: keys `[N, J, H, block_len]`, values
    `[N, J, block_len, H]`."""
    return empty_layer_blocks(config.num_layers, num_rows, config.num_kv_heads, config.head_dim, block_len,
                              config.dtype)


def empty_layer_blocks(num_layers: int, num_rows: int, num_kv_heads: int, head_dim: int, block_len: int,
                       dtype) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """`empty_block` for `num_layers` attention layers of any model (the hybrid's attention layers)."""
    J, H = num_kv_heads, head_dim
    zeros = lambda shape: tuple(constrain_block(jnp.zeros(shape, dtype)) for _ in range(num_layers))
    return zeros((num_rows, J, H, block_len)), zeros((num_rows, J, block_len, H))


def constrain_block(x: Array) -> Array:
    """The sharding of a cache array `[rows or prompts, J, ·, ·]`: rows over `batch`, heads over `kv_heads`."""
    return constrain(x, ("batch", "kv_heads", None, None))


def cache_layout(k_BxTxJxH: Array, v_BxTxJxH: Array) -> tuple[Array, Array]:
    """Keys and values as the cache stores them: keys `[B, J, H, T]`, values `[B, J, T, H]`."""
    return constrain_block(jnp.transpose(k_BxTxJxH, (0, 2, 3, 1))), constrain_block(jnp.swapaxes(v_BxTxJxH, 1, 2))


# ---------------------------------------------------------------- prefill

def prefill(weights: DecodeWeights, tokens_BxP: Array, lengths_B: Array):
    """The prompts' causal forward: final-norm hidden states `[B, P, D]` and each layer's keys
    `[B, J, H, P]` and values `[B, J, P, H]` as the prefix tuples (slots past a prompt's length hold
    pad tokens' keys; `lengths_B` masks them later)."""
    c = weights.config
    B, P = tokens_BxP.shape
    positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    x = tfm.embed_tokens(weights.embed_VxD, tokens_BxP, c.dtype)
    cos, sin = tfm.rope_tables(positions_BxP, c)
    prefix_k, prefix_v = [], []
    context = (flax_spmd.get_logical_axis_rules(), jax.sharding.get_abstract_mesh())
    for w in weights.layers:
        x, k, v = _prefill_layer_jit(w, x, cos, sin, config=c, context=context)
        prefix_k.append(k)
        prefix_v.append(v)
    return tfm.rms_norm(x, weights.final_norm_D, c.rms_norm_eps), tuple(prefix_k), tuple(prefix_v)


def _prefill_layer(w, x_BxPxD, cos, sin, *, config: ModelConfig, context):
    del context  # part of the jit cache key only (see _layer_jit)
    q, k, v = tfm.attention_inputs(x_BxPxD, w, config, cos, sin)
    x_BxPxD = tfm.layer_output(x_BxPxD, tfm.self_attention(q, k, v, None, config.attention, config.platform), w, config)
    return (x_BxPxD, *cache_layout(k, v))


_prefill_layer_jit = jax.jit(_prefill_layer, static_argnames=("config", "context"))


# ---------------------------------------------------------------- decode / extend

def extend(weights: DecodeWeights, cache: RolloutCache, tokens_NxT: Array, slots_NxT: Array, *,
           attend_blocks: int, write_blocks: tuple[int, ...], decode_slot: Array | None = None
           ) -> tuple[Array, RolloutCache]:
    """Feeds T tokens per row at suffix slots `slots_NxT` (consecutive per row): writes their keys
    and values into the blocks `write_blocks`, attends to the prefix and to blocks
    `0 … attend_blocks − 1` (slots ≤ each query's own), and returns the final-norm hidden states
    `[N, T, D]` and the cache. A slot outside every written block (e.g. a finished row's) writes
    nothing. `decode_slot`: a one-token step in which every row that writes writes this same slot
    (`write_slots`)."""
    c = weights.config
    G = cache.group_size
    positions_NxT = jnp.repeat(cache.prefix_len_B, G)[:, None] + slots_NxT
    x = tfm.embed_tokens(weights.embed_VxD, tokens_NxT, c.dtype)
    cos, sin = tfm.rope_tables(positions_NxT, c)
    block_k = [list(b) for b in cache.block_k]
    block_v = [list(b) for b in cache.block_v]
    context = (flax_spmd.get_logical_axis_rules(), jax.sharding.get_abstract_mesh())
    for z, w in enumerate(weights.layers):
        x, new_k, new_v = _layer_jit(
            w, x, cos, sin, cache.prefix_k[z], cache.prefix_v[z], cache.prefix_len_B,
            tuple(block_k[b][z] for b in range(attend_blocks)), tuple(block_v[b][z] for b in range(attend_blocks)),
            slots_NxT, decode_slot, config=c, write_blocks=write_blocks, context=context)
        for b in range(attend_blocks):
            block_k[b][z], block_v[b][z] = new_k[b], new_v[b]
    cache = dataclasses.replace(cache, block_k=tuple(map(tuple, block_k)), block_v=tuple(map(tuple, block_v)))
    return tfm.rms_norm(x, weights.final_norm_D, c.rms_norm_eps), cache


def _layer(w, x_NxTxD, cos, sin, prefix_k, prefix_v, prefix_len_B, blocks_k, blocks_v, slots_NxT, decode_slot, *,
           config: ModelConfig, write_blocks: tuple[int, ...], context):
    """One decoder layer of `extend`: writes the new keys and values, attends, returns the
    residual stream and the layer's blocks."""
    del context  # only part of the jit cache key: rules and mesh decide the sharding constraints
    q, k, v = tfm.attention_inputs(x_NxTxD, w, config, cos, sin)
    blocks_k, blocks_v = write_slots(blocks_k, blocks_v, k, v, slots_NxT, write_blocks, decode_slot)
    attn = cached_attention(q, prefix_k, prefix_v, prefix_len_B, blocks_k, blocks_v, slots_NxT, config.platform)
    return tfm.layer_output(x_NxTxD, attn, w, config), blocks_k, blocks_v


# Jitted on its own so that the layers of one `extend` (same shapes) are traced once, not once
# each; XLA inlines the calls, so the compiled program is the same.
_layer_jit = jax.jit(_layer, static_argnames=("config", "write_blocks", "context"))


def write_slots(blocks_k, blocks_v, k_NxTxJxH: Array, v_NxTxJxH: Array, slots_NxT: Array,
                write_blocks: tuple[int, ...], decode_slot: Array | None = None
                ) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """One layer's blocks with each row's T new keys and values written at suffix slots
    `slots_NxT`, in the blocks `write_blocks` only (a slot outside them writes nothing).

    `decode_slot` (a step of the decode loop, T = 1): every row with a slot ≥ 0 writes this one
    slot, and the others are finished rows whose slot is still empty (the loop writes slot u only
    at step u, into blocks `prefill` made empty), so the write is one `dynamic_update_slice` of the
    slot across all rows, zeros in the finished ones. The slot must lie in each block of
    `write_blocks` (a decode segment writes the one block that holds its steps). Both a per-row scatter and reading the slot
    back to keep the finished rows' made XLA:TPU store the block slots-major, a layout its
    attention dot cannot read, and copy every layer's block into the dot's layout at every step."""
    blocks_k, blocks_v = list(blocks_k), list(blocks_v)
    if decode_slot is not None and k_NxTxJxH.shape[1] != 1:
        raise ValueError(f"decode_slot is for one-token steps, not {k_NxTxJxH.shape[1]} tokens per row")
    for b in write_blocks:
        S = blocks_v[b].shape[2]
        if decode_slot is None:
            local_NxT = slots_NxT - b * S
            blocks_k[b] = _write(blocks_k[b], k_NxTxJxH, local_NxT, slot_axis=3)
            blocks_v[b] = _write(blocks_v[b], v_NxTxJxH, local_NxT, slot_axis=2)
        else:
            local, writes_N = decode_slot - b * S, slots_NxT[:, 0] >= 0
            blocks_k[b] = _write_slot(blocks_k[b], k_NxTxJxH[:, 0], writes_N, local, slot_axis=3)
            blocks_v[b] = _write_slot(blocks_v[b], v_NxTxJxH[:, 0], writes_N, local, slot_axis=2)
    return tuple(blocks_k), tuple(blocks_v)


def _write(block: Array, new_NxTxJxH: Array, local_NxT: Array, slot_axis: int) -> Array:
    """Row n's T new keys (or values) into slots `local_NxT` (on `slot_axis`: 3 for keys
    `[N, J, H, S]`, 2 for values `[N, J, S, H]`) of the block, in place; slots outside the block are
    dropped."""
    S = block.shape[slot_axis]
    local_NxT = jnp.where((local_NxT >= 0) & (local_NxT < S), local_NxT, S)
    rows_Nx1 = jnp.arange(block.shape[0])[:, None]
    index = (rows_Nx1, slice(None), slice(None), local_NxT) if slot_axis == 3 else (rows_Nx1, slice(None), local_NxT)
    return block.at[index].set(new_NxTxJxH.astype(block.dtype), mode="drop")


def _write_slot(block: Array, new_NxJxH: Array, writes_N: Array, local: Array, slot_axis: int) -> Array:
    """The rows `writes_N`' new key (or value) into slot `local` (inside the block) of the block
    (on `slot_axis`, as in `_write`); the other rows' slot is set to zero, which is what it holds
    in the decode loop (`write_slots`)."""
    slot = jnp.where(writes_N[:, None, None], new_NxJxH.astype(block.dtype), 0)
    return jax.lax.dynamic_update_index_in_dim(block, slot, local, axis=slot_axis)


def logits(weights: DecodeWeights, hidden_NxTxD: Array) -> Array:
    return tfm.head_logits(hidden_NxTxD, weights.head_DxV)


# ---------------------------------------------------------------- attention over the cache

def cached_attention(q_NxTxQxH: Array, prefix_k_BxJxHxP: Array, prefix_v_BxJxPxH: Array, prefix_len_B: Array,
                     blocks_k: list[Array], blocks_v: list[Array], slots_NxT: Array,
                     platform: str | None = None) -> Array:
    """Softmax attention of each query over its prompt's prefix and its row's suffix slots up to
    its own, as partial softmaxes (one over the prefix for all G rows of a prompt at once, one
    per suffix block) merged by log-sum-exp. Scores and the merge in float32. `platform`: the
    one the program is compiled for (`ModelConfig.platform`), which picks the score matmul's form."""
    N, T, Q, H = q_NxTxQxH.shape
    B, J, P, _ = prefix_v_BxJxPxH.shape
    G, g = N // B, Q // J
    scale = 1.0 / math.sqrt(H)
    q_NxTxJxgxH = q_NxTxQxH.reshape(N, T, J, g, H)
    # The prefix: the G rows of prompt b are one block of G·T·g queries against its P keys.
    q_BxJxMxH = q_NxTxJxgxH.reshape(B, G, T, J, g, H).transpose(0, 3, 1, 2, 4, 5).reshape(B, J, G * T * g, H)
    valid_Bx1x1xP = (jnp.arange(P) < prefix_len_B[:, None])[:, None, None, :]
    o, m, l = _partial_softmax(q_BxJxMxH, prefix_k_BxJxHxP, prefix_v_BxJxPxH, valid_Bx1x1xP, scale, platform)
    to_rows = lambda x: jnp.swapaxes(x.reshape(B, J, G, -1, *x.shape[3:]), 1, 2).reshape(N, J, -1, *x.shape[3:])
    parts = [(to_rows(o), to_rows(m), to_rows(l))]
    # Each suffix block: row n's T·g queries against its own slots.
    q_NxJxMxH = jnp.swapaxes(q_NxTxJxgxH, 1, 2).reshape(N, J, T * g, H)
    for b, (k_NxJxHxS, v_NxJxSxH) in enumerate(zip(blocks_k, blocks_v)):
        S = v_NxJxSxH.shape[2]
        key_slots_S = b * S + jnp.arange(S)
        valid_NxTxS = key_slots_S[None, None, :] <= slots_NxT[:, :, None]
        valid_Nx1xMxS = jnp.repeat(valid_NxTxS, g, axis=1)[:, None]
        parts.append(_partial_softmax(q_NxJxMxH, k_NxJxHxS, v_NxJxSxH, valid_Nx1xMxS, scale, platform))
    out_NxJxMxH = _merge(parts)
    return jnp.swapaxes(out_NxJxMxH.reshape(N, J, T, g, H), 1, 2).reshape(N, T, Q, H).astype(q_NxTxQxH.dtype)


def _partial_softmax(q_XxJxMxH, k_XxJxHxS, v_XxJxSxH, valid, scale, platform: str | None = None):
    """`(Σ_s e^{s−m} v_s, m, Σ_s e^{s−m})` over the valid keys (all zero where none is valid)."""
    if platform == "cpu" and q_XxJxMxH.shape[2] <= 4:
        # A few queries per kv head (decode of unshared prompts): XLA:CPU's batched dot runs
        # [M ≤ 4, H] @ [H, S] far below memory speed, a fused multiply-and-sum over H does not
        # (bench-cpu, batch 16, 1024-token prompts: 17.3 → 15.1 ms per decode step). With 8 or
        # more queries the dot is faster again (0.9 vs 1.6 ms for M = 8).
        scores = (q_XxJxMxH.astype(jnp.float32)[..., None] * k_XxJxHxS.astype(jnp.float32)[..., None, :, :]
                  ).sum(-2) * scale
    else:
        scores = jnp.einsum("xjmh,xjhs->xjms", q_XxJxMxH, k_XxJxHxS.astype(q_XxJxMxH.dtype),
                            preferred_element_type=jnp.float32) * scale
    m = jnp.max(jnp.where(valid, scores, _NEG), axis=-1)
    p = jnp.where(valid, jnp.exp(scores - m[..., None]), 0.0)
    o = jnp.einsum("xjms,xjsh->xjmh", p.astype(v_XxJxSxH.dtype), v_XxJxSxH, preferred_element_type=jnp.float32)
    return o, m, p.sum(-1)


def _merge(parts):
    """Exact log-sum-exp merge of partial softmaxes over disjoint sets of keys."""
    m = functools.reduce(jnp.maximum, [p[1] for p in parts])
    out = sum(o * jnp.exp(mi - m)[..., None] for o, mi, _ in parts)
    total = sum(li * jnp.exp(mi - m) for _, mi, li in parts)
    return out / total[..., None]
