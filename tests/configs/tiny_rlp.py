"""A tiny RLP run on the demo corpus for the trainer's reliability tests (seconds per step)."""

from rlp_jax.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.tokenizer = "demo"
    c.data.corpus = "demo"
    c.data.demo_variant = "plain"
    c.data.max_context = 10
    c.data.target_len = 1
    c.data.strategy = "marked"
    c.data.positions_per_document = 0
    c.data.marked_kinds = ("answer_start",)
    c.data.shuffle_window = 16
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.learning_rate = 1e-2
    c.train.log_every = 1
    c.rlp.num_rollouts = 2
    c.rlp.max_thought_len = 4
    c.rlp.temperature = 1.0
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 5
    c.eval.num_positions = 0
    c.mesh.shape = (8, 1, 1)
    return c
