"""Which kernels a compiled program runs, chosen for the platform it is compiled for.

A program may be compiled on one machine for another (a CPU host compiling for a TPU slice or
NVIDIA GPUs), so nothing here asks `jax.default_backend()`: the caller names the target platform
once, `resolve_kernels(config, platform)` records it in the model config, and the model code
reads only that config (`attention_kernel`, and the decode loop's CPU form of the cached
attention). A config that was never resolved runs the portable XLA paths everywhere.

The recorded platform is a compilation detail, not part of the model: `config_to_json`
(rlp_jax.models.convert) leaves it out, so a run's identity and a saved model_config.json are the
same whichever platform compiled them.
"""

from __future__ import annotations

import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu"}


def platform_name(platform: str) -> str:
    """`cpu`, `gpu` (NVIDIA: cuDNN) or `tpu` for a jax platform name (`Device.platform`, or a
    topology's, where `cuda` stands for `gpu`); ValueError for anything else."""
    name = _ALIASES.get(platform.lower(), platform.lower())
    if name not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is unknown; use 'cpu', 'gpu' (NVIDIA) or 'tpu'.")
    return name


def resolve_kernels(config, platform: str):
    """`config` (a ModelConfig or NemotronHConfig) for a program compiled for `platform`
    (`cpu`, `gpu`, `tpu`; `cuda` means `gpu`): the platform recorded in `config.platform`, from
    which `attention='auto'` takes that platform's fused kernel. A forced kernel that cannot run
    there is refused with a ValueError."""
    platform = platform_name(platform)
    resolved = config.replace(platform=platform)
    setting = config.attention
    if setting == "splash" and platform != "tpu":
        raise ValueError(f"attention='splash' is the TPU kernel and this program is compiled for {platform}; "
                         "use attention='auto' or 'xla'.")
    if setting == "cudnn" and not (platform == "gpu" and cudnn_applies(config.dtype, config.head_dim)):
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU, a bfloat16 or float16 compute dtype and "
                         f"head_dim a multiple of 8 up to 128 (here: {platform}, dtype {config.dtype}, head_dim "
                         f"{config.head_dim}); use attention='auto' or 'xla'.")
    return resolved


def cudnn_applies(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention takes this compute dtype and head dimension (it allows up
    to 256 on Hopper; 128 is what every generation takes)."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def attention_kernel(setting: str, platform: str | None, dtype, head_dim: int) -> str:
    """`xla`, `cudnn` or `splash`: what `ModelConfig.attention = setting` runs for a causal
    self-attention compiled for `platform` (None: unresolved, so `auto` is the XLA path)."""
    if setting != "auto":
        return setting
    if platform == "gpu" and cudnn_applies(dtype, head_dim):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def config_attention_kernel(config) -> str:
    """The attention kernel a (resolved) config's unmasked self-attention runs."""
    return attention_kernel(config.attention, config.platform, config.dtype, config.head_dim)


def on_local_platform(model):
    """`model` (a loaded Transformer or NemotronH) resolved for the devices this process runs it on."""
    import jax

    model.config = resolve_kernels(model.config, platform_name(jax.devices()[0].platform))
    return model
