"""Decoder-only LM for the Qwen3 and Llama-3 families, in Flax NNX.

Layer weights are stacked on a leading `layers` axis and the teacher-forced forward pass scans
over them, so compile time does not grow with depth. Every parameter carries logical axis names
(rlp_jax.sharding). `model(tokens_BxT, positions_BxT, valid_BxT)` attends causally (by index)
within the T tokens, ignoring tokens with `valid == False` as keys; incremental decoding over a KV
cache lives in `rlp_jax.models.decode`, built from the same layer pieces (`attention_inputs`,
`layer_output`).

Self-attention runs fused where the platform the program is compiled for has a kernel
(`ModelConfig.attention`, resolved for a platform by rlp_jax.models.kernels.resolve_kernels): cuDNN
flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention`), Pallas splash attention on TPUs,
the XLA einsum path (float32 softmax) on CPU, in an unresolved config, and for a masked call that
cuDNN cannot take.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from rlp_jax.models import kernels
from rlp_jax.models.config import ModelConfig
from rlp_jax.sharding import constrain, fit_spec, logical_to_mesh

Array = jax.Array

# Logical axes of the stacked layer weights.
LAYER_AXES = {
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
            setattr(self, name, nnx.Param(value, out_sharding=LAYER_AXES[name]))

    def weights(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in LAYER_AXES if hasattr(self, name)}


class Transformer(nnx.Module):
    """`(tokens, positions, valid) -> logits_BxTxV`."""

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

    def __call__(self, tokens_BxT: Array, positions_BxT: Array, valid_BxT: Array | None = None) -> Array:
        return self.logits(self.hidden_states(tokens_BxT, positions_BxT, valid_BxT))

    def hidden_states(self, tokens_BxT: Array, positions_BxT: Array, valid_BxT: Array | None = None) -> Array:
        """Final-norm hidden states `[B, T, D]` (before the LM head)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x_BxTxD = embed_tokens(self.embed[...], tokens_BxT, dtype)
        cos_BxTxH, sin_BxTxH = rope_tables(positions_BxT, c)

        def layer(x, w):
            w = jax.tree.map(lambda a: a.astype(dtype), w)
            q, k, v = attention_inputs(x, w, c, cos_BxTxH, sin_BxTxH)
            return layer_output(x, self_attention(q, k, v, valid_BxT, c.attention, c.platform), w, c), None

        if c.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if c.remat == "dots_saveable" else None)
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, self.layers.weights())
        return rms_norm(x_BxTxD, self.final_norm[...].astype(dtype), c.rms_norm_eps)

    def head_weights(self) -> Array:
        """The LM head `[D, V]` (the transposed embedding when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def logits(self, hidden_BxTxD: Array) -> Array:
        return head_logits(hidden_BxTxD, self.head_weights())


def embed_tokens(table_VxD: Array, tokens_BxT: Array, dtype) -> Array:
    # Look rows up in a table sharded on the vocabulary only: GSPMD then masks each shard's rows
    # and sums over `tensor`; a table also sharded on `embed` (the FSDP axis, which the batch
    # uses too) forces a full rematerialisation of the lookup.
    table_VxD = constrain(table_VxD, ("vocab", None))
    return constrain(jnp.take(table_VxD, tokens_BxT, axis=0).astype(dtype), ("batch", "length", None))


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


# ---------------------------------------------------------------- one decoder layer, in two halves

def attention_inputs(x_BxTxD: Array, w: dict[str, Any], c: ModelConfig, cos_BxTxH: Array,
                     sin_BxTxH: Array) -> tuple[Array, Array, Array]:
    """The layer's queries, keys and values (normed and rotated): `[B, T, Q|J, H]`."""
    h = rms_norm(x_BxTxD, w["attn_norm"], c.rms_norm_eps)
    q = constrain(jnp.einsum("btd,dnh->btnh", h, w["q"]), ("batch", "length", "heads", None))
    k = constrain(jnp.einsum("btd,dnh->btnh", h, w["k"]), ("batch", "length", "kv_heads", None))
    v = constrain(jnp.einsum("btd,dnh->btnh", h, w["v"]), ("batch", "length", "kv_heads", None))
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    return apply_rope(q, cos_BxTxH, sin_BxTxH), apply_rope(k, cos_BxTxH, sin_BxTxH), v


