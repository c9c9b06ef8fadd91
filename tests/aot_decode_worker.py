"""Compiles the sampler of tests/decode_loop.py for a target without its hardware and writes the
program's HLO: `python tests/aot_decode_worker.py TARGET OUT` (run by tests/test_aot.py)."""

import sys

from rlp_jax import aot

aot.prepare_environment()

import jax  # noqa: E402

import decode_loop  # noqa: E402
from rlp_jax import targets  # noqa: E402
from rlp_jax.models import kernels  # noqa: E402

target = targets.parse(sys.argv[1])
device = aot.target_devices(target)[0]
on_device = jax.sharding.SingleDeviceSharding(device)
c = kernels.resolve_kernels(decode_loop.small_config(dtype="bfloat16"), target.platform)
run, params = decode_loop.sampler(c)
abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)  # noqa: E731
args = jax.tree.map(abstract, (params, *decode_loop.prompts(c.vocab_size), jax.eval_shape(lambda: jax.random.key(0))))
probes = aot.cudnn_probes_for(targets.GPU_CHIPS[target.chip]) if target.platform == "gpu" else aot.contextlib.nullcontext()
with probes:
    hlo = jax.jit(run).lower(*args).compile().as_text()
with open(sys.argv[2], "w") as f:
    f.write(hlo)
