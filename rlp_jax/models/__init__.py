"""Decoder LMs (Qwen3, Llama-3; the Nemotron-H hybrid) in Flax NNX, their presets, and HF
safetensors import/export."""

from rlp_jax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from rlp_jax.models.nemotron_h import NemotronH, NemotronHConfig
from rlp_jax.models.transformer import Transformer, init_model

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "preset", "Transformer", "init_model", "NemotronH",
           "NemotronHConfig"]
