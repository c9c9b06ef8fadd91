"""A tiny RLP run on the demo corpus for the trainer's reliability tests (seconds per step): the
demo's RLP stage (configs/demo.py) on the `tiny` model, 6 steps, checkpoints every 2."""

from rlp_jax.configs import demo


def get_config():
    c = demo.get_config()
    c.model.preset = "tiny"
    c.model.remat = "none"
    c.data.shuffle_window = 16
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.learning_rate = 1e-2
    c.train.weight_decay = 0.1
    c.train.log_every = 1
    c.rlp.num_rollouts = 2
    c.rlp.max_thought_len = 4
    c.rlp.ema_decay = 0.999
    c.rlp.mask_markers_in_scoring = False
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 5
    c.eval.every_steps = 0
    c.eval.num_positions = 0
    c.mesh.shape = (8, 1, 1)
    return c
