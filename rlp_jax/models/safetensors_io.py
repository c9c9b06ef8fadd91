"""What every family's HF import/export shares: reading a local HF folder (its config.json and
its safetensors files, single or sharded), writing a safetensors file, the `HFFormatError` that
names what is wrong with a folder, and the `/`-joined paths of a nested parameter dict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
from safetensors import safe_open
from safetensors.flax import save_file


class HFFormatError(ValueError):
    """A local HF folder that rlp-jax cannot read; the message names what is wrong and the fix."""


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed config.json of an HF folder."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{folder} has no config.json; give the folder that save_pretrained wrote.")
    return json.loads(path.read_text())


class SafetensorsFolder:
    """Lazy access to the tensors of a folder's safetensors file(s)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise HFFormatError(f"{folder} holds no *.safetensors file; point to a folder saved "
                                    "with save_pretrained(safe_serialization=True).")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="flax") as st:
                    weight_map |= {name: f.name for name in st.keys()}
        self.folder, self.weight_map = folder, weight_map

    def get(self, name: str) -> jax.Array:
        if name not in self.weight_map:
            raise HFFormatError(f"tensor {name!r} is missing from {self.folder}; the checkpoint is "
                                "incomplete or of another architecture.")
        with safe_open(self.folder / self.weight_map[name], framework="flax") as st:
            return st.get_tensor(name)


def write_safetensors(tensors: dict[str, Any], path: str | os.PathLike) -> None:
    """safetensors' `save_file`, leaving the file with the mode of any other new file (the library
    writes 0600, which other users of a shared folder cannot read)."""
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def flat(tree: dict) -> dict[str, Any]:
    """A nested dict as `{"a/b/c": leaf}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= {f"{key}/{k}": v for k, v in flat(value).items()}
        else:
            out[key] = value
    return out


def nest(flat_dict: dict[str, Any]) -> dict:
    """The inverse of `flat`."""
    tree: dict = {}
    for path, value in flat_dict.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
