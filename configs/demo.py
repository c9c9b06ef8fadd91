"""The bundled CPU demo (`rlp-jax demo`): 3-digit addition, on any number of devices.

`warmup_config()`: the short next-token warm-up on documents with worked thoughts, so that the
model can open a thought and write partly-right column sums (a warm-up that is too good leaves RLP
nothing to learn). `get_config()`: the RLP stage from the warm-started weights, prompts at the
first answer digit. `configs/rlp_cpu_sim.py` and the trainer tests' config start from it.
`stages(task)`: both stages of a demo task, `addition` (this file), `carry`
(configs/demo_carry.py) or `cups` (configs/demo_cups.py), for `rlp-jax demo --task` and
`rlp-jax ablate --task`.
"""

from rlp_jax.config import base_config


def _base():
    """What both stages share: the demo model, tokenizer and corpus on every device."""
    c = base_config()
    c.model.preset = "demo"
    c.model.remat = "dots_saveable"  # on CPU, 2x faster backward than storing every activation
    c.tokenizer = "demo"
    c.data.corpus = "demo"
    c.data.shuffle_window = 256
    c.train.weight_decay = 0.0
    c.mesh.shape = (1, -1, 1)
    return c


def warmup_config():
    c = _base()
    c.data.demo_variant = "worked"
    c.data.kind = "documents"
    c.data.seq_len = 40
    c.rlp.objective = "ntp"
    c.train.steps = 150
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 10
    c.train.log_every = 25
    c.checkpoint.every_steps = 150
    c.checkpoint.keep = 1
    c.eval.num_positions = 0
    return c


def get_config():
    c = _base()
    c.data.demo_variant = "plain"
    c.data.max_context = 10  # BOS + "457+386=" is 9 tokens
    c.data.target_len = 1
    c.data.strategy = "marked"
    c.data.positions_per_document = 0
    c.data.marked_kinds = ("answer_start",)
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.learning_rate = 5e-5
    c.train.log_every = 10
    c.rlp.num_rollouts = 8
    c.rlp.max_thought_len = 20  # the worked thought is 17 characters + </think>
    c.rlp.temperature = 1.0
    c.rlp.ema_decay = 0.99
    c.rlp.mask_markers_in_scoring = True
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 100
    c.eval.num_positions = 512
    c.eval.batch_size = 128
    return c


DEMO_TASKS = ("addition", "carry", "cups")


def stages(task: str = "addition"):
    """`(warmup_config(), get_config())` of a demo task."""
    if task == "addition":
        return warmup_config(), get_config()
    if task == "carry":
        from rlp_jax.configs import demo_carry

        return demo_carry.warmup_config(), demo_carry.get_config()
    if task == "cups":
        from rlp_jax.configs import demo_cups

        return demo_cups.warmup_config(), demo_cups.get_config()
    raise ValueError(f"unknown demo task {task!r}; use one of {', '.join(DEMO_TASKS)}.")
