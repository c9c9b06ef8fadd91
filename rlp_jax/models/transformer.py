"""Decoder-only LM for the Qwen3 and Llama-3 families, in Flax NNX.

Layer weights are stacked on a leading `layers` axis and the forward pass scans over them, so
compile time does not grow with depth. Every parameter carries logical axis names (rlp_jax.sharding).

Two calling modes share one code path:
- no cache: `model(tokens_BxT, positions_BxT, valid_BxT)` attends causally (by index) within the T
  tokens, ignoring tokens with `valid == False` as keys;
- with a `KVCache`: the T new tokens are written into cache slot `positions_BxT` of their row and
  attend to every slot `<= their position`. A row's slots `0 … n−1` must hold its first n tokens,
  so prompts are right-padded with positions `0 … T−1` (pad slots are overwritten later).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from rlp_jax.models.config import ModelConfig
from rlp_jax.sharding import constrain, fit_spec, logical_to_mesh

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, slot = token position: `[layers, B, S, kv_heads, head_dim]`."""

    k: Array
    v: Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, max_len: int) -> "KVCache":
        shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times in place (row b → rows b·n … b·n+n−1): G samples, one prefill."""
        return KVCache(jnp.repeat(self.k, n, axis=1), jnp.repeat(self.v, n, axis=1))


# Logical axes of the stacked layer weights.
_LAYER_AXES = {
    "attn_norm": ("layers", "norm"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "q_norm": ("layers", "norm"),
    "k_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
}


def _layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    Z, D, Q, J, H, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.intermediate_size)
    shapes = {"attn_norm": (Z, D), "q": (Z, D, Q, H), "k": (Z, D, J, H), "v": (Z, D, J, H),
              "o": (Z, Q, H, D), "mlp_norm": (Z, D), "gate": (Z, D, F), "up": (Z, D, F),
              "down": (Z, F, D)}
    if c.qk_norm:
        shapes |= {"q_norm": (Z, H), "k_norm": (Z, H)}
    return shapes


class DecoderLayers(nnx.Module):
    """All decoder layers, each weight stacked over `layers`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, init_std: float = 0.02):
        dtype = jnp.dtype(config.param_dtype)
        for name, shape in _layer_shapes(config).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            else:
                value = init_std * jax.random.normal(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value, out_sharding=_LAYER_AXES[name]))

    def weights(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in _LAYER_AXES if hasattr(self, name)}


