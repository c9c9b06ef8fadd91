"""The paper's RLP recipe (configs/rlp_paper.py) for Nemotron-Nano-12B-v2 (the hybrid
Mamba-Transformer of the paper's Table 2) on one host with 8 NVIDIA H100 80GB.

Launch:   launch/gpu_host.sh --config configs/rlp_nemotron_nano_12b_h100x8.py --workdir RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
Model: `nemotron-nano-12b-v2` (docs/models.md: 62 blocks of Mamba-2, attention and ReLU² MLP,
  12.31B parameters); the run reads the weights from init.path (model_type nemotron_h).
Steps: the paper trains the 12B on 250M tokens; at the ≈ 1,660 input tokens per prompt its 1.7B
  run implies (170M over 200 × 512 prompts), that is ≈ 294 steps of 512 prompts. The paper does
  not give the 12B's steps, batch or thought length; this keeps the 1.7B recipe (G = 16, L = 2048).
Mesh (1, 8, 1) over ('data', 'fsdp', 'tensor'): pure FSDP over NVLink. The float32 state
  (parameters, EMA, two AdamW moments: 16 bytes per parameter) is 23.0 GiB per GPU.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES (Mamba heads → tensor, size 1 here; the
  recurrent state's batch rows → ('data', 'fsdp')).
Micro-batching: rollouts in 16 chunks of 32 prompts (64 thoughts per GPU, each with its own
  float32 SSM state of 140 MiB, conv state and the 6 attention layers' keys and values); one
  update per step accumulated over 32 micro-batches of 16 prompts.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA
  and SSM state.
Memory: `rlp-jax plan --config configs/rlp_nemotron_nano_12b_h100x8.py` (docs/launch.md) gives a
  lower bound for the hybrid (its step's activations are not estimated yet).
NOT LAUNCHABLE YET: compiled for its target (`rlp-jax compile`, docs/compile/rlp_nemotron_nano_12b_h100x8.json) the step
  needs 300.1 GiB per GPU of 71.2 usable; docs/launch.md says what was tried and what is left.
"""

from rlp_jax.configs import rlp_nemotron_nano_12b_h100x32 as cluster

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:1x8"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = cluster.get_config()  # the model, steps and recipe; this file sets the layout
    c.mesh.shape = (1, 8, 1)
    c.rlp.rollout_microbatches = 16
    return c