def layer_output(x_BxTxD: Array, attn_BxTxQxH: Array, w: dict[str, Any], c: ModelConfig) -> Array:
    """The residual stream after the attention output projection and the MLP."""
    B, T, Q, H = attn_BxTxQxH.shape
    # Over the flat (heads · head_dim) axis: as a "btnh,nhd" einsum XLA:CPU transposes the whole
    # output weight at every call (every decode step).
    x_BxTxD = x_BxTxD + _project(attn_BxTxQxH.astype(x_BxTxD.dtype).reshape(B, T, Q * H),
                                 w["o"].reshape(Q * H, -1))
    h = rms_norm(x_BxTxD, w["mlp_norm"], c.rms_norm_eps)
    gate = constrain(_project(h, w["gate"]), ("batch", "length", "mlp"))
    up = constrain(_project(h, w["up"]), ("batch", "length", "mlp"))
    x_BxTxD = x_BxTxD + _project(jax.nn.silu(gate) * up, w["down"])
    return constrain(x_BxTxD, ("batch", "length", None))


def _project(x_BxTxI: Array, w_IxO: Array) -> Array:
    """`x @ w` over one flat `B·T` axis. As a `btd,df->btf` einsum, the backward contracts the
    weight gradient over (B, T) together, and XLA:CPU then transposes whole MLP activations saved
    by the layer scan (`[B, T, F]` → `[F, B, T]`, fused with their dynamic slice) at a fraction
    of memory speed; over one flat axis it does not."""
    B, T, I = x_BxTxI.shape
    return (x_BxTxI.reshape(B * T, I) @ w_IxO).reshape(B, T, w_IxO.shape[-1])


# ---------------------------------------------------------------- self-attention

def self_attention(q_BxTxQxH: Array, k_BxTxJxH: Array, v_BxTxJxH: Array, valid_BxT: Array | None = None,
                   setting: str = "auto", platform: str | None = None) -> Array:
    """Causal grouped-query attention within T tokens (query t sees keys 0 … t), keys with
    `valid_BxT == False` left out; the output at an invalid position is unspecified (finite).

    The kernel is `ModelConfig.attention = setting` compiled for `platform`
    (kernels.attention_kernel). Splash honours any `valid_BxT`; cuDNN takes no mask of keys, so
    a masked call runs the XLA path under `auto` and is refused under a forced `cudnn`.
    Right-padded rows need no mask at all: no real query sees a key after it."""
    kernel = kernels.attention_kernel(setting, platform, q_BxTxQxH.dtype, q_BxTxQxH.shape[-1])
    if kernel == "cudnn" and valid_BxT is not None:
        if setting == "cudnn":
            raise ValueError("attention='cudnn' cannot leave out keys by a mask (valid_BxT): cuDNN attention "
                             "takes only a causal mask. Use attention='auto' (masked calls then run the XLA "
                             "path) or 'xla', or drop the mask for right-padded rows.")
        kernel = "xla"
    if kernel == "cudnn":
        return cudnn_attention(q_BxTxQxH, k_BxTxJxH, v_BxTxJxH)
    if kernel == "splash":
        return splash_attention(q_BxTxQxH, k_BxTxJxH, v_BxTxJxH, valid_BxT)
    T = q_BxTxQxH.shape[1]
    mask_BxTxS = jnp.tril(jnp.ones((T, T), bool))[None]
    if valid_BxT is not None:
        mask_BxTxS = mask_BxTxS & valid_BxT.astype(bool)[:, None, :]
    return attention(q_BxTxQxH, k_BxTxJxH, v_BxTxJxH, mask_BxTxS)


