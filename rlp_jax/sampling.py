"""Sampling from a model of any family: jitted prefill + decode on the family's own decode state
(the Transformer's rollout cache, rlp_jax.models.transformer_sampling; the Nemotron-H hybrid's
rollout cache with per-row Mamba state, rlp_jax.models.nemotron_h_sampling), reached through the family registry
(rlp_jax.models.families: `family_of(weights).sampler`).

`sample(weights, prompts, ...)` is a pure function (call it inside your own jit, e.g. a train
step); `generate(model, ...)` is the jitted convenience for a live NNX model. `sample` is exactly
`decode_loop(weights, prefill(weights, prompts, ...), key, cfg)`: the two halves are public so
that each can be run (and timed, `rlp-jax bench`) on its own. `weights_of(model)` makes the
weights, once per rollout.

What every family's sampler keeps — right-padded prompts shared by their G rows, the draw
(`next_token`), behaviour log-probs of the distribution before top-k / top-p, `lengths`,
`finished` and `next_positions` — is in rlp_jax.models.sampling_core, whose `SamplingConfig`,
`SampleOutput`, `Prefilled`, `filter_logits` and `next_token` are this module's too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlp_jax.models.families import family_of
from rlp_jax.models.sampling_core import Prefilled, SampleOutput, SamplingConfig, filter_logits, next_token

__all__ = ["SamplingConfig", "SampleOutput", "Prefilled", "filter_logits", "next_token", "weights_of", "sample",
           "prefill", "decode_loop", "generate", "generate_program", "sample_jit", "prefill_jit", "decode_loop_jit"]

Array = jax.Array


def weights_of(model: nnx.Module):
    """The weights `sample` decodes a live model with (its family's `sampler.weights`: for the
    Transformer `decode.decode_weights(model)`). Call it once per rollout, outside any loop."""
    return family_of(model).sampler.weights(model)


def sample(weights, prompts_BxP: Array, prompt_lengths_B: Array, key: Array,
           cfg: SamplingConfig, num_samples: int = 1, extra_slots: int = 0) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt. Pure; jit it (cfg static).

    `weights`: `weights_of(model)`, made once outside any loop. `extra_slots`: room in the cache
    for tokens a caller appends afterwards (`1 + target_len` for RLP scoring). `cache` of the
    result is the family's decode state (the hybrid's: its `HybridCache`).
    """
    start = prefill(weights, prompts_BxP, prompt_lengths_B, cfg, num_samples, extra_slots)
    return decode_loop(weights, start, key, cfg)


def prefill(weights, prompts_BxP: Array, prompt_lengths_B: Array, cfg: SamplingConfig,
            num_samples: int = 1, extra_slots: int = 0) -> Prefilled:
    """The first half of `sample`: each prompt's forward once, its last position's logits for
    its `num_samples` rows, and a decode state with room for `cfg.max_new_tokens + extra_slots`
    tokens per row. Pure; jit it (cfg, num_samples and extra_slots static)."""
    return family_of(weights).sampler.prefill(weights, prompts_BxP, prompt_lengths_B, cfg, num_samples, extra_slots)


def decode_loop(weights, start: Prefilled, key: Array, cfg: SamplingConfig) -> SampleOutput:
    """The second half of `sample`: `cfg.max_new_tokens` steps (fewer once every row has
    finished) from `start`, which `prefill` made with the same `cfg`. Pure; jit it (cfg static)."""
    return family_of(weights).sampler.decode_loop(weights, start, key, cfg)


# `sample` and its two halves jitted on their own (cfg, num_samples and extra_slots static).
sample_jit = jax.jit(sample, static_argnames=("cfg", "num_samples", "extra_slots"))
prefill_jit = jax.jit(prefill, static_argnames=("cfg", "num_samples", "extra_slots"))
decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg",))


def generate(model: nnx.Module, prompts_BxP: Array, prompt_lengths_B: Array, key: Array,
             cfg: SamplingConfig, num_samples: int = 1, extra_slots: int = 0) -> SampleOutput:
    """Jitted `sample` for a live NNX model of any family (compiled once per shape and config)."""
    graphdef, params = nnx.split(model)
    return generate_program(graphdef, params, jnp.asarray(prompts_BxP), jnp.asarray(prompt_lengths_B), key, cfg,
                            num_samples, extra_slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "num_samples", "extra_slots"))
def generate_program(graphdef, params, prompts_BxP, prompt_lengths_B, key, cfg, num_samples, extra_slots):
    """The jitted program of `generate` (`.lower` it over abstract inputs to compile it ahead of time)."""
    weights = weights_of(nnx.merge(graphdef, params))
    return sample(weights, prompts_BxP, prompt_lengths_B, key, cfg, num_samples, extra_slots)
