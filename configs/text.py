"""RLP on ordinary text: the default of `rlp-jax train --corpus PATH`.

Sized to run on a laptop CPU in minutes: the small `demo`-shaped model over a byte tokenizer
(any text encodes), prompts at uniformly drawn positions of each paragraph, 4 thoughts of up to
32 tokens per prompt, a held-out evaluation on 64 positions of a 5% validation split at the start
and the end. From scratch this rehearses the pipeline; for a meaningful run start from a
pretrained model (`--init-from-hf DIR`, whose shapes and tokenizer then replace these) and raise
the sizes with --config.* overrides (docs/training.md).
"""

from rlp_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "demo"
    c.tokenizer = "bytes"
    c.data.corpus = ""  # --corpus PATH ... sets it
    c.data.txt_documents = "paragraphs"
    c.data.validation_fraction = 0.05
    c.data.strategy = "uniform"
    c.data.positions_per_document = 4
    c.data.min_context = 16
    c.data.max_context = 256
    c.data.shuffle_window = 256
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 0.0
    c.train.log_every = 10
    c.rlp.num_rollouts = 4
    c.rlp.max_thought_len = 32
    c.rlp.temperature = 1.0
    c.rlp.ema_decay = 0.99
    c.checkpoint.every_steps = 50
    c.eval.every_steps = 0
    c.eval.num_positions = 64
    c.eval.batch_size = 32
    c.mesh.shape = (1, -1, 1)
    return c
