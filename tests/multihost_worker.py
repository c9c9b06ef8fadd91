"""One process of a multi-host train-step run on CPU (spawned by tests/test_train_step.py).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON  (NUM_PROCESSES=1: no jax.distributed)
"""

import json
import os
import sys

from xla_env import xla_flags

process_id, num_processes, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = xla_flags(8 // num_processes)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from rlp_jax import sharding  # noqa: E402

if num_processes > 1:
    sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlp_jax import train_step as ts  # noqa: E402
from rlp_jax.batch import prompt_batch  # noqa: E402
from rlp_jax.models import preset  # noqa: E402
from rlp_jax.rollouts import RolloutConfig  # noqa: E402

assert jax.device_count() == 8, jax.device_count()
model_config = preset("tiny", vocab_size=32)
optimizer = optax.adamw(1e-2)
cfg = ts.StepConfig(rollout=RolloutConfig(think_open_id=1, think_close_id=2, num_rollouts=4,
                                          max_thought_len=5, temperature=1.0))
mesh = sharding.make_mesh((2, 2, 2))
graphdef, state, shardings = ts.create_state_from_scratch(model_config, optimizer, 0, mesh)
rng = np.random.RandomState(0)
B = 8
full = prompt_batch(rng.randint(3, 32, (B, 9)).astype(np.int32), rng.randint(2, 10, B).astype(np.int32),
                    rng.randint(3, 32, (B, 1)).astype(np.int32))
rows = slice(process_id * B // num_processes, (process_id + 1) * B // num_processes)
batch_sharding = ts.batch_shardings(full, mesh)
step = ts.compile_train_step(graphdef, optimizer, cfg, mesh, shardings, batch_sharding)
history = []
for _ in range(2):
    batch = sharding.global_batch(jax.tree.map(lambda v: v[rows], full), batch_sharding)
    state, metrics = step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
param_sums = jax.jit(lambda p: jax.tree.map(lambda x: x.sum(), p), out_shardings=replicated)(state.params)
checksum = [float(x) for x in jax.tree.leaves(param_sums)]
if process_id == 0:
    with open(out_path, "w") as f:
        json.dump({"metrics": history, "q_sum": checksum}, f)