def attention(q_BxTxQxH: Array, k_BxSxJxH: Array, v_BxSxJxH: Array, mask_BxTxS: Array) -> Array:
    """Grouped-query attention with the softmax in float32 (the XLA path)."""
    B, T, Q, H = q_BxTxQxH.shape
    J = k_BxSxJxH.shape[2]
    q = q_BxTxQxH.reshape(B, T, J, Q // J, H)
    scores = jnp.einsum("btjgh,bsjh->bjgts", q, k_BxSxJxH).astype(jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxJxH.dtype)
    out = jnp.einsum("bjgts,bsjh->btjgh", probs, v_BxSxJxH)
    return out.reshape(B, T, Q, H)


def cudnn_attention(q_BxTxQxH: Array, k_BxTxJxH: Array, v_BxTxJxH: Array, implementation: str = "cudnn") -> Array:
    """Causal attention by cuDNN flash attention (`jax.nn.dot_product_attention`). cuDNN's
    backward takes only even lengths (JAX refuses "Unsupported sequence length Q 4097, KV 4097"
    under jax.grad), so an odd T is padded by one position at the end: no real query sees its key
    under the causal mask, so outputs and gradients are unchanged. `implementation="xla"` runs
    the same computation on any backend (tests)."""
    T = q_BxTxQxH.shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, T % 2), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(pad(q_BxTxQxH), pad(k_BxTxJxH), pad(v_BxTxJxH), is_causal=True,
                                       implementation=implementation)
    return out[:, :T]


def splash_blocks(seq_len: int) -> tuple[int, int]:
    """`(block, padded_len)` for the splash kernel: blocks of up to 512 (a multiple of 128) and the
    sequence padded to a multiple of the block, which every block size must divide."""
    block = min(512, -(-seq_len // 128) * 128)
    return block, -(-seq_len // block) * block


def _splash_kernel(num_heads: int, seq_len: int, block: int, interpret: bool):
    """The kernel for these shapes, built anew for every trace: its mask tables are arrays made
    while tracing, so a kernel cached across programs would carry one program's tracers into the
    next (and building them eagerly instead would run on the target's devices, which a
    compile-only mesh does not have)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BxTxQxH: Array, k_BxTxJxH: Array, v_BxTxJxH: Array, valid_BxT: Array | None = None,
                     interpret: bool = False) -> Array:
    """Causal attention by the Pallas TPU splash kernel (grouped heads natively), keys with
    `valid_BxT == False` left out. A kernel is opaque to GSPMD, so under a mesh it runs in
    `shard_map` on each device's rows and heads (split as the logical-axis rules say);
    `interpret=True` runs it on any backend (tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    local = functools.partial(_splash_local, interpret=interpret)
    args = (q_BxTxQxH, k_BxTxJxH, v_BxTxJxH) + (() if valid_BxT is None else (valid_BxT,))
    if mesh.empty or not rules:
        return local(*args)
    q_spec = fit_spec(q_BxTxQxH.shape, logical_to_mesh(("batch", None, "heads", None), rules), mesh)
    kv_spec = fit_spec(k_BxTxJxH.shape, logical_to_mesh(("batch", None, "kv_heads", None), rules), mesh)
    if q_spec[2] != kv_spec[2]:  # a group's query heads must sit with its kv head: split neither
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    specs = (q_spec, kv_spec, kv_spec, P(q_spec[0], None))[:len(args)]
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _splash_local(q_BxTxQxH: Array, k_BxTxJxH: Array, v_BxTxJxH: Array, valid_BxT: Array | None = None, *,
                  interpret: bool) -> Array:
    """The kernel vmapped over the batch, the sequence padded to a multiple of its block (padded
    keys come after every real query, so the causal mask hides them). Invalid tokens form a
    segment of their own: a valid query sees exactly the valid keys up to it, and no query row is
    ever fully masked (each sees itself)."""
    B, T, Q, H = q_BxTxQxH.shape
    block, padded = splash_blocks(T)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - T)) + ((0, 0),) * (x.ndim - 2))
    heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)  # [B, heads, T, H]
    kernel = _splash_kernel(Q, padded, block, interpret)
    q, k, v = heads_first(q_BxTxQxH) / math.sqrt(H), heads_first(k_BxTxJxH), heads_first(v_BxTxJxH)
    if valid_BxT is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        segment_BxT = pad(jnp.where(valid_BxT, 0, 1).astype(jnp.int32))
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segment_BxT)
    return jnp.swapaxes(out, 1, 2)[:, :T]


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised, unsharded model (for sharded creation see
    train_step.create_state_from_scratch, or build it under a mesh and logical-axis rules)."""
    with nnx.use_eager_sharding(False):
        return Transformer(config, nnx.Rngs(seed))
