"""`rlp-jax convert`: HF folder ⇄ rlp-jax params checkpoint (Orbax + model_config.json).

The rlp-jax side is a folder holding `model_config.json` (the config's fields) and `params/`, an
Orbax checkpoint of the parameter pytree, which restores onto any mesh. Both directions dispatch
on the model family: an HF folder's `config.json` `model_type` (`qwen3` and `llama`: the
Transformer of rlp_jax.models.hf; `nemotron_h`: the hybrid of rlp_jax.models.nemotron_h_hf), and
the `family` that `model_config.json` records (`qwen3`, `llama` or `nemotron_h`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from rlp_jax.models import hf
from rlp_jax.models.config import ModelConfig, RopeScaling
from rlp_jax.models.transformer import Transformer

CONFIG_FILE = "model_config.json"
NEMOTRON_H = "nemotron_h"  # the HF model_type, and the `family` our model_config.json records


# Fields that describe how a program is compiled, not the model: a config resolved for a platform
# (rlp_jax.models.kernels.resolve_kernels) writes the same JSON as the unresolved one.
_COMPILATION_FIELDS = ("platform",)


def config_to_json(config) -> str:
    """A ModelConfig's fields, or a NemotronHConfig's with `"family": "nemotron_h"` in front
    (without the compilation-only `platform`)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _COMPILATION_FIELDS}
    if not isinstance(config, ModelConfig):
        fields = {"family": NEMOTRON_H, **fields}
    return json.dumps(fields, indent=2)


def config_from_json(text: str):
    """The config `config_to_json` wrote: a NemotronHConfig when its family is `nemotron_h`, else
    a ModelConfig."""
    fields = json.loads(text)
    if fields.get("family") == NEMOTRON_H:
        from rlp_jax.models.nemotron_h import NemotronHConfig

        del fields["family"]
        fields["time_step_limit"] = tuple(fields["time_step_limit"])
        return NemotronHConfig(**fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def family_of_json(text: str) -> str:
    """The `family` a model_config.json records (`qwen3`, `llama` or `nemotron_h`)."""
    return json.loads(text).get("family", "")


def hf_model_type(hf_folder: str | os.PathLike) -> str | None:
    """The `model_type` of an HF folder's config.json (HFFormatError when there is none)."""
    path = Path(hf_folder) / "config.json"
    if not path.exists():
        raise hf.HFFormatError(f"{hf_folder} has no config.json; give the folder that save_pretrained wrote.")
    return json.loads(path.read_text()).get("model_type")


def _model_class(config):
    if isinstance(config, ModelConfig):
        return Transformer
    from rlp_jax.models.nemotron_h import NemotronH

    return NemotronH


def save_params(model, folder: str | os.PathLike) -> Path:
    """Writes `folder/model_config.json` and the Orbax checkpoint `folder/params` (a Transformer
    or a NemotronH)."""
    folder = Path(folder).absolute()
    if (folder / "params").exists():
        raise FileExistsError(f"{folder / 'params'} exists already; choose an empty output folder.")
    folder.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()
    (folder / CONFIG_FILE).write_text(config_to_json(model.config))
    return folder


def load_params(folder: str | os.PathLike, **config_overrides):
    """The model saved by `save_params`, a Transformer or a NemotronH by the family its
    model_config.json records (restored unsharded; reshard with jax.device_put)."""
    folder = Path(folder).absolute()
    if not (folder / CONFIG_FILE).exists() or not (folder / "params").exists():
        raise FileNotFoundError(f"{folder} is not an rlp-jax params folder (it needs {CONFIG_FILE} "
                                "and params/); create one with `rlp-jax convert --from-hf`.")
    config = config_from_json((folder / CONFIG_FILE).read_text()).replace(**config_overrides)
    model_class = _model_class(config)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_class(config, nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    target = nnx.to_pure_dict(state)
    restored = ocp.StandardCheckpointer().restore(folder / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
    return abstract


def load_hf(hf_folder: str | os.PathLike, **kwargs):
    """The model of an HF folder by its config.json's model_type: a NemotronH for `nemotron_h`,
    else a Transformer (rlp_jax.models.hf.load_hf, which refuses other model types)."""
    if hf_model_type(hf_folder) == NEMOTRON_H:
        from rlp_jax.models import nemotron_h_hf

        return nemotron_h_hf.load_hf(hf_folder, **kwargs)
    return hf.load_hf(hf_folder, **kwargs)


def save_hf(model, out_folder: str | os.PathLike, dtype: str = "float32", tokenizer=None) -> Path:
    """An HF folder of a Transformer (rlp_jax.models.hf.save_hf) or a NemotronH (nemotron_h_hf),
    with `tokenizer` (an rlp_jax.data tokenizer) as tokenizer.json + tokenizer_config.json."""
    if tokenizer is not None:  # first: the weights' config.json, written last, marks a complete folder
        from rlp_jax.data.tokenizer import hf_tokenizer_files

        Path(out_folder).mkdir(parents=True, exist_ok=True)
        for name, text in hf_tokenizer_files(tokenizer).items():
            (Path(out_folder) / name).write_text(text, encoding="utf-8")
    if isinstance(model, Transformer):
        return hf.save_hf(model, out_folder, dtype=dtype)
    from rlp_jax.models import nemotron_h_hf

    return nemotron_h_hf.save_hf(model, out_folder, dtype=dtype)


def hf_to_params(hf_folder, out_folder, **config_overrides) -> Path:
    return save_params(load_hf(hf_folder, **config_overrides), out_folder)


def params_to_hf(params_folder, out_folder, dtype: str = "float32") -> Path:
    return save_hf(load_params(params_folder), out_folder, dtype=dtype)
