"""A run's train step compiled ahead of time and saved, so that the pod loads it instead of
compiling it: `rlp-jax compile --config X --save-executable DIR` on any machine, then
`rlp-jax train --config X --executable DIR` on every host (docs/launch.md).

A saved step is the compiler's output for one program. The run that loads it lowers its own step
(seconds, no compile) and must get the same program: the hash of its StableHLO text, which holds
every shape, sharding, constant (the tokenizer's marker ids, the loss's hyperparameters) and
kernel choice, must equal the saved one, with the same jax and jaxlib. Anything else is refused in
one sentence before the run's folder is written.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

from rlp_jax.config import ConfigError

MANIFEST = "manifest.json"
PAYLOAD = "train_step.bin"


class ExecutableError(ConfigError):
    """A saved step that cannot be written or used as asked; one sentence for the user."""


def program_hash(lowered) -> str:
    """SHA-256 of a lowered program's StableHLO text (without source locations)."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _versions() -> dict[str, str]:
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def check_new_folder(folder: str | Path) -> None:
    """Refuses a folder that exists (a saved step is never overwritten or mixed with another)."""
    if Path(folder).exists():
        raise ExecutableError(f"{folder} already exists; name a new folder for the saved train step.")


def save(folder: str | Path, lowered, compiled, target: str) -> int:
    """Writes `compiled` (the compile of `lowered` for `target`) to the new `folder`, whole or not
    at all; returns the size of the serialized executable in bytes."""
    from jax.experimental import serialize_executable

    folder = Path(folder)
    check_new_folder(folder)
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / PAYLOAD).write_bytes(pickle.dumps((payload, in_tree, out_tree)))
    manifest = {"program_sha256": program_hash(lowered), "target": target, **_versions()}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(folder)
    return len(payload)


def read_manifest(folder: str | Path) -> dict:
    """The saved step's manifest, after checking that this environment's JAX can load it."""
    path = Path(folder) / MANIFEST
    if not path.is_file() or not (Path(folder) / PAYLOAD).is_file():
        raise ExecutableError(f"{folder} holds no saved train step; make one with `rlp-jax compile --config CFG "
                              f"--save-executable {folder}`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ExecutableError(f"{path} is not a saved step's manifest (not JSON); save the step again.") from None
    for name, have in _versions().items():
        if manifest.get(name) != have:
            raise ExecutableError(f"{folder} was compiled with {name} {manifest.get(name)} but this run has {have}; "
                                  "compile it again with the environment the run uses.")
    return manifest


def load(folder: str | Path, lowered, devices):
    """The saved step as a `jax.stages.Compiled` on `devices` (the run's mesh, in its order), if it
    is the program `lowered` (this run's own step, lowered)."""
    from jax.experimental import serialize_executable

    manifest = read_manifest(folder)
    if manifest.get("program_sha256") != program_hash(lowered):
        raise ExecutableError(f"{folder} holds another program than this run's train step (compiled for "
                              f"{manifest.get('target')} from another config, tokenizer, mesh or rlp-jax version); "
                              "compile it again with the run's config and tokenizer.")
    try:
        payload, in_tree, out_tree = pickle.loads((Path(folder) / PAYLOAD).read_bytes())
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                         execution_devices=list(devices))
    except Exception as error:  # a truncated or damaged payload, or devices the executable was not made for
        raise ExecutableError(f"{Path(folder) / PAYLOAD} could not be loaded "
                              f"({type(error).__name__}); save the step again for these devices.") from None
