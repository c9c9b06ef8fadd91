"""`rlp-jax convert`: HF folder ⇄ rlp-jax params checkpoint (Orbax + model_config.json).

The rlp-jax side is a folder holding `model_config.json` (the ModelConfig fields) and `params/`,
an Orbax checkpoint of the parameter pytree, which restores onto any mesh.
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


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


def config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def save_params(model: Transformer, folder: str | os.PathLike) -> Path:
    """Writes `folder/model_config.json` and the Orbax checkpoint `folder/params`."""
    folder = Path(folder).absolute()
    if (folder / "params").exists():
        raise FileExistsError(f"{folder / 'params'} exists already; choose an empty output folder.")
    folder.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()
    (folder / CONFIG_FILE).write_text(config_to_json(model.config))
    return folder


def load_params(folder: str | os.PathLike, **config_overrides) -> Transformer:
    """The Transformer saved by `save_params` (restored unsharded; reshard with jax.device_put)."""
    folder = Path(folder).absolute()
    if not (folder / CONFIG_FILE).exists() or not (folder / "params").exists():
        raise FileNotFoundError(f"{folder} is not an rlp-jax params folder (it needs {CONFIG_FILE} "
                                "and params/); create one with `rlp-jax convert --from-hf`.")
    config = config_from_json((folder / CONFIG_FILE).read_text()).replace(**config_overrides)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    target = nnx.to_pure_dict(state)
    restored = ocp.StandardCheckpointer().restore(folder / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
    return abstract


def hf_to_params(hf_folder, out_folder, **config_overrides) -> Path:
    return save_params(hf.load_hf(hf_folder, **config_overrides), out_folder)


def params_to_hf(params_folder, out_folder, dtype: str = "float32") -> Path:
    return hf.save_hf(load_params(params_folder), out_folder, dtype=dtype)
