"""`rlp-jax plan`: per-device memory and FLOPs of a config from shapes alone (no weights, no
accelerator), and a verdict on whether it fits, naming the knob to turn when it does not.

Each model family has its own planner, reached by the family's name (`PLANNERS`;
rlp_jax.models.families): plan_transformer.py for the Qwen3 / Llama Transformer (the exact train
state and an estimate of everything the jitted step holds: docs/launch.md), plan_hybrid.py for the
Nemotron-H hybrid (the exact train state and the rollout cache: a lower bound, as its
step's activations, logits and FLOPs are not estimated yet; docs/models.md). What they share is
plan_common.py. This module picks the planner of a config's model, and is the command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from rlp_jax import plan_common, plan_hybrid, plan_transformer
from rlp_jax.plan_common import GiB, PLATFORMS, USABLE_FRACTION  # noqa: F401  (USABLE_FRACTION: preflight's)
# The Transformer's planner is what `plan.estimate` and `plan.suggest` have always named.
from rlp_jax.plan_transformer import Estimate, estimate, suggest  # noqa: F401

# Each model family's planner by the family's name (rlp_jax.models.families). A family without one
# has no `rlp-jax plan`, and its runs start without preflight's memory check.
PLANNERS = {"transformer": plan_transformer, "nemotron_h": plan_hybrid}


# ---------------------------------------------------------------- which planner

def _platform_of(config_path: str | None) -> str | None:
    """The optional module-level `PLATFORM` of a config file (a key of PLATFORMS)."""
    if not config_path or not Path(config_path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"rlp_plan_{Path(config_path).stem}", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "PLATFORM", None)


def _run_family(config):
    """The model family of the config's model, before its config is built: by the HF folder's
    model_type, or the model_config.json of the params folder or run, at `init.path` when that is
    here; else by the family that has `model.preset`."""
    from rlp_jax.models import families
    from rlp_jax.models.safetensors_io import HFFormatError

    kind, path = config.init.kind, config.init.path
    here = kind != "scratch" and bool(path) and Path(path).exists()
    if not here:
        return families.family_for_preset(config.model.preset)
    saved = {"hf": "config.json", "params": "model_config.json", "checkpoint": "model_config.json"}.get(kind)
    if saved is None or not (Path(path) / saved).exists():
        return families.DEFAULT
    try:
        fields = json.loads((Path(path) / saved).read_text())
    except ValueError as error:  # bad JSON: one sentence
        raise ValueError(f"{path}: {error}") from None
    if kind != "hf":
        return families.family_for_json_tag(fields.get("family"))
    try:
        return families.family_for_hf_model_type(fields.get("model_type"))
    except HFFormatError:  # the default family's own reader names what it reads
        return families.DEFAULT


def _planner(family):
    if family.name not in PLANNERS:
        from rlp_jax.config import ConfigError

        raise ConfigError(f"rlp-jax plan has no planner for the {family.title} family ({family.name}) yet.")
    return PLANNERS[family.name]


def _planner_of_run(config):
    return _planner(_run_family(config))


def planner_for(model_config):
    """The planner module of `model_config`'s family, or None for a family without one."""
    from rlp_jax.models.families import family_of

    return PLANNERS.get(family_of(model_config).name)


def model_config_for(config, notes: list[str]):
    """The model config `rlp-jax train` would build, or its family planner's shapes when the
    weights or the tokenizer it needs are not on this machine (said in `notes`); and the
    tokenizer, or None."""
    return plan_common.model_config_for(
        config, notes, lambda *args: _planner_of_run(config).shapes_without_files(*args))


# ---------------------------------------------------------------- the plan

def plan(config, config_path: str | None = None, devices: int | None = None, hbm_gib: float | None = None,
         platform: str | None = None) -> dict:
    """The plan as a dict (what `rlp-jax plan --json` prints), by the planner of the model's family."""
    from rlp_jax import config as config_lib

    notes: list[str] = []
    platform = platform or _platform_of(config_path)
    if platform is not None and platform not in PLATFORMS:
        raise config_lib.ConfigError(f"platform {platform!r} is unknown; choose one of {', '.join(PLATFORMS)}.")
    config_lib.resolve_batch_tokens(config)
    shape = tuple(int(s) for s in config.mesh.shape)
    if devices is None:
        if -1 in shape:
            raise config_lib.ConfigError(f"mesh.shape {shape} has a -1; pass --devices N to say how many devices.")
        devices = math.prod(shape)
    mesh_shape = config_lib.validate_shapes(config.copy_and_resolve_references(), devices)
    spec = PLATFORMS.get(platform) if platform else None
    if hbm_gib is None and spec is not None:
        hbm_gib = spec.hbm_gib
        if hbm_gib is None and platform == "cpu":
            hbm_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / devices
            notes.append(f"CPU devices share this machine's RAM: {hbm_gib:.2f} GiB per device")
    return _planner_of_run(config).plan(config, config_path, mesh_shape, devices, spec, hbm_gib, platform, notes)


def format_plan(p: dict) -> str:
    """The plan as `rlp-jax plan` prints it (by the planner of the family it records)."""
    from rlp_jax.models import families

    return _planner(families.family_for_json_tag(p["model"].get("family"))).format_plan(p)


# ---------------------------------------------------------------- CLI

def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="per-device memory, FLOPs and a fits/does-not-fit verdict for a config (no accelerator)",
        description="rlp-jax plan --config configs/X.py [--devices N] [--hbm-gib H] [--config.a.b=value ...]")
    parser.add_argument("--config", required=True, help="config .py with get_config()")
    parser.add_argument("--devices", type=int, default=None, help="device count (default: the mesh's product)")
    parser.add_argument("--hbm-gib", type=float, default=None, help="memory per device in GiB (default: the platform's)")
    parser.add_argument("--platform", default=None, choices=sorted(PLATFORMS),
                        help="hardware (default: the config file's PLATFORM)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_platforms", "cpu")  # shapes only: never claim an accelerator
    from rlp_jax import config as config_lib

    try:
        config = config_lib.load_config(args.config, getattr(args, "overrides", []) or [])
        result = plan(config, args.config, args.devices, args.hbm_gib, args.platform)
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as error:
        print(f"rlp-jax plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result.get("fits", True) else 1
