"""Decoder LMs (Qwen3, Llama-3; the Nemotron-H hybrid) in Flax NNX, their presets, HF
safetensors import/export and samplers; the rest of the library reaches each through its
`ModelFamily` (family.py, registered in families.py)."""

from rlp_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from rlp_jax.models.nemotron_h import NemotronH, NemotronHConfig
from rlp_jax.models.transformer import Transformer, init_model

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "preset", "Transformer", "init_model", "NemotronH",
           "NemotronHConfig"]
