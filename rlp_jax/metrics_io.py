"""Where metrics go: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard event files
(WORKDIR/tensorboard) and a console progress line. Only process 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax


class MetricsWriter:
    def __init__(self, workdir: str | Path, total_steps: int, echo: Callable[[str], None] = print,
                 tensorboard: bool = True, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops the events a killed run
        wrote from there on (`keep_steps` does the same for the jsonl files)."""
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.echo = echo
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge_step)
        self._start_time = None
        self._start_step = None

    def write(self, step: int, metrics: dict[str, Any], file: str = "metrics.jsonl") -> None:
        """Appends `{"step": step, **metrics}` (scalars only) to WORKDIR/`file` and TensorBoard."""
        if not self.enabled:
            return
        scalars = {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}
        with open(self.workdir / file, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            prefix = file.removesuffix(".jsonl")
            for name, value in scalars.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{name}", value, step)
            self._tb.flush()

    def progress(self, step: int, metrics: dict[str, Any], tokens_per_step: float) -> None:
        """One console line: step, rate, ETA and the key metrics."""
        now = time.perf_counter()
        fields = [f"step {step}/{self.total_steps}"]
        if self._start_time is None:  # no rate yet: these steps included compilation
            self._start_time, self._start_step = now, step
            fields.append("(compiling; rate from the next line)")
        else:
            rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
            fields += [f"{rate:.2f} steps/s", f"{rate * tokens_per_step:,.0f} tok/s", f"ETA {_duration(eta)}"]
        # A policy step's loss is ~0 by construction (docs/training.md), so its line shows the reward
        # and the thoughts instead; the loss stays in metrics.jsonl.
        shown = _POLICY_FIELDS if "reward_mean" in metrics else _NTP_FIELDS
        fields += [f"{label} {float(metrics[name]):{spec}}" for name, label, spec in shown if name in metrics]
        if self.enabled:
            self.echo("  ".join(fields))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# (metric, label, format) of the progress line.
_POLICY_FIELDS = (("reward_mean", "reward", "+.4g"), ("reward_std", "±", ".3g"),
                  ("reward_pos_frac", "reward>0", ".0%"), ("thought_len_mean", "len", ".3g"),
                  ("entropy", "entropy", ".3g"), ("clip_frac", "clip", ".3g"), ("grad_norm", "|g|", ".3g"))
_NTP_FIELDS = (("loss", "loss", ".4g"), ("grad_norm", "|g|", ".3g"))


def _scalar(value) -> float | int | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else str(value)  # type: ignore[return-value]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def keep_steps(path: str | Path, keep: Callable[[int], bool]) -> None:
    """Rewrites a jsonl history keeping only the records whose step `keep` accepts (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if keep(int(json.loads(line)["step"]))]
    if len(kept) != len(lines):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def summed(path: str | Path, names) -> dict[str, float]:
    """`{name: sum over the records of a jsonl history}` for each of `names` that every record
    has (a count the run did not log, or logged only on some steps, is left out)."""
    rows = read_jsonl(path)
    return {name: sum(float(r[name]) for r in rows) for name in names
            if rows and all(name in r for r in rows)}


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
