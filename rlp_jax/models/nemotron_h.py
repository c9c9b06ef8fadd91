"""NVIDIA Nemotron-H hybrid decoder (dense variants) in Flax NNX, mirroring transformers'
`NemotronHForCausalLM` (model_type `nemotron_h`; Nemotron-H tech report, arXiv:2504.03624).

Each layer is one pre-norm residual block `x + mixer(RMSNorm(x))` whose mixer is, by the layer's
character in the pattern: `M` a Mamba-2 mixer (rlp_jax.models.mamba2), `*` causal grouped-query
self-attention with no positional encoding at all (transformers' NemotronHAttention applies no
RoPE; order comes from the Mamba layers), `-` a ReLU² MLP `down(relu(up(h))²)`. The embedding and
the LM head are separate matrices (transformers never ties them for this model).

Weights of each block type are stacked over a leading `layers` axis (one stack per type); the
teacher-forced forward is ONE `lax.scan` over all layers whose body switches (`lax.switch`) on the
layer's type and slices that type's stack at the layer's per-type index, so every block type is
compiled once whatever the depth. Decoding (prefill, decode steps, scoring after a thought) runs
on the rollout cache of rlp_jax.models.nemotron_h_decode, over per-layer weights sliced once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax.models import mamba2
from rlp_jax.models import transformer as tfm
from rlp_jax.sharding import constrain

Array = jax.Array

BLOCK_CHARS = {"M": "mamba", "*": "attention", "-": "mlp"}
BLOCK_TYPES = ("mamba", "attention", "mlp")


# ---------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
    vocab_size: int
    hidden_size: int
    pattern: str  # one character per layer: M Mamba-2, * attention, - MLP (HF hybrid_override_pattern)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    expand: int = 2  # HF metadata only: the mixer width is mamba_num_heads · mamba_head_dim
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # Δ is clamped to this, as NVIDIA's published modeling code and transformers >= 5.25 do.
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    mamba_ssm_cache_dtype: str = "float32"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: str = "none"  # "none" | "full" | "dots_saveable" (the training forward's layer scan)
    attention: str = "auto"  # self-attention backend, as ModelConfig.attention
    platform: str | None = None  # as ModelConfig.platform (kernels.resolve_kernels; not serialised)

    def __post_init__(self):
        bad = sorted(set(self.pattern) - set(BLOCK_CHARS))
        if "E" in bad:
            raise ValueError("the layer pattern has MoE blocks ('E'); only dense Nemotron-H models "
                             "(blocks M, * and -) are supported.")
        if bad or not self.pattern:
            raise ValueError(f"layer pattern {self.pattern!r} must be a non-empty string of 'M' (Mamba), "
                             "'*' (attention) and '-' (MLP).")
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                     "n_groups", "conv_kernel", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                             f"{self.num_kv_heads}; choose head counts that divide.")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads={self.mamba_num_heads} must be a multiple of n_groups="
                             f"{self.n_groups}; choose group counts that divide.")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ValueError(f"remat={self.remat!r} is unknown; use 'none', 'full' or 'dots_saveable'.")
        if self.attention not in ("auto", "xla", "cudnn", "splash"):
            raise ValueError(f"attention={self.attention!r} is unknown; use 'auto', 'xla', 'cudnn' or 'splash'.")
        if self.platform not in (None, "cpu", "gpu", "tpu"):
            raise ValueError(f"platform={self.platform!r} is unknown; use 'cpu', 'gpu' or 'tpu' "
                             "(rlp_jax.models.kernels.resolve_kernels sets it).")

    def replace(self, **changes) -> "NemotronHConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def block_types(self) -> tuple[str, ...]:
        return tuple(BLOCK_CHARS[ch] for ch in self.pattern)

    def count(self, block_type: str) -> int:
        return self.block_types.count(block_type)

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    def num_params(self) -> int:
        """The parameter count, equal to `sum(p.numel())` of transformers' NemotronHForCausalLM."""
        D, V = self.hidden_size, self.vocab_size
        di, G, N, Hm = self.mamba_inner, self.n_groups, self.ssm_state_size, self.mamba_num_heads
        conv_dim = di + 2 * G * N
        mamba = (D + D * (2 * di + 2 * G * N + Hm) + conv_dim * self.conv_kernel
                 + (conv_dim if self.use_conv_bias else 0) + 3 * Hm + di + di * D)
        attention = D + D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = D + 2 * D * self.intermediate_size
        return (self.count("mamba") * mamba + self.count("attention") * attention
                + self.count("mlp") * mlp + 2 * V * D + D)


