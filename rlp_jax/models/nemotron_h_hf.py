"""Nemotron-H HF folder (config.json + safetensors) ⇄ rlp-jax NemotronH, without torch.

Reads single-file and sharded checkpoints of transformers' `NemotronHForCausalLM` (model_type
`nemotron_h`, dense block patterns only) and writes folders that
`transformers.NemotronHForCausalLM.from_pretrained` loads as-is. Every tensor's exact HF shape is
checked against config.json before it is reshaped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax.models.nemotron_h import BLOCK_CHARS, NemotronH, NemotronHConfig
from rlp_jax.models.safetensors_io import HFFormatError, SafetensorsFolder, flat, nest, read_config, write_safetensors

_LAYER_TYPE_CHARS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                     "mlp": "-", "moe": "E"}
_CHAR_LAYER_TYPES = {"M": "mamba", "*": "attention", "-": "mlp"}
# transformers' older spellings of mixer fields (NemotronHConfig.__post_init__ accepts both).
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
            "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
            "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
            "mamba_chunk_size": "chunk_size"}


# ---------------------------------------------------------------- config.json

def _pattern(hf: dict[str, Any]) -> str:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is not None:
        unknown = [t for t in types if t not in _LAYER_TYPE_CHARS]
        if unknown:
            raise HFFormatError(f"layer type {unknown[0]!r} is not a Nemotron-H block; expected 'mamba', "
                                "'attention' or 'mlp' (or their transformers names).")
        return "".join(_LAYER_TYPE_CHARS[t] for t in types)
    if "hybrid_override_pattern" in hf:
        return str(hf["hybrid_override_pattern"])
    raise HFFormatError("config.json has neither layers_block_type nor hybrid_override_pattern; give a "
                        "Nemotron-H config that lists its blocks.")


def config_from_hf(hf: dict[str, Any], **overrides) -> NemotronHConfig:
    """NemotronHConfig from a parsed config.json (model_type `nemotron_h`, dense blocks only)."""
    if hf.get("model_type") != "nemotron_h":
        raise HFFormatError(f"model_type {hf.get('model_type')!r} is not 'nemotron_h'; load other models "
                            "with rlp_jax.models.hf.load_hf.")
    hf = {_ALIASES.get(k, k): v for k, v in hf.items()}
    pattern = _pattern(hf)
    # A model is MoE by its blocks: transformers writes n_routed_experts (default 8) and the other
    # MoE fields into every nemotron_h config.json, dense ones included, where they are unused.
    # Multi-token-prediction layers (num_nextn_predict_layers) are ignored, as transformers does.
    if "E" in pattern:
        raise HFFormatError("this Nemotron-H checkpoint has MoE blocks (layer type 'moe' / 'E'); rlp-jax "
                            "supports only the dense variants (Mamba, attention and MLP blocks).")
    bad = sorted(set(pattern) - set(BLOCK_CHARS))
    if bad:
        raise HFFormatError(f"hybrid_override_pattern has unknown block characters {bad}; use 'M', '*' and '-'.")
    if hf.get("use_bias") or hf.get("mlp_bias"):
        raise HFFormatError("Nemotron-H checkpoints with projection biases (use_bias / mlp_bias: true) are "
                            "not supported; use a bias-free checkpoint.")
    if hf.get("mlp_hidden_act", "relu2") != "relu2":
        raise HFFormatError(f"mlp_hidden_act={hf['mlp_hidden_act']!r} is not supported; only 'relu2'.")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        raise HFFormatError(f"mamba_hidden_act={hf['mamba_hidden_act']!r} is not supported; only 'silu'.")
    if hf.get("sliding_window") is not None:
        raise HFFormatError("sliding-window attention is not supported; set sliding_window to null.")
    num_layers = hf.get("num_hidden_layers")
    if num_layers is not None and num_layers != len(pattern):
        raise HFFormatError(f"num_hidden_layers={num_layers} differs from the {len(pattern)} blocks of the "
                            "layer pattern; make them agree.")
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    fields = dict(
        vocab_size=hf.get("vocab_size", 131072),
        hidden_size=hf.get("hidden_size", 4096),
        pattern=pattern,
        num_heads=hf.get("num_attention_heads", 32),
        num_kv_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        head_dim=hf.get("head_dim") or hf.get("hidden_size", 4096) // hf.get("num_attention_heads", 32),
        intermediate_size=hf.get("intermediate_size", 21504),
        mamba_num_heads=hf.get("mamba_num_heads", 128),
        mamba_head_dim=hf.get("mamba_head_dim", 64),
        ssm_state_size=hf.get("ssm_state_size", 128),
        n_groups=hf.get("n_groups", 8),
        conv_kernel=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 128),
        expand=hf.get("expand", 2),
        use_conv_bias=bool(hf.get("use_conv_bias", True)),
        time_step_min=float(hf.get("time_step_min", 0.001)),
        time_step_max=float(hf.get("time_step_max", 0.1)),
        time_step_floor=float(hf.get("time_step_floor", 1e-4)),
        time_step_limit=(_json_float(limit[0]), _json_float(limit[1])),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        mamba_ssm_cache_dtype=str(hf.get("mamba_ssm_cache_dtype", "float32")),
    )
    try:
        return NemotronHConfig(**(fields | overrides))
    except ValueError as e:
        raise HFFormatError(f"config.json describes an unsupported Nemotron-H model: {e}") from None


def _json_float(value) -> float:
    """A float from config.json; transformers writes non-finite ones as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _to_json_float(value: float):
    return value if math.isfinite(value) else {"__float__": str(value).replace("inf", "Infinity")}


