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

log = logging.getLogger(__name__)


class RunDir:
    """Where a training run keeps what it writes (`rlp-jax train --workdir PATH`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.checkpoints = self.path / "checkpoints"  # Orbax steps: state, data, config
        self.start_params = self.path / "start_params"  # θ_0, for the gain against the start
        self.model_config = self.path / "model_config.json"
        self.config = self.path / "config.json"

    def is_run(self) -> bool:
        return self.model_config.exists()

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
        return pure_params(ocp.StandardCheckpointer().restore(self.checkpoints / str(steps[-1]) / "state")["params"])

    def save_start_params(self, params: Any) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.start_params, params)
        checkpointer.wait_until_finished()

    def restore_start_params(self, abstract: Any | None = None) -> Any:
        """θ_0 onto `abstract`'s shardings, or (no `abstract`) as a pure dict of host arrays."""
        restored = ocp.StandardCheckpointer().restore(self.start_params, abstract)
        return restored if abstract is not None else pure_params(restored)


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
