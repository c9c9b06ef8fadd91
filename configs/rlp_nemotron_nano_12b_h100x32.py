"""The paper's RLP recipe (configs/rlp_paper.py) for Nemotron-Nano-12B-v2 (the hybrid
Mamba-Transformer of the paper's Table 2) on a SLURM cluster of 4 hosts × 8 NVIDIA H100 80GB.

Launch:   sbatch --nodes=4 launch/slurm_gpu.sbatch configs/rlp_nemotron_nano_12b_h100x32.py RUN \
              --config.init.path=HF_DIR --config.tokenizer=HF_DIR --config.data.corpus=FILES
Model: `nemotron-nano-12b-v2` (docs/models.md: 62 blocks of Mamba-2, attention and ReLU² MLP,
  12.31B parameters); the run reads the weights from init.path (model_type nemotron_h).
Steps: the paper trains the 12B on 250M tokens; at the ≈ 1,660 input tokens per prompt its 1.7B
  run implies (170M over 200 × 512 prompts), that is ≈ 294 steps of 512 prompts. The paper does
  not give the 12B's steps, batch or thought length; this keeps the 1.7B recipe (G = 16, L = 2048).
Mesh (4, 4, 2) over ('data', 'fsdp', 'tensor'): fsdp (4) and tensor parallelism (2) inside a
  host over NVLink, data (4) across hosts. The float32 state (parameters, EMA, two AdamW moments:
  16 bytes per parameter) is 23.5 GiB per GPU. Tensor parallelism halves the sampler's bf16 copy
  of the weights (unsplit over fsdp: 21.7 GiB at fsdp 8 alone, 10.8 here).
Logical-axis rules: rlp_jax.sharding.DEFAULT_RULES (Mamba heads, attention heads, MLP and
  vocabulary → tensor; the rollout rows → ('data', 'fsdp')).
Micro-batching: rollouts in 8 chunks of 64 prompts (64 thoughts per GPU, each with its own
  float32 SSM state of 70 MiB after the tensor split, conv state and the 6 attention layers' keys
  and values); one update per step accumulated over 128 micro-batches of 4 prompts (4 thoughts
  per GPU).
Sized by `rlp-jax compile` (docs/launch.md): as mesh (4, 8, 1) with 32 update micro-batches the
  step needed 102.8 GiB per GPU of 71.2 usable, and at one update row per GPU still about 73;
  the hybrid's update holds about 4.2 GiB per row of 4,097 tokens. This layout needs 60.8 GiB.
Remat and dtypes: remat 'full'; bf16 compute, float32 parameters, AdamW moments, gradients, EMA
  and SSM state.
Memory: `rlp-jax compile --config configs/rlp_nemotron_nano_12b_h100x32.py` gives the compiler's
  count; `rlp-jax plan` only a lower bound for the hybrid (its step's activations are not
  estimated yet).
"""

from rlp_jax.configs import rlp_paper

PLATFORM = "h100"  # hardware for `rlp-jax plan` (rlp_jax.plan.PLATFORMS)
TARGET = "h100:4x8"  # what `rlp-jax compile` compiles for (rlp_jax.targets)


def get_config():
    c = rlp_paper.get_config()
    c.model.preset = "nemotron-nano-12b-v2"  # shapes for `rlp-jax plan`; the run reads them from init.path
    c.train.steps = 294
    c.mesh.shape = (4, 4, 2)
    c.rlp.rollout_microbatches = 8
    c.rlp.grad_accum_steps = 128
    return c
