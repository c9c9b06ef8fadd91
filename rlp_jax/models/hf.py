"""HF folder (config.json + safetensors) ⇄ rlp-jax params, without torch and without a network.

Import reads single-file and sharded (`model.safetensors.index.json`) checkpoints; export writes a
folder that `transformers.AutoModelForCausalLM.from_pretrained` loads as-is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax.models.config import ModelConfig, RopeScaling
from rlp_jax.models.safetensors_io import HFFormatError, SafetensorsFolder, flat, nest, read_config, write_safetensors
from rlp_jax.models.transformer import Transformer

_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


# ---------------------------------------------------------------- config.json

def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a parsed HF config.json (model_type `qwen3` or `llama`)."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise HFFormatError(f"model_type {model_type!r} is not supported; rlp-jax reads 'qwen3' and "
                            "'llama' checkpoints.")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFFormatError("checkpoints with attention or MLP biases are not supported; use a "
                            "bias-free Qwen3 or Llama checkpoint.")
    if hf.get("use_sliding_window"):
        raise HFFormatError("sliding-window attention (use_sliding_window: true) is not supported; "
                            "rlp-jax attends over the full context.")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU).")
    rope_params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise HFFormatError(f"rope_type {rope_type!r} is not supported; use 'default' or 'llama3'.")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope_params["factor"]), float(rope_params["low_freq_factor"]),
                              float(rope_params["high_freq_factor"]),
                              int(rope_params["original_max_position_embeddings"]))
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    fields = dict(
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_scaling=scaling,
    )
    return ModelConfig(**(fields | overrides))


def config_to_hf(c: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    hf = {
        "architectures": [_ARCHITECTURES[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }
    if c.family == "llama":
        hf["mlp_bias"] = False
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}
    return hf


# ---------------------------------------------------------------- tensor name mapping

def _tensor_map(c: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """rlp-jax leaf path → (HF name pattern with {i}, HF→ours transform, ours→HF transform)."""
    D, H, K, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    same = (lambda w: w, lambda w: w)
    t = (lambda w: w.T, lambda w: w.T)

    def heads_in(n):  # torch [n·hd, D] ⇄ ours [D, n, hd]
        return (lambda w: w.T.reshape(D, n, hd), lambda w: w.reshape(D, n * hd).T)

    out_proj = (lambda w: w.T.reshape(H, hd, D), lambda w: w.reshape(H * hd, D).T)
    prefix = "model.layers.{i}."
    table = {
        "layers/attn_norm": (prefix + "input_layernorm.weight", *same),
        "layers/q": (prefix + "self_attn.q_proj.weight", *heads_in(H)),
        "layers/k": (prefix + "self_attn.k_proj.weight", *heads_in(K)),
        "layers/v": (prefix + "self_attn.v_proj.weight", *heads_in(K)),
        "layers/o": (prefix + "self_attn.o_proj.weight", *out_proj),
        "layers/mlp_norm": (prefix + "post_attention_layernorm.weight", *same),
        "layers/gate": (prefix + "mlp.gate_proj.weight", *t),
        "layers/up": (prefix + "mlp.up_proj.weight", *t),
        "layers/down": (prefix + "mlp.down_proj.weight", *t),
        "embed": ("model.embed_tokens.weight", *same),
        "final_norm": ("model.norm.weight", *same),
    }
    if c.qk_norm:
        table["layers/q_norm"] = (prefix + "self_attn.q_norm.weight", *same)
        table["layers/k_norm"] = (prefix + "self_attn.k_norm.weight", *same)
    if not c.tie_embeddings:
        table["lm_head"] = ("lm_head.weight", *t)
    return table


# ---------------------------------------------------------------- import

def load_hf(folder: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
            rules=None, **config_overrides) -> Transformer:
    """A Transformer with the weights of a local HF folder.

    Layers are read one tensor at a time and stacked; with a `mesh` (and logical `rules`, default
    rlp_jax.sharding.DEFAULT_RULES) each parameter is placed with its sharding as it is built.
    `config_overrides` set e.g. `param_dtype`, `dtype`, `remat`.
    """
    from rlp_jax import sharding

    folder = Path(folder)
    config = config_from_hf(read_config(folder), **config_overrides)
    tensors = SafetensorsFolder(folder)
    abstract = nnx.eval_shape(lambda: _unsharded(config))
    state = nnx.state(abstract)
    shapes = flat(nnx.to_pure_dict(state))
    with nnx.logical_axis_rules(()):  # keep the logical names; they are mapped below
        specs = flat(nnx.to_pure_dict(nnx.get_partition_spec(state)))
    param_dtype = jnp.dtype(config.param_dtype)
    loaded = {}
    for path, (pattern, to_ours, to_hf) in _tensor_map(config).items():
        ours_shape = shapes[path].shape[1:] if "{i}" in pattern else shapes[path].shape
        # The exact HF shape, not just the element count: a transposed [n·hd, D] projection has
        # the right count and would reshape without error into scrambled weights.
        want = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(ours_shape, param_dtype)).shape

        def fetch(name):
            w = tensors.get(name)
            if tuple(w.shape) != tuple(want):
                raise HFFormatError(f"tensor {name!r} has shape {tuple(w.shape)}, but config.json "
                                    f"implies {tuple(want)}; the folder's config and weights disagree.")
            return to_ours(w.astype(param_dtype))

        if "{i}" in pattern:
            value = jnp.stack([fetch(pattern.format(i=i)) for i in range(config.num_layers)])
        else:
            value = fetch(pattern)
        if value.shape != shapes[path].shape:
            raise HFFormatError(f"tensor for {path} has shape {value.shape}, expected "
                                f"{shapes[path].shape}; the folder's config and weights disagree.")
        if mesh is not None:
            spec = sharding.logical_to_mesh(tuple(specs[path]), rules or sharding.DEFAULT_RULES)
            spec = sharding.fit_spec(value.shape, spec, mesh)
            value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
        loaded[path] = value
    nnx.replace_by_pure_dict(state, nest(loaded))
    nnx.update(abstract, state)
    return abstract


def _unsharded(config: ModelConfig) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(config, nnx.Rngs(0))


# ---------------------------------------------------------------- export

def params_to_hf(model: Transformer, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF tensor name, array) pairs for every weight of `model`, gathered to the host."""
    config = model.config
    leaves = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, (pattern, _, to_hf) in _tensor_map(config).items():
        value = jnp.asarray(jax.device_get(leaves[path])).astype(jnp.dtype(dtype))
        if "{i}" in pattern:
            for i in range(config.num_layers):
                yield pattern.format(i=i), to_hf(value[i])
        else:
            yield pattern, to_hf(value)


def save_hf(model: Transformer, folder: str | os.PathLike, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes config.json + safetensors (sharded with an index past `max_shard_bytes`).

    Files are written under a temporary name and renamed at the end, so an interrupted export
    never leaves a folder that looks complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, value in params_to_hf(model, dtype):
        nbytes = value.size * value.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = jnp.asarray(value)  # contiguous copy for the writer
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        write_safetensors(shard, tmp)
        written.append((tmp, folder / name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(v.size * v.dtype.itemsize for s in shards for v in s.values()))},
                 "weight_map": {t: n for n, s in zip(names, shards) for t in s}}
        tmp = folder / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        written.append((tmp, folder / "model.safetensors.index.json"))
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config_to_hf(model.config, dtype), indent=2))
    written.append((tmp, folder / "config.json"))
    for tmp, final in written:
        os.replace(tmp, final)
    # Weights of an earlier export with another shard count would shadow the new ones (an old index
    # for load_hf, an old model.safetensors for transformers): remove them.
    current = {final.name for _, final in written}
    for old in [folder / "model.safetensors", folder / "model.safetensors.index.json",
                *folder.glob("model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors")]:
        if old.name not in current and old.exists():
            old.unlink()
    return folder
