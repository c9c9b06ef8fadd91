"""rlp-jax: RLP (Reinforcement Learning Pre-training) in JAX/Flax.

`from rlp_jax import losses` gives the objective as pure array functions and imports nothing but
JAX; the model, data and trainer modules are imported on demand.
"""

__version__ = "0.1.0"