def _published(hidden, pattern, heads, intermediate, head_dim_mamba, max_positions) -> NemotronHConfig:
    return NemotronHConfig(vocab_size=131072, hidden_size=hidden, pattern=pattern, num_heads=heads,
                           num_kv_heads=8, head_dim=128, intermediate_size=intermediate, mamba_num_heads=128,
                           mamba_head_dim=head_dim_mamba, ssm_state_size=128, n_groups=8, conv_kernel=4,
                           chunk_size=128, max_position_embeddings=max_positions)


# Shapes typed in from the published HF config.json files (nvidia/NVIDIA-Nemotron-Nano-12B-v2,
# nvidia/NVIDIA-Nemotron-Nano-9B-v2, nvidia/Nemotron-H-8B-Base-8K), from memory, nothing downloaded.
# The counts agree with the published sizes (12.31B, 8.89B, 8.10B). Least certain: the exact
# 9B-v2 pattern (27 M / 4 * / 25 -), chunk_size (128) and max_position_embeddings.
PRESETS: dict[str, NemotronHConfig] = {
    "nemotron-nano-12b-v2": _published(5120, "M-M-M-M*-" * 6 + "M-M-M-M-", 40, 20480, 80, 131072),
    "nemotron-nano-9b-v2": _published(4480, "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
                                      40, 15680, 80, 131072),
    "nemotron-h-8b": _published(4096, "M-M-M-M*-" + "M-M-M-M-M*-" * 3 + "M-M-M-M-M-", 32, 21504, 64, 8192),
    # Test size.
    "nemotron-h-tiny": NemotronHConfig(vocab_size=256, hidden_size=64, pattern="MM*-M*-", num_heads=4,
                                       num_kv_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
                                       mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8),
}


