"""Orbax checkpoints and the run directory, directly: exact round trip with the data state and
config, the keep policy, an unreadable latest step set aside, restore onto another mesh, and the
params of a run as a pure dict."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlp_jax import checkpoint, sharding
from rlp_jax import train_step as ts
from rlp_jax.models import preset

MODEL = preset("tiny", vocab_size=32)


def _state(mesh, seed=0):
    _, state, shardings = ts.create_state_from_scratch(MODEL, optax.adamw(1e-3), seed, mesh)
    return state, shardings


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_round_trip_keep_policy_and_fallback(tmp_path):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, shardings = _state(mesh)
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        bumped = jax.tree.map(lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        saver.save(step, bumped, {"train": {"position": step}}, json.dumps({"seed": step}))
    saver.wait()
    assert saver.steps() == [2, 3]  # keep=2
    assert saver.read_config(3) == {"seed": 3}
    step, restored, data = saver.restore_latest(checkpoint.abstract_like(state, shardings))
    assert step == 3 and data == {"train": {"position": 3}}
    want = jax.tree.map(lambda x: x + 3 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    for a, b in zip(_leaves(restored), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    saver.close()
    # Destroy step 3's arrays: the restore sets it aside and falls back to step 2.
    for f in (tmp_path / "ckpt" / "3" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 7)
    reader = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    step, _, data = reader.restore_latest(checkpoint.abstract_like(state, shardings))
    reader.close()
    assert step == 2 and data == {"train": {"position": 2}}
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["3"]


def test_restore_onto_another_mesh_and_run_dir_params(tmp_path):
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, _ = _state(one, seed=4)
    run = checkpoint.RunDir(tmp_path / "run")
    saver = checkpoint.Checkpointer(run.checkpoints, keep=3)
    saver.save(5, state, {}, "{}")
    saver.close()
    eight = sharding.make_mesh((2, 2, 2))
    abstract_state, shardings = _state(eight)
    reader = checkpoint.Checkpointer(run.checkpoints)
    step, restored, _ = reader.restore_latest(checkpoint.abstract_like(abstract_state, shardings))
    reader.close()
    assert step == 5
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pure = run.latest_params()  # the pure nested dict nnx.replace_by_pure_dict takes
    for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    run.save_start_params(state.params)
    for a, b in zip(jax.tree.leaves(run.restore_start_params()), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert checkpoint.pure_params({"a": {"value": 1}, "b": {"c": {"value": 2}}}) == {"a": 1, "b": {"c": 2}}


def test_run_identity_differences_name_what_changed_and_skip_keys_one_version_lacks():
    from rlp_jax.checkpoint import identity_differences, run_identity

    config = {"seed": 0, "train": {"steps": 10, "learning_rate": 1e-6}, "model": {"preset": "demo", "remat": "none"},
              "eval": {"num_positions": 8}}
    stored = run_identity(config, {"hidden_size": 64, "remat": "none"}, "local:abc", "tok1")
    resumed = run_identity({**config, "train": {"steps": 99, "learning_rate": 1e-6}, "eval": {"num_positions": 64},
                            "model": {"preset": "demo", "remat": "full"}},
                           {"hidden_size": 64, "remat": "full"}, "local:abc", "tok1")
    assert identity_differences(stored, resumed) == []  # length, eval and remat may change on resume
    other = run_identity({**config, "train": {"steps": 10, "learning_rate": 1e-5}, "new_key": 1},
                         {"hidden_size": 32}, "local:xyz", "tok1")
    assert identity_differences(stored, other) == [
        "the corpus (its contents changed)", "train.learning_rate: 1e-06 → 1e-05", "model.hidden_size: 64 → 32"]