class Transformer(nnx.Module):
    """`(tokens, positions, valid, cache) -> (logits_BxTxV, cache)`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, init_std: float = 0.02):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        V, D = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(init_std * jax.random.normal(rngs.params(), (V, D), dtype),
                               out_sharding=("vocab", "embed"))
        self.layers = DecoderLayers(config, rngs, init_std)
        self.final_norm = nnx.Param(jnp.ones((D,), dtype), out_sharding=("norm",))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param(init_std * jax.random.normal(rngs.params(), (D, V), dtype),
                                     out_sharding=("embed", "vocab"))

    def __call__(self, tokens_BxT: Array, positions_BxT: Array, valid_BxT: Array | None = None,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        hidden_BxTxD, cache = self.hidden_states(tokens_BxT, positions_BxT, valid_BxT, cache)
        return self.logits(hidden_BxTxD), cache

    def hidden_states(self, tokens_BxT, positions_BxT, valid_BxT=None, cache=None):
        """Final-norm hidden states `[B, T, D]` (before the LM head) and the updated cache."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        # Look rows up in a table sharded on the vocabulary only: GSPMD then masks each shard's
        # rows and sums over `tensor`; a table also sharded on `embed` (the FSDP axis, which
        # the batch uses too) forces a full rematerialisation of the lookup.
        table_VxD = constrain(self.embed[...], ("vocab", None))
        x_BxTxD = constrain(jnp.take(table_VxD, tokens_BxT, axis=0).astype(dtype),
                            ("batch", "length", None))
        cos_BxTxH, sin_BxTxH = rope_tables(positions_BxT, c)
        if cache is None:
            T = tokens_BxT.shape[1]
            valid = jnp.ones(tokens_BxT.shape, bool) if valid_BxT is None else valid_BxT.astype(bool)
            mask_BxTxS = (jnp.arange(T)[None, :, None] >= jnp.arange(T)[None, None, :]) & valid[:, None, :]
        else:
            slots_S = jnp.arange(cache.max_len)
            mask_BxTxS = slots_S[None, None, :] <= positions_BxT[:, :, None]

        # The whole cache rides in the scan carry and each layer writes its new keys and values
        # in place (cache[layer, row, position]). Scanning over per-layer cache slices as xs/ys
        # instead makes XLA copy every layer's slice in and out at each decode step.
        def layer(carry, w):
            x, k_all, v_all, index = carry
            w = jax.tree.map(lambda a: a.astype(dtype), w)
            x, k_all, v_all = _decoder_layer(x, w, c, cos_BxTxH, sin_BxTxH, mask_BxTxS,
                                             positions_BxT, k_all, v_all, index)
            return (x, k_all, v_all, index + 1), None

        if c.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if c.remat == "dots_saveable" else None)
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        caches = (None, None) if cache is None else (cache.k, cache.v)
        (x_BxTxD, k, v, _), _ = jax.lax.scan(layer, (x_BxTxD, *caches, jnp.int32(0)),
                                             self.layers.weights())
        new_cache = None if cache is None else KVCache(k, v)
        return rms_norm(x_BxTxD, self.final_norm[...].astype(dtype), c.rms_norm_eps), new_cache

    def head_weights(self) -> Array:
        """The LM head `[D, V]` (the transposed embedding when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def logits(self, hidden_BxTxD: Array) -> Array:
        return head_logits(hidden_BxTxD, self.head_weights())


def head_logits(hidden_BxTxD: Array, head_DxV: Array) -> Array:
    logits = hidden_BxTxD @ head_DxV.astype(hidden_BxTxD.dtype)
    return constrain(logits, ("batch",) + ("length",) * (logits.ndim - 2) + ("vocab",))


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm with the statistics in float32 (as HF does), the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def rope_inverse_frequencies(c: ModelConfig) -> Array:
    """`1/θ^(2i/d)`, with Llama-3 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim))
    s = c.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(in_band, interpolated, scaled)


def rope_tables(positions_BxT: Array, c: ModelConfig) -> tuple[Array, Array]:
    angles = positions_BxT[..., None].astype(jnp.float32) * rope_inverse_frequencies(c)
    angles = jnp.concatenate([angles, angles], axis=-1)
    dtype = jnp.dtype(c.dtype)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BxTxQxH: Array, cos_BxTxH: Array, sin_BxTxH: Array) -> Array:
    """Rotary embedding in the half-split layout (HF `rotate_half`)."""
    half = x_BxTxQxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxQxH[..., half:], x_BxTxQxH[..., :half]], axis=-1)
    return x_BxTxQxH * cos_BxTxH[:, :, None] + rotated * sin_BxTxH[:, :, None]


def _write_cache(cache_ZxBxSxJxH: Array, layer: Array, new_BxTxJxH: Array, positions_BxT: Array) -> Array:
    rows_Bx1 = jnp.arange(cache_ZxBxSxJxH.shape[1])[:, None]
    return cache_ZxBxSxJxH.at[layer, rows_Bx1, positions_BxT].set(new_BxTxJxH.astype(cache_ZxBxSxJxH.dtype))


# Query blocks up to this many tokens against a cache (decode steps, RLP scoring) use
# `attention_few_queries`; longer ones (prefill) the plain grouped einsum.
FEW_QUERIES = 16


def _decoder_layer(x_BxTxD, w: dict[str, Any], c: ModelConfig, cos, sin, mask_BxTxS, positions_BxT,
                   k_all, v_all, layer):
    h = rms_norm(x_BxTxD, w["attn_norm"], c.rms_norm_eps)
    q = constrain(jnp.einsum("btd,dnh->btnh", h, w["q"]), ("batch", "length", "heads", None))
    k = constrain(jnp.einsum("btd,dnh->btnh", h, w["k"]), ("batch", "length", "kv_heads", None))
    v = constrain(jnp.einsum("btd,dnh->btnh", h, w["v"]), ("batch", "length", "kv_heads", None))
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attend = attention
    if k_all is not None:
        k_all = _write_cache(k_all, layer, k, positions_BxT)
        v_all = _write_cache(v_all, layer, v, positions_BxT)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
        if q.shape[1] <= FEW_QUERIES and not _kv_heads_split(c.num_kv_heads):
            attend = attention_few_queries
    attn_BxTxQxH = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask_BxTxS)
    x_BxTxD = x_BxTxD + jnp.einsum("btnh,nhd->btd", attn_BxTxQxH, w["o"])
    h = rms_norm(x_BxTxD, w["mlp_norm"], c.rms_norm_eps)
    gate = constrain(_project(h, w["gate"]), ("batch", "length", "mlp"))
    up = constrain(_project(h, w["up"]), ("batch", "length", "mlp"))
    x_BxTxD = x_BxTxD + _project(jax.nn.silu(gate) * up, w["down"])
    return constrain(x_BxTxD, ("batch", "length", None)), k_all, v_all


