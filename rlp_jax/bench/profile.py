"""`--profile DIR`: a jax.profiler trace of one call, summed per XLA operation.

The trace is written as Perfetto JSON (`*.trace.json.gz`, open it in ui.perfetto.dev) and its
executed HLO operations (fusions, dots, copies, loops) are summed by name, so the console shows
where the time of an update or a decode goes without any other tool.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable
from typing import Any

# Executed HLO instructions are named like `ynn_fusion.12`, `copy.3`, `while.7`; host-side
# events (Python frames, the runtime's bookkeeping) are not.
_HLO_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.[0-9]+)?$")


def top_ops(fn: Callable[[], Any], folder: str, limit: int = 15) -> dict[str, Any]:
    """Runs `fn` once untimed (compilation), then once under the profiler; the `limit` costliest
    XLA operations by total time, and where the trace was written."""
    import jax

    jax.block_until_ready(fn())
    os.makedirs(folder, exist_ok=True)
    before = set(glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True))
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        jax.block_until_ready(fn())
    written = sorted(set(glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)) - before)
    if not written:
        return {"trace": None, "ops": []}
    with gzip.open(written[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or not _HLO_NAME.match(name):
            continue
        total_us[name] += event.get("dur", 0)
        calls[name] += 1
    # A while loop's time contains its body's operations: leave loops out of the ranking.
    ranked = [(n, t) for n, t in total_us.most_common() if not n.startswith("while")]
    return {"trace": written[-1],
            "ops": [{"name": n, "ms": t / 1e3, "calls": calls[n]} for n, t in ranked[:limit]]}


def describe(hlo_text: str, names: list[str]) -> dict[str, str]:
    """For each fusion name, the JAX operation it came from (the `op_name` XLA kept) and its shape."""
    out = {}
    for line in hlo_text.splitlines():
        stripped = line.strip()
        for name in names:
            if stripped.startswith(f"%{name} = "):
                shape = stripped.split(" = ", 1)[1].split(" ", 1)[0]
                op = stripped.split('op_name="', 1)[1].split('"', 1)[0] if 'op_name="' in stripped else ""
                out[name] = f"{shape} {op.split('/')[-1] if op else ''}".strip()
    return out