def config_to_hf(c: NemotronHConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "hybrid_override_pattern": c.pattern,
        "layers_block_type": [_CHAR_LAYER_TYPES[ch] for ch in c.pattern],
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "attention_bias": False,
        "use_bias": False,
        "mamba_num_heads": c.mamba_num_heads,
        "mamba_head_dim": c.mamba_head_dim,
        "ssm_state_size": c.ssm_state_size,
        "n_groups": c.n_groups,
        "conv_kernel": c.conv_kernel,
        "expand": c.expand,
        "chunk_size": c.chunk_size,
        "use_conv_bias": c.use_conv_bias,
        "mamba_hidden_act": "silu",
        "time_step_min": c.time_step_min,
        "time_step_max": c.time_step_max,
        "time_step_floor": c.time_step_floor,
        "time_step_limit": [_to_json_float(v) for v in c.time_step_limit],
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "max_position_embeddings": c.max_position_embeddings,
        "mamba_ssm_cache_dtype": c.mamba_ssm_cache_dtype,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
    }


# ---------------------------------------------------------------- tensor name mapping

def _tensor_map(c: NemotronHConfig) -> dict[str, tuple[str, int, Callable, Callable]]:
    """Our leaf path → (HF name pattern with {i}, the piece's index in a fused HF tensor or −1,
    HF→ours transform, ours→HF transform of the piece). Layer `i` is the HF block index."""
    D = c.hidden_size
    Hm, P, G, N, K = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size, c.conv_kernel
    Q, J, H = c.num_heads, c.num_kv_heads, c.head_dim
    same = (lambda w: w, lambda w: w)

    def rows_in(*shape):  # torch [n, D] ⇄ ours [D, *shape]
        return (lambda w: w.T.reshape(D, *shape), lambda w: w.reshape(D, -1).T)

    def taps(*shape):  # torch conv [C, 1, K] ⇄ ours [K, *shape]
        return (lambda w: w[:, 0, :].T.reshape(K, *shape), lambda w: w.reshape(K, -1).T[:, None, :])

    def vec(*shape):
        return (lambda w: w.reshape(*shape), lambda w: w.reshape(-1))

    m = "model.layers.{i}.mixer."
    table = {
        "embed": ("model.embeddings.weight", -1, *same),
        "final_norm": ("model.norm_f.weight", -1, *same),
        "lm_head": ("lm_head.weight", -1, lambda w: w.T, lambda w: w.T),
        "mamba/norm": ("model.layers.{i}.norm.weight", -1, *same),
        # in_proj rows: [z (Hm·P), x (Hm·P), B (G·N), C (G·N), dt (Hm)]
        "mamba/in_z": (m + "in_proj.weight", 0, *rows_in(Hm, P)),
        "mamba/in_x": (m + "in_proj.weight", 1, *rows_in(Hm, P)),
        "mamba/in_B": (m + "in_proj.weight", 2, *rows_in(G, N)),
        "mamba/in_C": (m + "in_proj.weight", 3, *rows_in(G, N)),
        "mamba/in_dt": (m + "in_proj.weight", 4, *rows_in(Hm)),
        # conv channels: [x (Hm·P), B (G·N), C (G·N)]
        "mamba/conv_x": (m + "conv1d.weight", 0, *taps(Hm, P)),
        "mamba/conv_B": (m + "conv1d.weight", 1, *taps(G, N)),
        "mamba/conv_C": (m + "conv1d.weight", 2, *taps(G, N)),
        "mamba/dt_bias": (m + "dt_bias", -1, *same),
        "mamba/A_log": (m + "A_log", -1, *same),
        "mamba/D": (m + "D", -1, *same),
        "mamba/gate_norm": (m + "norm.weight", -1, *vec(Hm, P)),
        "mamba/out": (m + "out_proj.weight", -1, lambda w: w.T.reshape(Hm, P, D), lambda w: w.reshape(Hm * P, D).T),
        "attention/norm": ("model.layers.{i}.norm.weight", -1, *same),
        "attention/q": (m + "q_proj.weight", -1, *rows_in(Q, H)),
        "attention/k": (m + "k_proj.weight", -1, *rows_in(J, H)),
        "attention/v": (m + "v_proj.weight", -1, *rows_in(J, H)),
        "attention/o": (m + "o_proj.weight", -1, lambda w: w.T.reshape(Q, H, D), lambda w: w.reshape(Q * H, D).T),
        "mlp/norm": ("model.layers.{i}.norm.weight", -1, *same),
        "mlp/up": (m + "up_proj.weight", -1, lambda w: w.T, lambda w: w.T),
        "mlp/down": (m + "down_proj.weight", -1, lambda w: w.T, lambda w: w.T),
    }
    if c.use_conv_bias:
        table |= {"mamba/conv_x_bias": (m + "conv1d.bias", 0, *vec(Hm, P)),
                  "mamba/conv_B_bias": (m + "conv1d.bias", 1, *vec(G, N)),
                  "mamba/conv_C_bias": (m + "conv1d.bias", 2, *vec(G, N))}
    return {path: entry for path, entry in table.items() if "/" not in path or c.count(path.split("/")[0])}


