"""Every config in configs/ loads, validates for its own device and host count, and shape-initialises
— the train state (eval_shape + shardings) and one whole train step (eval_shape) — on a mesh of
that many simulated CPU devices; `rlp-jax plan`'s state sizes equal those real shardings."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from xla_env import xla_flags

from rlp_jax import config as config_lib
from rlp_jax import plan

ROOT = Path(__file__).parent.parent
CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")
MAX_DEVICES = 64  # the largest mesh among the configs (TPU v5p-128 = 64 chips)
DEVICES_PER_HOST = {"tpu-v5p": 4, "tpu-v5e": 4, "tpu-v6e": 8, "h100": 8, "h200": 8, "cpu": 4}


def layout(path: str) -> tuple[int, int]:
    """(devices, processes) a config is meant for: its mesh's product (8 where the mesh has a -1)
    and its platform's devices per host."""
    config = config_lib.load_config(str(ROOT / path))
    shape = tuple(config.mesh.shape)
    devices = 8 if -1 in shape else math.prod(shape)
    per_host = DEVICES_PER_HOST.get(plan._platform_of(str(ROOT / path)), devices)
    return devices, max(1, devices // per_host)


# Runs in a fresh interpreter with MAX_DEVICES simulated devices; each config gets a mesh over the
# first N of them. Prints one JSON object: config path -> per-device state bytes and step outputs.
WORKER = r"""
import dataclasses, functools, json, math, sys, types
import jax, jax.numpy as jnp
from flax import nnx
from rlp_jax import build, config as config_lib, plan, sharding
from rlp_jax import train_step as ts
from rlp_jax.batch import PromptBatch

results = {}
for item in json.loads(sys.argv[1]):
    path, devices, processes = item["path"], item["devices"], item["processes"]
    config = config_lib.load_config(path)
    with config.unlocked():
        config.init.kind = "scratch"  # shapes from model.preset: the weights live on the cluster
    shape = config_lib.validate(config, devices, processes)
    mesh = sharding.make_mesh(shape, config.mesh.axes, devices=jax.devices()[:devices])
    model_config, tokenizer = plan.model_config_for(config, [])
    if tokenizer is None:  # an HF tokenizer.json that is only on the cluster
        tokenizer = types.SimpleNamespace(think_open_id=1, think_close_id=2, pad_id=0,
                                          encode=lambda text: [3] * len(text))
    optimizer = build.optimizer(config)
    graphdef, abstract, shardings, _ = ts.abstract_state_from_scratch(
        model_config, optimizer, config.seed, mesh, build.rules(config), with_reference=build.needs_reference(config))
    per_device = lambda tree, sh: sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                                      for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh)))
    B, C, K = config.train.batch_size, config.data.max_context, config.data.target_len
    batch = PromptBatch(jax.ShapeDtypeStruct((B, C), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32),
                        jax.ShapeDtypeStruct((B, K), jnp.int32), jax.ShapeDtypeStruct((B, K), jnp.bool_),
                        jax.ShapeDtypeStruct((B,), jnp.bool_))
    step = functools.partial(ts.train_step, graphdef=graphdef, optimizer=optimizer,
                             cfg=build.step_config(config, tokenizer))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(build.rules(config)):
        new_state, metrics = jax.eval_shape(step, abstract, batch)
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, abstract, new_state)
    results[path] = {"mesh": list(shape), "model_params": model_config.num_params(),
                     "params": per_device(abstract.params, shardings.params),
                     "ema": per_device(abstract.ema_params, shardings.ema_params),
                     "optimizer": per_device(abstract.opt_state, shardings.opt_state),
                     "state_unchanged": all(jax.tree.leaves(same)), "metrics": sorted(metrics)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def simulated():
    items = [{"path": p, "devices": d, "processes": n} for p in CONFIG_FILES for d, n in [layout(p)]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(MAX_DEVICES)}
    result = subprocess.run([sys.executable, "-c", WORKER, json.dumps(items)], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_configs_exist_for_every_platform_of_the_issue():
    names = set(CONFIG_FILES)
    for name in ("rlp_qwen3_1p7b_v5p128", "rlp_qwen3_8b_v5p128", "rlp_qwen3_1p7b_v5e16", "rlp_qwen3_1p7b_v6e8",
                 "rlp_qwen3_1p7b_h100x8", "rlp_qwen3_1p7b_h100x32", "rlp_qwen3_8b_h100x32", "rlp_cpu_sim"):
        assert f"configs/{name}.py" in names
    assert layout("configs/rlp_qwen3_1p7b_v5p128.py") == (64, 16)
    assert layout("configs/rlp_qwen3_1p7b_h100x32.py") == (32, 4)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_validates_and_shape_initialises(path, simulated):
    devices, _ = layout(path)
    out = simulated[path]
    assert out["state_unchanged"], "the step changed a state leaf's shape or dtype"
    assert "loss" in out["metrics"] and "grad_norm" in out["metrics"]
    config = config_lib.load_config(str(ROOT / path))
    model_config, _ = plan.model_config_for(config, [])
    assert out["model_params"] == model_config.num_params()
    # The model family's planner (the hybrid's bounds its step from below).
    est = plan.planner_for(model_config).estimate(config, model_config, tuple(out["mesh"]))
    for part in ("params", "ema", "optimizer"):  # the planner's abstract mesh = the real devices
        assert est.memory[part] == out[part], part
    assert not est.warnings, est.warnings


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if Path(p).name.startswith("rlp_")
                                  and Path(p).name != "rlp_paper.py"])
def test_paper_configs_fit_their_hardware_and_are_in_the_docs(path):
    result = plan.plan(config_lib.load_config(str(ROOT / path)), str(ROOT / path))
    assert result["fits"], (path, result.get("knob"))
    assert Path(path).name in (ROOT / "docs" / "launch.md").read_text()


def test_every_accelerator_config_names_a_target_of_its_own_size():
    """`rlp-jax compile --config X` compiles for the config's TARGET: known hardware with as many
    devices as the config's mesh."""
    from rlp_jax import aot, targets

    for path in CONFIG_FILES:
        platform = plan._platform_of(str(ROOT / path))
        name = aot.config_target(str(ROOT / path))
        if platform in (None, "cpu"):
            assert name is None, path
            continue
        target = targets.parse(name)
        assert target.platform == ("tpu" if platform.startswith("tpu") else "gpu"), path
        assert target.chip == platform.removeprefix("tpu-"), path
        assert target.num_devices == layout(path)[0], path
