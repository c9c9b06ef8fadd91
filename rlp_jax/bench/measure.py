"""Timing, FLOP counts and a description of the machine, shared by the JAX and PyTorch sides."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Timing:
    """Seconds per call: median, min and every repetition (the warm-up calls are not in here)."""

    median_s: float
    min_s: float
    times_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "min_s": self.min_s, "times_s": self.times_s}


def _block(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


# A measurement stops after SETTLED_AFTER timed calls once their median is within SETTLED of the
# fastest (at least half of them agree; one slow outlier does not hold it up): more calls would
# not move the median, and the long ones (prefill and decode at batch 16, the update) are most of
# the bench's run time.
SETTLED_AFTER, SETTLED = 3, 0.10


def timeit(fn: Callable[..., Any], repeats: int, *, warmup: int = 1,
           setup: Callable[[], tuple] | None = None, block: Callable[[Any], None] = _block) -> Timing:
    """Calls `fn(*setup())` `warmup` times untimed (compilation, caches), then up to `repeats`
    times timed, each call blocked until its results exist; it stops early once `SETTLED_AFTER`
    or more calls have their median within `SETTLED` of their fastest. `setup` runs outside the
    timed region (fresh buffers for a function that donates its inputs)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; time at least one repetition.")
    times: list[float] = []
    for i in range(warmup + repeats):
        args = setup() if setup is not None else ()
        start = time.perf_counter()
        block(fn(*args))
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            if len(times) >= SETTLED_AFTER and statistics.median(times) <= (1 + SETTLED) * min(times):
                break
    return Timing(statistics.median(times), min(times), times)


def spread_note(name: str, t: Timing, tolerance: float = 0.25) -> str | None:
    """A sentence when `t`'s repetitions span more than `tolerance` of their median (something
    else took the cores for part of the time, or calls too short for the timer): the median is
    still reported, with this caveat."""
    spread = (max(t.times_s) - t.min_s) / t.median_s
    if spread <= tolerance:
        return None
    return (f"{name}: repetitions span {t.min_s:.3g}–{max(t.times_s):.3g} s ({spread:.0%} of their median): "
            f"a busy machine or calls too short to time; compare with care")


# ---------------------------------------------------------------- FLOPs (docs/benchmarks.md)
# Each model family's own formulas (`ModelFamily.costs`).

def _costs(c):
    from rlp_jax.models.families import family_of  # here: importing this module imports no JAX

    return family_of(c).costs


def matmul_params(c) -> int:
    """Weights that multiply every token in the decoder body (the Transformer: q, k, v, o, gate,
    up, down; the hybrid: each Mamba layer's in_proj and out_proj, each attention layer's q, k, v,
    o, each MLP layer's up and down)."""
    return _costs(c).matmul_params(c)


def forward_flops(c, rows: int, seq_len: int, scored: int) -> float:
    """Model FLOPs of one teacher-forced causal forward over `rows × seq_len` tokens whose LM head
    runs at `scored` positions per row: 2·N_mm per token, causal attention (QKᵀ and PV, only the
    key positions a query may see: Σ_i (i+1) = S(S+1)/2; the hybrid: only in its attention layers,
    plus each Mamba layer's conv and SSM per token), and 2·D·V per scored position."""
    return _costs(c).forward_flops(c, rows, seq_len, scored)


def train_flops(c, rows: int, seq_len: int, scored: int) -> float:
    """Forward + backward = 3 × forward (the backward multiplies twice as much)."""
    return 3.0 * forward_flops(c, rows, seq_len, scored)


def decode_flops_per_token(c, context: int) -> float:
    """One decode step of one row attending to `context` cached keys: body, attention, LM head
    (the hybrid: attention only in its attention layers, plus the Mamba layers' conv and SSM)."""
    return _costs(c).decode_flops_per_token(c, context)


def decode_step_bytes(c, *, prompts: int, prompt_tokens: float, rows: int, suffix_tokens: float) -> float:
    """What one decode step must read from memory, in the compute dtype: every body weight and the
    LM head once, each prompt's keys and values once (shared by its rows), and each row's own
    filled keys and values (the hybrid: see `decode_step_bytes_parts`)."""
    return sum(decode_step_bytes_parts(c, prompts=prompts, prompt_tokens=prompt_tokens, rows=rows,
                                       suffix_tokens=suffix_tokens).values())


def decode_step_bytes_parts(c, *, prompts: int, prompt_tokens: float, rows: int,
                            suffix_tokens: float) -> dict[str, float]:
    """`decode_step_bytes` piece by piece: `weights`, `kv` and, for the hybrid, `recurrent_state`.

    Attention models: the body matmul weights and the LM head, each prompt's keys and values once
    and each row's own suffix. The Nemotron-H hybrid: every weight but the embedding table (of
    which a step reads one row per token), each row's Mamba conv history ((K−1)·conv_dim per Mamba
    layer, compute dtype) and SSM state (Hm·P·N per Mamba layer, `mamba_ssm_cache_dtype`), and the
    keys and values of its attention layers, each prompt's once and each row's own suffix, as the
    Transformer's."""
    return _costs(c).decode_step_bytes(c, prompts=prompts, prompt_tokens=prompt_tokens, rows=rows,
                                                suffix_tokens=suffix_tokens)


# ---------------------------------------------------------------- the machine

def cores_used() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "cpu": _cpu_model(),
        "cores_used": cores_used(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "platform": platform.platform(),
    }
