"""A run directory's layout, and the Orbax checkpoints in it: the train state, the data
iterator's state and the config.

Saves are asynchronous and committed atomically by Orbax (a save that dies half-way leaves no
step behind). Restoring takes the abstract state with the CURRENT shardings, so a checkpoint
restores onto any mesh. If the latest step cannot be read, the previous one is used, with a
warning.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlp_jax.config import ConfigError

log = logging.getLogger(__name__)


class RunDir:
    """Where a training run keeps what it writes (`rlp-jax train --workdir PATH`).

    A workdir holds one run: `identity.json` records what makes it that run (config, model,
    corpus, tokenizer), and `bind` refuses to continue it with anything else.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.checkpoints = self.path / "checkpoints"  # Orbax steps: state, data, config
        self.start_params = self.path / "start_params"  # θ_0, for the gain against the start
        self.model_config = self.path / "model_config.json"
        self.config = self.path / "config.json"
        self.identity = self.path / "identity.json"
        self.archive = self.path / "archive"

    def is_run(self) -> bool:
        return self.model_config.exists()

    def require_run(self) -> "RunDir":
        """Itself if it is a run's workdir; else a one-sentence error naming the runs inside it
        (`rlp-jax demo` writes two: WORKDIR/warmup and WORKDIR/rlp)."""
        if self.is_run():
            return self
        if not self.path.exists():
            raise ConfigError(f"{self.path} does not exist; pass the --workdir of a training run.")
        inside = sorted(str(p.parent) for p in self.path.glob("*/model_config.json"))
        if inside:
            raise ConfigError(f"{self.path} is not a run but holds runs: {', '.join(inside)}; pass one of them as "
                              "--workdir.")
        raise ConfigError(f"{self.path} is not an rlp-jax run directory (no {self.model_config.name}); pass the "
                          "--workdir of a training run.")

    def has_history(self) -> bool:
        """Whether a run has written anything here (its config, checkpoints or metrics)."""
        return any((self.path / name).exists() for name in (self.config.name, self.checkpoints.name,
                                                            "metrics.jsonl", "eval.jsonl"))

    def bind(self, identity: dict, force_new: bool = False) -> str:
        """Checks that this workdir may hold the run `identity` describes, writing nothing.

        Returns "new" (nothing was here), "resume" (the same run), or "other" (another run is here
        and `force_new` asks to move it aside: call `archive_run`). Another run without
        `force_new` is a ConfigError. `write_identity` records the run once its inputs are good.
        """
        if not self.has_history():
            return "new"
        differences = identity_differences(self._stored_identity(), identity)
        if not differences:
            return "resume"
        if not force_new:
            raise ConfigError(
                f"{self.path} holds another run (it differs in {'; '.join(differences[:3])}); pass another "
                "--workdir, or --force-new to move that run to WORKDIR/archive/ and start afresh.")
        return "other"

    def archive_run(self) -> Path:
        """Moves everything the run here wrote (checkpoints, metrics, evaluations, corpus) to
        WORKDIR/archive/<UTC time>; only process 0 moves, every process waits for it."""
        target = self.archive / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        if jax.process_index() == 0:
            target.mkdir(parents=True)
            for entry in sorted(self.path.iterdir()):
                if entry != self.archive:
                    shutil.move(str(entry), str(target / entry.name))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rlp_jax run archived")
        return target

    def _stored_identity(self) -> dict:
        if self.identity.exists():
            return json.loads(self.identity.read_text())
        if self.config.exists():  # a run from before identity.json: its config is all there is
            return {"config": flat_config(json.loads(self.config.read_text()))}
        return {}

    def write_identity(self, identity: dict) -> None:
        if jax.process_index() == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self.identity.write_text(json.dumps(identity, indent=2, sort_keys=True))

    def latest_params(self) -> dict:
        """The newest checkpoint's params as a pure nested dict of host arrays."""
        steps = []
        if self.checkpoints.exists():
            checkpointer = Checkpointer(self.checkpoints, keep=1_000_000, create=False)
            steps = checkpointer.steps()
            checkpointer.close()
        if not steps:
            raise FileNotFoundError(f"{self.path} has no checkpoint; point at the workdir of a run "
                                    "that has saved at least one step.")
        return pure_params(restore_on_one_device(self.checkpoints / str(steps[-1]) / "state")["params"])

    def save_start_params(self, params: Any) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.start_params, params)
        checkpointer.wait_until_finished()

    def restore_start_params(self, abstract: Any | None = None) -> Any:
        """θ_0 onto `abstract`'s shardings, or (no `abstract`) as a pure dict of host arrays."""
        if abstract is not None:
            return ocp.StandardCheckpointer().restore(self.start_params, abstract)
        return pure_params(restore_on_one_device(self.start_params))


