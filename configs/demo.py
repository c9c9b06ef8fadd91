"""The bundled CPU demo's RLP stage: 3-digit addition, prompts at the first answer digit.

`rlp-jax demo` first warm-starts the model with NTP on the worked-thought corpus
(`demo_warmup_config`), then runs this config from the warm-started weights.
"""

from rlp_jax.demo import demo_rlp_config


def get_config():
    return demo_rlp_config()