def _project(x_BxTxI: Array, w_IxO: Array) -> Array:
    """`x @ w` over one flat `B·T` axis. As a `btd,df->btf` einsum, the backward contracts the
    weight gradient over (B, T) together, and XLA:CPU then transposes whole MLP activations saved
    by the layer scan (`[B, T, F]` → `[F, B, T]`, fused with their dynamic slice) at a fraction
    of memory speed; over one flat axis it does not."""
    B, T, I = x_BxTxI.shape
    return (x_BxTxI.reshape(B * T, I) @ w_IxO).reshape(B, T, w_IxO.shape[-1])


def _kv_heads_split(num_kv_heads: int) -> bool:
    """Whether the logical-axis rules in context shard the kv heads over a mesh axis of size > 1."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return False
    spec = fit_spec((num_kv_heads,), logical_to_mesh(("kv_heads",), rules), mesh)
    return spec[0] is not None


def attention(q_BxTxQxH: Array, k_BxSxJxH: Array, v_BxSxJxH: Array, mask_BxTxS: Array) -> Array:
    """Grouped-query attention with the softmax in float32."""
    B, T, Q, H = q_BxTxQxH.shape
    J = k_BxSxJxH.shape[2]
    q = q_BxTxQxH.reshape(B, T, J, Q // J, H)
    scores = jnp.einsum("btjgh,bsjh->bjgts", q, k_BxSxJxH).astype(jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxJxH.dtype)
    out = jnp.einsum("bjgts,bsjh->btjgh", probs, v_BxSxJxH)
    return out.reshape(B, T, Q, H)


def attention_few_queries(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array) -> Array:
    """The same grouped-query attention for a few queries against a long cache (decode, scoring).

    `attention` makes (batch, kv head) the batch dimensions of its matmuls; a cache laid out
    `[B, S, K, H]` must then be transposed to `[B, K, S, H]` — a copy of the whole layer cache at
    every decode step, which costs more than the attention itself. Here each row's cache is read
    in its memory order, as one `[S, K·H]` matrix, against block-diagonal queries
    (`q_bd[(j, h), (k, g)] = q[k, g, h]·[j = k]`); the off-diagonal blocks are multiplications by
    zero, K-fold extra arithmetic that is cheap while decode is bound by memory traffic.
    """
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    eye_KxK = jnp.eye(K, dtype=q_BxTxNxH.dtype)
    q_bd = jnp.einsum("btkgh,kj->bjhtkg", q_BxTxNxH.reshape(B, T, K, N // K, H), eye_KxK)
    scores_BxSxTxN = jnp.einsum("bsc,bctn->bstn", k_BxSxKxH.reshape(B, S, K * H),
                                q_bd.reshape(B, K * H, T, N)).astype(jnp.float32) / math.sqrt(H)
    mask_BxSxTx1 = jnp.swapaxes(mask_BxTxS, 1, 2)[..., None]
    scores_BxSxTxN = jnp.where(mask_BxSxTx1, scores_BxSxTxN, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxSxTxN, axis=1).astype(v_BxSxKxH.dtype)
    all_pairs = jnp.einsum("bstn,bsc->btnc", probs, v_BxSxKxH.reshape(B, S, K * H))
    out = jnp.einsum("btkgjh,kj->btkgh", all_pairs.reshape(B, T, K, N // K, K, H), eye_KxK)
    return out.reshape(B, T, N, H)


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised, unsharded model (for sharded creation see
    train_step.create_state_from_scratch, or build it under a mesh and logical-axis rules)."""
    with nnx.use_eager_sharding(False):
        return Transformer(config, nnx.Rngs(seed))