def preset(name: str, **overrides) -> NemotronHConfig:
    """The named Nemotron-H preset, with optional field overrides (e.g. `dtype=`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Nemotron-H preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides)


# ---------------------------------------------------------------- weights

ATTENTION_AXES = {
    "norm": ("layers", "norm"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
}
MLP_AXES = {"norm": ("layers", "norm"), "up": ("layers", "embed", "mlp"), "down": ("layers", "mlp", "embed")}
AXES = {"mamba": mamba2.MAMBA_AXES, "attention": ATTENTION_AXES, "mlp": MLP_AXES}


def block_shapes(c: NemotronHConfig, block_type: str) -> dict[str, tuple[int, ...]]:
    """Shapes of one block type's stacked weights (leading axis: that type's layer count)."""
    Z, D = c.count(block_type), c.hidden_size
    if block_type == "mamba":
        return mamba2.mamba_shapes(Z, D, c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size,
                                   c.conv_kernel, c.use_conv_bias)
    if block_type == "attention":
        Q, J, H = c.num_heads, c.num_kv_heads, c.head_dim
        return {"norm": (Z, D), "q": (Z, D, Q, H), "k": (Z, D, J, H), "v": (Z, D, J, H), "o": (Z, Q, H, D)}
    return {"norm": (Z, D), "up": (Z, D, c.intermediate_size), "down": (Z, c.intermediate_size, D)}


class BlockStack(nnx.Module):
    """All layers of one block type, each weight stacked over `layers`."""

    def __init__(self, c: NemotronHConfig, block_type: str, rngs: nnx.Rngs, init_std: float):
        dtype = jnp.dtype(c.param_dtype)
        self.names = tuple(block_shapes(c, block_type))
        for name, shape in block_shapes(c, block_type).items():
            if name in ("norm", "gate_norm", "D"):
                value = jnp.ones(shape, dtype)
            elif name == "A_log":  # A = −1 … −H per head (transformers' initialisation)
                value = jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)
            elif name == "dt_bias":  # softplus⁻¹ of Δ log-uniform in [time_step_min, time_step_max]
                u = jax.random.uniform(rngs.params(), shape)
                dt = jnp.exp(u * (math.log(c.time_step_max) - math.log(c.time_step_min)) + math.log(c.time_step_min))
                dt = jnp.maximum(dt, c.time_step_floor)
                value = (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
            elif name.endswith("_bias"):
                value = jnp.zeros(shape, dtype)
            else:
                value = init_std * jax.random.normal(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value, out_sharding=AXES[block_type][name]))

    def weights(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in self.names}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """The model's arrays as a pytree (the config is static metadata): what the pure functions
    `hidden_states` and rlp_jax.models.nemotron_h_decode take. Block dicts are empty for absent types."""

    config: NemotronHConfig = dataclasses.field(metadata=dict(static=True))
    embed_VxD: Array
    final_norm_D: Array
    head_DxV: Array
    blocks: dict[str, dict[str, Array]]  # block type → stacked weights


class NemotronH(nnx.Module):
    """`(tokens_BxT, positions_BxT=None, valid_BxT=None) -> logits_BxTxV`; positions are accepted for
    a Transformer-compatible call and ignored (the model has no positional encoding)."""

    def __init__(self, config: NemotronHConfig, rngs: nnx.Rngs, init_std: float = 0.02):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        V, D = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(init_std * jax.random.normal(rngs.params(), (V, D), dtype),
                               out_sharding=("vocab", "embed"))
        for block_type in BLOCK_TYPES:
            if config.count(block_type):
                setattr(self, block_type, BlockStack(config, block_type, rngs, init_std))
        self.final_norm = nnx.Param(jnp.ones((D,), dtype), out_sharding=("norm",))
        self.lm_head = nnx.Param(init_std * jax.random.normal(rngs.params(), (D, V), dtype),
                                 out_sharding=("embed", "vocab"))

    def weights(self) -> Weights:
        blocks = {t: getattr(self, t).weights() for t in BLOCK_TYPES if self.config.count(t)}
        return Weights(self.config, self.embed[...], self.final_norm[...], self.lm_head[...], blocks)

    def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
                 valid_BxT: Array | None = None) -> Array:
        del positions_BxT
        w = self.weights()
        return logits(w, hidden_states(w, tokens_BxT, valid_BxT))

    # The Transformer's forward pieces, so that the RLP step's teacher-forced forwards (rollouts.
    # thought_logprobs, no_think_logprobs) and its chunked LM head run on either model.
    def hidden_states(self, tokens_BxT: Array, positions_BxT: Array | None = None,
                      valid_BxT: Array | None = None) -> Array:
        """Final-norm hidden states `[B, T, D]` (before the LM head); positions are ignored."""
        del positions_BxT
        return hidden_states(self.weights(), tokens_BxT, valid_BxT)

    def head_weights(self) -> Array:
        """The LM head `[D, V]` (never tied for this model)."""
        return self.lm_head[...]

    def logits(self, hidden_BxTxD: Array) -> Array:
        return tfm.head_logits(hidden_BxTxD, self.lm_head[...])


def init_model(config: NemotronHConfig, seed: int = 0, init_std: float = 0.02) -> NemotronH:
    """A randomly initialised, unsharded model (its initialisers compiled as one program: run
    eagerly, every weight shape compiles its own few kernels)."""
    create = lambda: NemotronH(config, nnx.Rngs(seed), init_std)
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(create))
        state = jax.jit(lambda: nnx.split(create())[1])()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------- block pieces

def block_norm(x_BxTxD: Array, scale_D: Array, eps: float) -> Array:
    """RMSNorm as transformers' NemotronHRMSNorm: statistics and the scale product in float32,
    the result in x's dtype."""
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale_D.astype(jnp.float32) * normed).astype(x_BxTxD.dtype)


# The Mamba weights kept in float32 whatever the compute dtype (as the model keeps them); every other
# weight is cast to the compute dtype where it is used.
FLOAT32_WEIGHTS = ("A_log", "D", "dt_bias")


def _layer_weights(stack: dict[str, Array], i: Array, dtype) -> dict[str, Array]:
    """Layer `i` of a type's stack, matrices cast to the compute dtype."""
    take = lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)
    return {name: take(a) if name in FLOAT32_WEIGHTS else take(a).astype(dtype) for name, a in stack.items()}


def attention_qkv(h_BxTxD: Array, w: dict[str, Array]) -> tuple[Array, Array, Array]:
    q = constrain(jnp.einsum("btd,dnh->btnh", h_BxTxD, w["q"]), ("batch", "length", "heads", None))
    k = constrain(jnp.einsum("btd,dnh->btnh", h_BxTxD, w["k"]), ("batch", "length", "kv_heads", None))
    v = constrain(jnp.einsum("btd,dnh->btnh", h_BxTxD, w["v"]), ("batch", "length", "kv_heads", None))
    return q, k, v