# Keys a run may change when it resumes: how long it runs and how often it logs, saves and
# evaluates; how it is laid out on devices; memory knobs that leave the maths unchanged.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.on_nonfinite", "train.check_memory", "checkpoint.",
                  "eval.", "mesh.", "model.remat", "model.attention", "rlp.rollout_microbatches",
                  "rlp.grad_accum_steps", "rlp.head_chunk_len", "rlp.update_length_buckets",
                  "rlp.cache_block_len", "rlp.rpt_proxy_batch", "data.data_dir", "data.shuffle_window")


def flat_config(tree: dict, prefix: str = "") -> dict:
    """`{"a.b": value}` for every leaf of a config dict, minus the RESUMABLE_KEYS."""
    out = {}
    for key, value in tree.items():
        name = prefix + key
        if isinstance(value, dict):
            out |= flat_config(value, name + ".")
        elif not any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUMABLE_KEYS):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def run_identity(config_dict: dict, model_config: dict, corpus: str, tokenizer: str) -> dict:
    """What makes a run the run it is (see `RunDir.bind`), as JSON-ready values."""
    model = {k: v for k, v in model_config.items() if k not in ("remat", "attention")}
    return json.loads(json.dumps({"config": flat_config(config_dict), "model": model, "corpus": corpus,
                                  "tokenizer": tokenizer}))


def identity_differences(stored: dict, new: dict) -> list[str]:
    """`key: old → new` for each difference (parts and keys `stored` lacks are not compared: a run
    made by an older rlp-jax resumes under a newer one that added keys)."""
    out = []
    for part in ("corpus", "tokenizer"):
        if part in stored and stored[part] != new.get(part):
            out.append(f"the {part} ({'its contents' if part == 'corpus' else 'vocabulary'} changed)")
    for part in ("config", "model"):
        old, cur = stored.get(part), new.get(part, {})
        if old is None:
            continue
        for key in sorted(set(old) & set(cur)):  # a key only one version of rlp-jax has is not compared
            if old[key] != cur[key]:
                out.append(f"{'model.' if part == 'model' else ''}{key}: {old[key]!r} → {cur[key]!r}")
    return out


def restore_on_one_device(path: Path) -> Any:
    """A checkpoint's arrays onto this process's first device, whatever devices saved them: Orbax
    restores onto the saving run's mesh by default and refuses another device count (an
    evaluation or export on a laptop of a run trained on a GPU host)."""
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            checkpointer.metadata(path).item_metadata)
    return checkpointer.restore(path, abstract)


def pure_params(tree: Any) -> Any:
    """A restored `nnx.State` comes back as nested dicts with each Param as `{'value': array}`;
    this strips those wrappers (what `nnx.replace_by_pure_dict` takes)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: pure_params(v) for k, v in tree.items()}
    return tree


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=create)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, config_json: str) -> None:
        """Starts an async save of step `step` (call `wait()` before relying on it)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(config_json))), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """`(step, state, data_state)` of the newest readable checkpoint, or None if there is none.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` with the shardings to restore onto.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 - any unreadable step falls back to the previous
                aside = self._set_aside(step)
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved it to %s and "
                            "trying the previous one", step, self.directory, type(error).__name__,
                            (str(error).splitlines() or [""])[0][:200], aside)
                continue
            return step, restored.state, dict(restored.data or {})
        return None

    def _set_aside(self, step: int) -> Path:
        """Moves an unreadable step out of the manager's way (kept for inspection, not deleted)."""
        aside = self.directory.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
        self._manager.reload()
        return aside

    def read_config(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored.config)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` (concrete or abstract) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
