"""What the planners of `rlp-jax plan` share (rlp_jax.plan; each model family's own planner is
plan_transformer.py, plan_hybrid.py): the hardware table, abstract meshes and how many ways the
rules split a dimension, the exact train state of a model of any family, the model config a run
would build, and the heading of a report."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

GiB = 2**30
USABLE_FRACTION = 0.9  # of HBM, for XLA's workspace, fragmentation and the compiled program


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    hbm_gib: float | None  # per device
    peak_tflops: float | None  # dense bf16, per device


# Per JAX device. TPU v5p-N has N/2 chips (N counts TensorCores; a chip is one megacore device);
# v5e-N and v6e-N have N chips.
PLATFORMS = {
    "tpu-v5p": Platform("TPU v5p chip (95 GiB HBM)", 95.0, 459.0),
    "tpu-v5e": Platform("TPU v5e chip (16 GiB HBM)", 16.0, 197.0),
    "tpu-v6e": Platform("TPU v6e chip (32 GiB HBM)", 32.0, 918.0),
    "h100": Platform("NVIDIA H100 SXM (80 GiB HBM)", 80.0, 989.0),
    "h200": Platform("NVIDIA H200 (141 GiB HBM)", 141.0, 989.0),
    "cpu": Platform("simulated CPU device (host RAM shared by all devices)", None, None),
}


def model_config_for(config, notes: list[str], shapes_without_files: Callable):
    """The model config `rlp-jax train` would build (build.model_config), or, when the weights or
    the tokenizer it needs are not on this machine, `shapes_without_files(config, notes,
    tokenizer)`: the planner's own estimate of them (said in `notes`). Also the tokenizer, or
    None."""
    from rlp_jax import build
    from rlp_jax.config import ConfigError

    try:
        tokenizer = build.tokenizer(config)
    except ConfigError:  # a tokenizer path that exists only on the cluster
        tokenizer = None
    path_ok = config.init.kind == "scratch" or (config.init.path and Path(config.init.path).exists())
    if tokenizer is not None and path_ok:
        return build.model_config(config, tokenizer), tokenizer
    return shapes_without_files(config, notes, tokenizer), tokenizer


def suffix_len(config, tokenizer) -> int:
    template = config.rlp.prompt_template
    if not template:
        return 0
    return len(tokenizer.encode(template)) if tokenizer is not None else len(template.encode())


def abstract_mesh(shape, axes):
    import jax

    return jax.sharding.AbstractMesh(tuple(shape), tuple(axes),
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def state_bytes(config, model_config, mesh, rules) -> dict[str, int]:
    """Exact per-device bytes of each part of the train state of a model of any family under the
    logical-axis `rules` (`train_step.abstract_state_from_scratch`: every leaf's shape, dtype and
    sharding, nothing allocated)."""
    import jax

    from rlp_jax import build
    from rlp_jax import train_step as ts

    _, abstract, shardings, _ = ts.abstract_state_from_scratch(
        model_config, build.optimizer(config), config.seed, mesh, rules, with_reference=build.needs_reference(config))

    def size(tree, tree_shardings) -> int:
        leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)
        return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, specs))

    return {"params": size(abstract.params, shardings.params),
            "ema": size(abstract.ema_params, shardings.ema_params),
            "optimizer": size(abstract.opt_state, shardings.opt_state),
            "reference": 0 if abstract.ref_params is None else size(abstract.ref_params, shardings.ref_params),
            "other": size((abstract.step, abstract.rng), (shardings.step, shardings.rng))}


class Ways:
    """How many ways the real rules split a dimension (1 where the mesh axes do not divide it)."""

    def __init__(self, mesh, rules):
        from rlp_jax import sharding

        self.mesh, self.sharding, self.rules = mesh, sharding, rules

    def __call__(self, logical: str, size: int) -> int:
        spec = self.sharding.fit_spec((size,), self.sharding.logical_to_mesh((logical,), self.rules), self.mesh)
        names = () if spec[0] is None else (spec[0] if isinstance(spec[0], tuple) else (spec[0],))
        return math.prod(self.mesh.shape[n] for n in names)


def split_rows(total: int, ways: int, warnings: list[str], what: str) -> int:
    if total % ways == 0:
        return total // ways
    warnings.append(f"{what}: {total} rows do not divide over the {ways} batch devices, so every device "
                    f"computes all {total} (choose the knob so the rows are a multiple of {ways})")
    return total


def state_lines(p: dict, model_line: str):
    """The plan's heading, notes and train-state memory lines (shared by every planner), the
    number formatter, and the unit and scale it chose."""
    unit, scale = ("GiB", 1) if p["peak_gib"] >= 1 else ("MiB", 1024)
    g = lambda x: f"{x * scale:9.3f}"  # noqa: E731
    mem = p["memory_gib"]
    lines = [f"rlp-jax plan: {p['config'] or 'config'}", model_line,
             f"mesh {tuple(p['mesh_shape'])} over {tuple(p['mesh_axes'])} = {p['devices']} devices"
             + (f" of {p['platform']}" if p["platform"] else "")]
    lines += [f"note: {n}" for n in p["notes"]]
    lines += ["", f"per-device memory ({unit})",
              f"  params                       {g(mem['params'])}",
              f"  EMA teacher (float32)        {g(mem['ema'])}",
              f"  optimizer (AdamW moments)    {g(mem['optimizer'])}",
              f"  reference policy (KL)        {g(mem['reference'])}"]
    return lines, g, unit, scale


def phase_lines(p: dict, g: Callable[[float], str], scale: float) -> list[str]:
    """One line per phase of a plan: its total, its terms, and the peak marked."""
    lines = []
    for phase, terms in p["phases_gib"].items():
        detail = ", ".join(f"{k} {v * scale:.2f}" for k, v in terms.items())
        mark = "  <- peak" if phase == p["peak_phase"] else ""
        lines.append(f"    {phase:<26} {g(sum(terms.values()))}   ({detail}){mark}")
    return lines