def attention_out(attn_BxTxQxH: Array, w: dict[str, Array], dtype) -> Array:
    # Over the flat (heads · head_dim) axis: as a "btnh,nhd" einsum XLA:CPU transposes the whole
    # output weight at every call (every decode step).
    B, T, Q, H = attn_BxTxQxH.shape
    out = jnp.einsum("btk,kd->btd", attn_BxTxQxH.astype(dtype).reshape(B, T, Q * H), w["o"].reshape(Q * H, -1))
    return constrain(out, ("batch", "length", None))


def relu2_mlp(h_BxTxD: Array, w: dict[str, Array]) -> Array:
    """`down(relu(up(h))²)`: Nemotron-H's squared-ReLU MLP (So et al. 2021, "Primer"; no gate)."""
    up = constrain(jnp.einsum("btd,df->btf", h_BxTxD, w["up"]), ("batch", "length", "mlp"))
    return constrain(jnp.einsum("btf,fd->btd", jnp.square(jax.nn.relu(up)), w["down"]), ("batch", "length", None))


def _layer_plan(c: NemotronHConfig) -> tuple[tuple[str, ...], Array, Array]:
    """The block types present (switch order), and per layer its branch and its per-type index."""
    present = tuple(t for t in BLOCK_TYPES if c.count(t))
    branch = np.array([present.index(t) for t in c.block_types], np.int32)
    index = np.array([c.block_types[:z].count(t) for z, t in enumerate(c.block_types)], np.int32)
    return present, jnp.asarray(branch), jnp.asarray(index)


def _scan_layers(c: NemotronHConfig, blocks: dict, carry, remat: bool = False):
    """`carry` through every layer in order: ONE scan whose body switches to the layer's block
    function `blocks[type](carry, i)` (i: the layer's index within its type's stack)."""
    present, branch_L, index_L = _layer_plan(c)
    branches = [blocks[t] for t in present]

    def layer(carry, plan):
        branch, i = plan
        x, *rest = jax.lax.switch(branch, branches, carry, i)
        return (constrain(x, ("batch", "length", None)), *rest), None

    if remat and c.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                  if c.remat == "dots_saveable" else None)
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    carry, _ = jax.lax.scan(layer, carry, (branch_L, index_L))
    return carry


def _mlp_block(c: NemotronHConfig, w: "Weights", dtype):
    def mlp(carry, i):
        x, *rest = carry
        wl = _layer_weights(w.blocks["mlp"], i, dtype)
        return (x + relu2_mlp(block_norm(x, wl["norm"], c.layer_norm_epsilon), wl), *rest)
    return mlp


def embed(w: Weights, tokens_BxT: Array) -> Array:
    return tfm.embed_tokens(w.embed_VxD, tokens_BxT, jnp.dtype(w.config.dtype))


def logits(w: Weights, hidden_BxTxD: Array) -> Array:
    """LM-head logits `[B, T, V]` from final-norm hidden states."""
    return tfm.head_logits(hidden_BxTxD, w.head_DxV)


# ---------------------------------------------------------------- teacher-forced forward

def hidden_states(w: Weights, tokens_BxT: Array, valid_BxT: Array | None = None) -> Array:
    """Final-norm hidden states `[B, T, D]` of the causal forward (Mamba layers by chunked SSD).
    Tokens with `valid_BxT == False` are left out as attention keys and skipped by the Mamba
    state (see mamba2.mamba_mixer); their own outputs are meaningless."""
    c = w.config
    dtype = jnp.dtype(c.dtype)
    def mamba(carry, i):
        x, = carry
        wl = _layer_weights(w.blocks["mamba"], i, dtype)
        out, _ = mamba2.mamba_mixer(block_norm(x, wl["norm"], c.layer_norm_epsilon), wl, c, valid_BxT)
        return (x + out,)

    def attention(carry, i):
        x, = carry
        wl = _layer_weights(w.blocks["attention"], i, dtype)
        q, k, v = attention_qkv(block_norm(x, wl["norm"], c.layer_norm_epsilon), wl)
        attn = tfm.self_attention(q, k, v, valid_BxT, c.attention, c.platform)
        return (x + attention_out(attn, wl, dtype),)

    blocks = dict(mamba=mamba, attention=attention, mlp=_mlp_block(c, w, dtype))
    x, = _scan_layers(c, blocks, (embed(w, tokens_BxT),), remat=True)
    return block_norm(x, w.final_norm_D.astype(dtype), c.layer_norm_epsilon)
