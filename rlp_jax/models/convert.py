"""`rlp-jax convert`: HF folder ⇄ rlp-jax params checkpoint (Orbax + model_config.json).

The rlp-jax side is a folder holding `model_config.json` (the config's fields) and `params/`, an
Orbax checkpoint of the parameter pytree, which restores onto any mesh. Both directions go
through the model family (rlp_jax.models.families): an HF folder's by its `config.json`
`model_type` (`qwen3` and `llama`: the Transformer; `nemotron_h`: the hybrid), a params folder's
by the `family` its `model_config.json` records (`qwen3`, `llama` or `nemotron_h`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from rlp_jax.models.families import family_for_hf_model_type, family_for_json_tag, family_of
from rlp_jax.models.safetensors_io import HFFormatError

CONFIG_FILE = "model_config.json"


# Fields that describe how a program is compiled, not the model: a config resolved for a platform
# (rlp_jax.models.kernels.resolve_kernels) writes the same JSON as the unresolved one.
_COMPILATION_FIELDS = ("platform",)


def config_to_json(config) -> str:
    """The config's fields after the `family` its family records (a ModelConfig's own `qwen3` or
    `llama` field, else e.g. `nemotron_h`), without the compilation-only `platform`."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _COMPILATION_FIELDS}
    return json.dumps({"family": family_of(config).json_tag(config), **fields}, indent=2)


def config_from_json(text: str):
    """The config `config_to_json` wrote, of the family its `family` names."""
    fields = json.loads(text)
    return family_for_json_tag(fields.get("family")).config_from_fields(fields)


def hf_model_type(hf_folder: str | os.PathLike) -> str | None:
    """The `model_type` of an HF folder's config.json (HFFormatError when there is none)."""
    path = Path(hf_folder) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{hf_folder} has no config.json; give the folder that save_pretrained wrote.")
    return json.loads(path.read_text()).get("model_type")


def save_params(model, folder: str | os.PathLike) -> Path:
    """Writes `folder/model_config.json` and the Orbax checkpoint `folder/params` (a model of any
    family)."""
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
    """The model saved by `save_params`, of the family its model_config.json records (restored
    unsharded; reshard with jax.device_put)."""
    folder = Path(folder).absolute()
    if not (folder / CONFIG_FILE).exists() or not (folder / "params").exists():
        raise FileNotFoundError(f"{folder} is not an rlp-jax params folder (it needs {CONFIG_FILE} "
                                "and params/); create one with `rlp-jax convert --from-hf`.")
    config = config_from_json((folder / CONFIG_FILE).read_text()).replace(**config_overrides)
    abstract = family_of(config).abstract_model(config)
    state = nnx.state(abstract, nnx.Param)
    target = nnx.to_pure_dict(state)
    restored = ocp.StandardCheckpointer().restore(folder / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
    return abstract


def load_hf(hf_folder: str | os.PathLike, **kwargs):
    """The model of an HF folder, of the family that reads its config.json's model_type
    (HFFormatError for a model_type no family reads)."""
    return family_for_hf_model_type(hf_model_type(hf_folder)).load_hf(hf_folder, **kwargs)


def save_hf(model, out_folder: str | os.PathLike, dtype: str = "float32", tokenizer=None) -> Path:
    """An HF folder of a model of any family (its family's `save_hf`), with `tokenizer` (an
    rlp_jax.data tokenizer) as tokenizer.json + tokenizer_config.json."""
    if tokenizer is not None:  # first: the weights' config.json, written last, marks a complete folder
        from rlp_jax.data.tokenizer import hf_tokenizer_files

        Path(out_folder).mkdir(parents=True, exist_ok=True)
        for name, text in hf_tokenizer_files(tokenizer).items():
            (Path(out_folder) / name).write_text(text, encoding="utf-8")
    return family_of(model).save_hf(model, out_folder, dtype=dtype)


def hf_to_params(hf_folder, out_folder, **config_overrides) -> Path:
    return save_params(load_hf(hf_folder, **config_overrides), out_folder)


def params_to_hf(params_folder, out_folder, dtype: str = "float32") -> Path:
    return save_hf(load_params(params_folder), out_folder, dtype=dtype)
