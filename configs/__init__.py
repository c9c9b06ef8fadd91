"""rlp-jax's experiment configs (ml_collections), installed as the package `rlp_jax.configs`.

Each module has `get_config()`; pass a file with `--config configs/<name>.py`, or a bundled
config by name (`--config demo`). See docs/training.md for every key (`base.py`).
"""
