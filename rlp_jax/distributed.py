"""Opt-in multi-host start-up from environment variables (what the scripts in `launch/` set).

`maybe_initialize_from_env()` runs at the top of `rlp-jax` before anything touches a JAX backend:

| variables | effect |
|---|---|
| none of the below | nothing: one process sees its local devices |
| `RLP_JAX_COORDINATOR=host:port`, `RLP_JAX_NUM_PROCESSES=N`, `RLP_JAX_PROCESS_ID=i` | `jax.distributed.initialize(host:port, N, i)` (CPU processes use gloo collectives) |
| `RLP_JAX_DISTRIBUTED=auto` | `jax.distributed.initialize()` with no arguments: JAX finds coordinator, process count and id itself on Cloud TPU pods and under SLURM / Open MPI |

JAX's own `JAX_LOCAL_DEVICE_IDS=0,1,...` (read by `jax.distributed.initialize`) chooses the local
GPUs of a process; under SLURM JAX otherwise gives each task only GPU `SLURM_LOCALID`.
See docs/launch.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

ENV_COORDINATOR = "RLP_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLP_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLP_JAX_PROCESS_ID"
ENV_MODE = "RLP_JAX_DISTRIBUTED"


class DistributedConfigError(ValueError):
    """The multi-host environment variables are inconsistent; the message says how to fix them."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What `maybe_initialize_from_env` will do: `mode` is 'explicit' or 'auto'."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def settings_from_env(env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The multi-host settings the environment asks for, or None for a single-process run."""
    env = os.environ if env is None else env
    mode = env.get(ENV_MODE, "").strip().lower()
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    if mode not in ("", "0", "off", "auto"):
        raise DistributedConfigError(f"{ENV_MODE}={env[ENV_MODE]!r} is not understood; set it to 'auto' (TPU "
                                     f"pods, SLURM) or leave it unset and give {ENV_COORDINATOR}.")
    if coordinator:
        if mode == "auto":
            raise DistributedConfigError(f"both {ENV_MODE}=auto and {ENV_COORDINATOR} are set; use one: auto "
                                         "discovery or an explicit coordinator.")
        if ":" not in coordinator:
            raise DistributedConfigError(f"{ENV_COORDINATOR}={coordinator!r} has no port; write it as host:port, "
                                         "e.g. localhost:12355.")
        missing = [name for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(name, "").strip()]
        if missing:
            raise DistributedConfigError(f"{ENV_COORDINATOR} is set but {' and '.join(missing)} "
                                         f"{'is' if len(missing) == 1 else 'are'} not; every process needs "
                                         "the process count and its own id.")
        count = _positive_int(ENV_NUM_PROCESSES, env[ENV_NUM_PROCESSES], minimum=1)
        index = _positive_int(ENV_PROCESS_ID, env[ENV_PROCESS_ID], minimum=0)
        if index >= count:
            raise DistributedConfigError(f"{ENV_PROCESS_ID}={index} is not below {ENV_NUM_PROCESSES}={count}; "
                                         f"ids run from 0 to {count - 1}.")
        return DistributedSettings("explicit", coordinator, count, index)
    stray = [name for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(name, "").strip()]
    if mode == "auto":
        return DistributedSettings("auto")
    if stray:
        raise DistributedConfigError(f"{' and '.join(stray)} set without {ENV_COORDINATOR}; give the "
                                     f"coordinator's host:port too, or set {ENV_MODE}=auto.")
    return None


def _positive_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise DistributedConfigError(f"{name}={raw!r} is not an integer.") from None
    if value < minimum:
        raise DistributedConfigError(f"{name}={value} must be at least {minimum}.")
    return value


def maybe_initialize_from_env(env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """Initialises `jax.distributed` when the environment asks for it (see the module docstring);
    returns the settings used, or None for a single-process run. Call it before any JAX call
    that starts a backend (`jax.devices()`, a computation, ...); calling it again is a no-op."""
    settings = settings_from_env(env)
    if settings is None:
        return None
    import jax

    from rlp_jax import sharding

    if jax.distributed.is_initialized():
        return settings
    try:
        if settings.mode == "explicit":
            sharding.initialize_distributed(settings.coordinator, settings.num_processes, settings.process_id)
        else:
            sharding.initialize_distributed()
    except RuntimeError as error:
        if "before any JAX calls" in str(error):
            raise DistributedConfigError("jax.distributed must start before JAX uses a device; call "
                                         "maybe_initialize_from_env() first thing in the program.") from error
        raise
    except ValueError as error:  # auto discovery found no cluster environment
        raise DistributedConfigError(f"{ENV_MODE}=auto found no TPU pod or SLURM environment to read the "
                                     f"process layout from ({error}); set {ENV_COORDINATOR}, "
                                     f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} instead.") from error
    return settings
