"""Model shapes: one frozen dataclass for the Qwen3 and Llama-3 families, and named presets.

Preset shapes are typed in from the published HF configs; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["qwen3", "llama"]
RematPolicy = Literal["none", "full", "dots_saveable"]
AttentionKernel = Literal["auto", "xla", "cudnn", "splash"]
Platform = Literal["cpu", "gpu", "tpu"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: RematPolicy = "none"
    # Self-attention of the teacher-forced forward and the prefill: "auto" picks the fused kernel
    # of `platform` (cuDNN flash attention on NVIDIA GPUs, Pallas splash attention on TPUs) and
    # the XLA path on CPU; or force one (rlp_jax.models.kernels.attention_kernel).
    attention: AttentionKernel = "auto"
    # The platform the program is compiled for, set by rlp_jax.models.kernels.resolve_kernels
    # (None: unresolved, the XLA paths). Not part of the model: config_to_json leaves it out.
    platform: Platform | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                             f"{self.num_kv_heads}; choose head counts that divide.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ValueError(f"remat={self.remat!r} is unknown; use 'none', 'full' or 'dots_saveable'.")
        if self.attention not in ("auto", "xla", "cudnn", "splash"):
            raise ValueError(f"attention={self.attention!r} is unknown; use 'auto', 'xla', 'cudnn' or 'splash'.")
        if self.platform not in (None, "cpu", "gpu", "tpu"):
            raise ValueError(f"platform={self.platform!r} is unknown; use 'cpu', 'gpu' or 'tpu' "
                             "(rlp_jax.models.kernels.resolve_kernels sets it).")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each head's queries and keys; Llama does not."""
        return self.family == "qwen3"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * hd * (2 * h + 2 * kv) + (2 * hd if self.qk_norm else 0)
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d


_LLAMA32_ROPE = RopeScaling(32.0, 1.0, 4.0, 8192)
_LLAMA31_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)


def _qwen3(hidden, layers, heads, kv, intermediate, tied, **kw) -> ModelConfig:
    return ModelConfig("qwen3", 151936, hidden, layers, heads, kv, 128, intermediate, tied,
                       1_000_000.0, 1e-6, 40960, **kw)


def _llama(hidden, layers, heads, kv, head_dim, intermediate, tied, rope, **kw) -> ModelConfig:
    return ModelConfig("llama", 128256, hidden, layers, heads, kv, head_dim, intermediate, tied,
                       500_000.0, 1e-5, 131072, rope, **kw)


PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 8, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 8, 9728, True),
    "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288, False),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 64, 8192, True, _LLAMA32_ROPE),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 128, 8192, True, _LLAMA32_ROPE),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 128, 14336, False, _LLAMA31_ROPE),
    # Test and CPU sizes; the vocabulary is set by the tokenizer in use.
    "tiny": ModelConfig("qwen3", 256, 64, 2, 4, 2, 16, 128, False, 10_000.0, 1e-6, 512),
    "demo": ModelConfig("qwen3", 64, 128, 3, 4, 2, 32, 384, True, 10_000.0, 1e-6, 256),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with optional field overrides (e.g. `vocab_size=`, `dtype=`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides)
