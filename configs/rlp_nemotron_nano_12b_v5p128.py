"""The paper's RLP recipe (configs/rlp_paper.py) for Nemotron-Nano-12B-v2 (the hybrid
Mamba-Transformer of the paper's Table 2) on a TPU v5p-128 slice.
Hardware: v5p-128 counts TensorCores: 64 chips (one JAX device each, 95 GiB HBM) on 16 hosts of 4.

Launch:   launch/tpu_pod.sh --tpu NAME --zone ZONE -- --config configs/rlp_nemotron_nano_12b_v5p128.py \
              --workdir /mnt/shared/RUN --config.init.path=HF_DIR --config.tokenizer=HF_DIR \
              --config.data.corpus=FILES
Model: `nemotron-nano-12b-v2` (docs/models.md: 62 blocks of Mamba-2, attention and ReLU² MLP,
  12.31B parameters); the run reads the weights from init.path (model_type nemotron_h).
Steps: the paper trains the 12B on 250M tokens; at the ≈ 1,660 input tokens per prompt its 1.7B
  run implies (170M over 200 × 512 prompts), that is ≈ 294 steps of 512 prompts. The paper does
  not give the 12B's steps, batch or thought length; this keeps the 1.7B recipe (G = 16, L = 2048).
Mesh (1, 16, 4) over ('data', 'fsdp', 'tensor'): FSDP over 16 and tensor parallelism over 4
  chips, which splits the 128 Mamba heads (and with them the SSM state), the 40 query heads
  (8 key-value heads), the MLP and the vocabulary 4 ways.
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES (ssm_heads, heads, kv_heads, mlp, vocab →
  tensor; the recurrent state's batch rows → ('data', 'fsdp')).
Micro-batching: rollouts in 2 chunks of 256 prompts (256 thoughts per chip, each with its own
  float32 SSM state, 35 MiB per chip after the tensor split, conv state and the 6 attention
  layers' keys and values); one update per step accumulated over 64 micro-batches of 8 prompts
  (2 thoughts per chip). Sized by `rlp-jax compile`: with 16 micro-batches XLA:TPU ran out of
  HBM (138.7 GB of temporaries); with 64 the step needs 55.7 GiB per chip of 85.5 usable
  (docs/launch.md). The hybrid's update, not its rollouts, sets the peak.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA
  and SSM state.
Memory: `rlp-jax compile --config configs/rlp_nemotron_nano_12b_v5p128.py` gives the compiler's
  count; `rlp-jax plan` only a lower bound for the hybrid (its step's activations are not
  estimated yet).
"""

from rlp_jax.configs import rlp_nemotron_nano_12b_h100x32 as cluster

PLATFORM = "tpu-v5p"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "v5p:4x4x4"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = cluster.get_config()  # the model, steps and recipe; this file sets the layout
    c.mesh.shape = (1, 16, 4)
    c.rlp.rollout_microbatches = 2
    c.rlp.grad_accum_steps = 64
    return c
