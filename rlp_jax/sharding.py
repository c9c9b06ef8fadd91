"""Meshes and logical-axis sharding.

Model code names axes logically (`batch`, `length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`, `norm`); a rules table maps those names to mesh axes. Parameters use `embed` for
their model dimension; activations leave their model dimension unsharded (None), so `batch` and
`embed` may both map to the FSDP axis without colliding in one array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name that model and step code use (a rules table must map each).
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "norm")

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    # Mamba-2 mixers (rlp_jax.models.mamba2, Nemotron-H): heads split like attention heads; the
    # head channels, B/C groups and state size stay whole on each device.
    ("ssm_heads", "tensor"),
    ("ssm_head_dim", None),
    ("ssm_groups", None),
    ("ssm_state", None),
)


def rules_from_config(rules) -> LogicalRules:
    """A rules table from config (lists from JSON become tuples); raises on malformed entries."""
    out = []
    for logical, target in rules:
        if not isinstance(logical, str):
            raise ValueError(f"logical axis {logical!r} is not a name")
        if isinstance(target, (list, tuple)):
            target = tuple(target)
            if not all(isinstance(t, str) for t in target):
                raise ValueError(f"mesh axes {target!r} are not names")
        elif target is not None and not isinstance(target, str):
            raise ValueError(f"mesh axis {target!r} is not a name")
        out.append((logical, target))
    return tuple(out)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = DEFAULT_MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with Auto (GSPMD) axes over all devices, or a one-sentence error if they don't fit."""
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {shape} and axes {axes} differ in length; give one size per axis.")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices but {len(devices)} are "
                         f"available; set mesh.shape so its product is {len(devices)}.")
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=devices)


def logical_to_mesh(logical_axes: Sequence[str | None], rules: LogicalRules | None = None) -> P:
    """PartitionSpec for logical axis names under `rules` (default: the rules in context)."""
    rules = flax_spmd.get_logical_axis_rules() if rules is None else rules
    table = dict(rules)
    unknown = [a for a in logical_axes if a is not None and a not in table]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no entry in the sharding rules; add them to "
                         "the rules table (map to None to replicate).")
    return P(*(None if a is None else table[a] for a in logical_axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh with logical-axis rules."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, logical_to_mesh(logical_axes, rules), mesh))


def fit_spec(shape: Sequence[int], spec: P, mesh: jax.sharding.Mesh) -> P:
    """`spec` with the mesh axes dropped from every dimension they do not divide evenly (that
    dimension is then replicated), e.g. a vocabulary of 97 over a tensor axis of 2."""
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if size % ways == 0 else None)
    return P(*fitted)


def batch_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh, rules: LogicalRules | None = None
                   ) -> jax.sharding.NamedSharding:
    """An array's first dimension split over the mesh's batch axes (replicated where they do not
    divide it), the rest replicated: how evaluation and benchmark batches are placed."""
    spec = P(*logical_to_mesh(("batch",), rules), *(None,) * (len(shape) - 1))
    return jax.sharding.NamedSharding(mesh, fit_spec(shape, spec, mesh))


def place_batch(x, mesh: jax.sharding.Mesh, rules: LogicalRules | None = None) -> jax.Array:
    """A host array that every process holds whole, as a global array placed by `batch_sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(x.shape, mesh, rules), lambda index: x[index])


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedSharding per parameter (an nnx.State of annotated Params, abstract or concrete) from
    its logical axis names; dimensions a mesh axis does not divide are replicated."""
    from flax import nnx

    with flax_spmd.logical_axis_rules(()):  # keep logical names; map them with `rules` below
        specs = nnx.get_partition_spec(abstract_params)

    def to_sharding(spec, leaf):
        mesh_spec = P() if spec is None else logical_to_mesh(tuple(spec), rules)
        return jax.sharding.NamedSharding(mesh, fit_spec(leaf.shape, mesh_spec, mesh))

    return jax.tree.map(to_sharding, specs, abstract_params, is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: Any, shardings: Any):
    """Global arrays from each process's own rows (the rows of process p come p-th), for a
    batch pytree and its matching tree of shardings."""
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        shardings, local_batch)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize` for multi-host runs. On TPU pods and SLURM the arguments are
    discovered from the environment; CPU processes need them and use gloo collectives."""
    # Only the CPU backend reads this; set before any backend starts (so no device query here).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
