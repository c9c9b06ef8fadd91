"""Timing, FLOP counts and a description of the machine, shared by the JAX and PyTorch sides."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from rlp_jax.models.config import ModelConfig


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


def timeit(fn: Callable[..., Any], repeats: int, *, warmup: int = 1,
           setup: Callable[[], tuple] | None = None, block: Callable[[Any], None] = _block) -> Timing:
    """Calls `fn(*setup())` `warmup` times untimed (compilation, caches), then `repeats` times
    timed, each call blocked until its results exist. `setup` runs outside the timed region
    (fresh buffers for a function that donates its inputs)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; time at least one repetition.")
    times = []
    for i in range(warmup + repeats):
        args = setup() if setup is not None else ()
        start = time.perf_counter()
        block(fn(*args))
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return Timing(statistics.median(times), min(times), times)


# ---------------------------------------------------------------- FLOPs (docs/benchmarks.md)

def matmul_params(c: ModelConfig) -> int:
    """Weights that multiply every token in the decoder body: q, k, v, o, gate, up, down."""
    d, f, h, k, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return c.num_layers * (d * hd * (2 * h + 2 * k) + 3 * d * f)


def forward_flops(c: ModelConfig, rows: int, seq_len: int, scored: int) -> float:
    """Model FLOPs of one teacher-forced causal forward over `rows × seq_len` tokens whose LM head
    runs at `scored` positions per row: 2·N_mm per token, causal attention (QKᵀ and PV, only the
    key positions a query may see: Σ_i (i+1) = S(S+1)/2), and 2·D·V per scored position."""
    body = 2.0 * matmul_params(c) * rows * seq_len
    attention = 4.0 * c.num_layers * c.num_heads * c.head_dim * rows * seq_len * (seq_len + 1) / 2
    head = 2.0 * c.hidden_size * c.vocab_size * rows * scored
    return body + attention + head


def train_flops(c: ModelConfig, rows: int, seq_len: int, scored: int) -> float:
    """Forward + backward = 3 × forward (the backward multiplies twice as much)."""
    return 3.0 * forward_flops(c, rows, seq_len, scored)


def decode_flops_per_token(c: ModelConfig, context: int) -> float:
    """One decode step of one row attending to `context` cached keys: body, attention, LM head."""
    return (2.0 * matmul_params(c) + 4.0 * c.num_layers * c.num_heads * c.head_dim * context
            + 2.0 * c.hidden_size * c.vocab_size)


def decode_step_bytes(c: ModelConfig, *, prompts: int, prompt_tokens: float, rows: int,
                      suffix_tokens: float) -> float:
    """What one decode step must read from memory, in the compute dtype: every body weight and the
    LM head once, each prompt's keys and values once (shared by its rows), and each row's own
    filled keys and values."""
    itemsize = 2 if c.dtype == "bfloat16" else 4
    weights = (matmul_params(c) + c.hidden_size * c.vocab_size) * itemsize
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize
    return weights + kv_per_token * (prompts * prompt_tokens + rows * suffix_tokens)


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