def _fused_sizes(c: NemotronHConfig, hf_name: str) -> list[int]:
    di, GN = c.mamba_inner, c.n_groups * c.ssm_state_size
    if hf_name.endswith("in_proj.weight"):
        return [di, di, GN, GN, c.mamba_num_heads]
    return [di, GN, GN]  # conv1d weight / bias channels


def _hf_layers(c: NemotronHConfig, block_type: str) -> list[int]:
    """HF block indices of one type, in order (its stack's order)."""
    return [z for z, t in enumerate(c.block_types) if t == block_type]


def _hf_shape(c: NemotronHConfig, hf_name: str) -> tuple[int, ...]:
    """The exact shape config.json implies for an HF tensor (fused ones whole)."""
    D, V, di, Hm = c.hidden_size, c.vocab_size, c.mamba_inner, c.mamba_num_heads
    conv_dim = di + 2 * c.n_groups * c.ssm_state_size
    suffix_shapes = {
        "embeddings.weight": (V, D), "norm_f.weight": (D,), "lm_head.weight": (V, D),
        ".norm.weight": (D,), "in_proj.weight": (di + conv_dim + Hm, D), "conv1d.weight": (conv_dim, 1, c.conv_kernel),
        "conv1d.bias": (conv_dim,), "dt_bias": (Hm,), "A_log": (Hm,), "mixer.D": (Hm,), "mixer.norm.weight": (di,),
        "out_proj.weight": (D, di), "q_proj.weight": (c.num_heads * c.head_dim, D),
        "k_proj.weight": (c.num_kv_heads * c.head_dim, D), "v_proj.weight": (c.num_kv_heads * c.head_dim, D),
        "o_proj.weight": (D, c.num_heads * c.head_dim), "up_proj.weight": (c.intermediate_size, D),
        "down_proj.weight": (D, c.intermediate_size),
    }
    # The longest matching suffix decides (".norm.weight" also ends "mixer.norm.weight").
    match = max((s for s in suffix_shapes if hf_name.endswith(s)), key=len)
    return suffix_shapes[match]


# ---------------------------------------------------------------- import

