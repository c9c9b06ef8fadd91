"""Every config key rlp-jax reads, with its default (defined in rlp_jax/config.py).

Run: rlp-jax train --config configs/<experiment>.py --workdir DIR [--config.train.steps=100 ...]
"""

from rlp_jax.config import base_config


def get_config():
    return base_config()
