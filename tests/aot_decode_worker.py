"""Compiles the decode loops of tests/decode_loop.py for a target without its hardware and writes
the program's HLO: `python tests/aot_decode_worker.py TARGET FAMILY OUT` (FAMILY: transformer or
hybrid; run by tests/test_aot.py)."""

import sys

from rlp_jax import aot

aot.prepare_environment()

import jax  # noqa: E402

import decode_loop  # noqa: E402
from rlp_jax import targets  # noqa: E402
from rlp_jax.models import kernels  # noqa: E402

target = targets.parse(sys.argv[1])
config = {"transformer": decode_loop.small_config, "hybrid": decode_loop.hybrid_config}[sys.argv[2]]
device = aot.target_devices(target)[0]
on_device = jax.sharding.SingleDeviceSharding(device)
c = kernels.resolve_kernels(config(dtype="bfloat16"), target.platform)
abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)  # noqa: E731
probes = aot.cudnn_probes_for(targets.GPU_CHIPS[target.chip]) if target.platform == "gpu" else aot.contextlib.nullcontext()
with probes:
    run, args = decode_loop.decode_program(c, abstract=True)
    args = jax.tree.map(abstract, jax.eval_shape(lambda: args))
    hlo = jax.jit(run).lower(*args).compile().as_text()
with open(sys.argv[3], "w") as f:
    f.write(hlo)