def load_hf(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules=None,
            **config_overrides) -> NemotronH:
    """A NemotronH with the weights of a local HF folder; with a `mesh` (and logical `rules`,
    default rlp_jax.sharding.DEFAULT_RULES) each stacked parameter is placed with its sharding.
    `config_overrides` set e.g. `param_dtype`, `dtype`, `remat`."""
    from rlp_jax import sharding

    folder = Path(folder)
    config = config_from_hf(read_config(folder), **config_overrides)
    tensors = SafetensorsFolder(folder)
    abstract = nnx.eval_shape(lambda: _unsharded(config))
    state = nnx.state(abstract, nnx.Param)
    shapes = flat(nnx.to_pure_dict(state))
    with nnx.logical_axis_rules(()):
        specs = flat(nnx.to_pure_dict(nnx.get_partition_spec(state)))
    param_dtype = jnp.dtype(config.param_dtype)
    # Checkpoints on disk name the body `backbone.*` (transformers renames it `model.*` on load).
    prefix = "model." if "model.embeddings.weight" in tensors.weight_map else "backbone."

    def fetch(name):
        w = tensors.get(_disk_name(name, prefix))
        want = _hf_shape(config, name)
        if tuple(w.shape) != want:
            raise HFFormatError(f"tensor {name!r} has shape {tuple(w.shape)}, but config.json implies "
                                f"{want}; the folder's config and weights disagree.")
        return w.astype(param_dtype)

    # A fused tensor (in_proj, conv1d) is read once and split; each piece waits here for its entry.
    pieces: dict[tuple[str, int], jax.Array] = {}

    def fetch_piece(name, piece):
        if (name, piece) not in pieces:
            w, start = fetch(name), 0
            for p, size in enumerate(_fused_sizes(config, name)):
                pieces[(name, p)] = w[start:start + size]
                start += size
        return pieces.pop((name, piece))

    loaded = {}
    for path, (pattern, piece, to_ours, _) in _tensor_map(config).items():
        if "{i}" in pattern:
            read = (lambda n: fetch_piece(n, piece)) if piece >= 0 else fetch
            value = jnp.stack([to_ours(read(pattern.format(i=i))) for i in _hf_layers(config, path.split("/")[0])])
        else:
            value = to_ours(fetch(pattern))
        if value.shape != shapes[path].shape:
            raise HFFormatError(f"tensor for {path} has shape {value.shape}, expected {shapes[path].shape}; "
                                "the folder's config and weights disagree.")
        if mesh is not None:
            spec = sharding.logical_to_mesh(tuple(specs[path]), rules or sharding.DEFAULT_RULES)
            value = jax.device_put(value, jax.sharding.NamedSharding(mesh, sharding.fit_spec(value.shape, spec, mesh)))
        loaded[path] = value
    nnx.replace_by_pure_dict(state, nest(loaded))
    nnx.update(abstract, state)
    return abstract


def _disk_name(name: str, prefix: str) -> str:
    return prefix + name[len("model."):] if name.startswith("model.") else name


def _unsharded(config: NemotronHConfig) -> NemotronH:
    with nnx.use_eager_sharding(False):
        return NemotronH(config, nnx.Rngs(0))


# ---------------------------------------------------------------- export

def params_to_hf(model: NemotronH, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, array) pairs for every weight of `model`, gathered to the host; fused HF
    tensors (in_proj, conv1d) are concatenated from their pieces."""
    c = model.config
    leaves = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    host = lambda path: np.asarray(jax.device_get(leaves[path])).astype(jnp.dtype(dtype))
    fused: dict[str, list] = {}
    for path, (pattern, piece, _, to_hf) in _tensor_map(c).items():
        if "{i}" not in pattern:
            yield pattern, np.asarray(to_hf(host(path)))
            continue
        value = host(path)
        for j, i in enumerate(_hf_layers(c, path.split("/")[0])):
            name = pattern.format(i=i)
            piece_value = np.asarray(to_hf(value[j]))
            if piece < 0:
                yield name, piece_value
            else:
                fused.setdefault(name, [None] * len(_fused_sizes(c, pattern)))[piece] = piece_value
    for name, pieces in fused.items():
        yield name, np.concatenate(pieces, axis=0)


def save_hf(model: NemotronH, folder: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Writes config.json + model.safetensors (one file; written under temporary names and renamed
    at the end, so an interrupted export never looks complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_disk_name(name, "backbone."): jnp.asarray(value) for name, value in params_to_hf(model, dtype)}
    for name, value in tensors.items():
        if tuple(value.shape) != _hf_shape(model.config, name):
            raise HFFormatError(f"tensor {name!r} would be written with shape {tuple(value.shape)}, not "
                                f"{_hf_shape(model.config, name)}; the model and its config disagree.")
    tmp_weights = folder / "model.safetensors.tmp"
    write_safetensors(tensors, tmp_weights)
    tmp_config = folder / "config.json.tmp"
    tmp_config.write_text(json.dumps(config_to_hf(model.config, dtype), indent=2))
    os.replace(tmp_weights, folder / "model.safetensors")
    os.replace(tmp_config, folder / "config.json")
    stale = folder / "model.safetensors.index.json"
    if stale.exists():  # an index from an earlier sharded export would shadow the new file
        stale.unlink()
    return folder
