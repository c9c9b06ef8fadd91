"""What every model family's sampler shares (rlp_jax.sampling runs them; each family's own loop is
its `sampler`, rlp_jax.models.family): the `SamplingConfig`, the draw of one token from logits
(`next_token`, `filter_logits`), where a decode loop starts (`Prefilled`) and what it returns
(`SampleOutput`).

Conventions (every family's sampler)
- Prompts are right-padded `[B, P]` with lengths `[B]`; each prompt is prefilled ONCE and serves
  its G samples (rows `b·G … b·G+G−1` belong to prompt b).
- The draw at decode step u is `next_token(logits, fold_in(key, u), u, cfg)` over all N = B·G
  rows at once: the same logits give the same tokens and behaviour log-probs in every family.
- Behaviour log-probs are `log softmax(logits / temperature)` at the sampled token, with the stop
  tokens masked out before `min_new_tokens` as the draw masks them — the distribution sampled
  from BEFORE top-k / top-p truncation, i.e. exactly what `rollouts.thought_logprobs` of a
  teacher-forced forward gives, so that importance ratios start at 1. (With top-k/top-p they are
  not the truncated sampling probabilities.) With temperature 0 (greedy) they are taken at
  temperature 1.
- `lengths` count generated tokens including a sampled stop token; `finished` says a stop token was
  sampled; `next_positions = prompt_lengths + lengths`. What the returned `cache` holds is the
  family's (its sampler module says).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_tokens: tuple[int, ...] = ()
    min_new_tokens: int = 0  # stop tokens are masked before this many tokens
    pad_id: int = 0
    block_len: int = 256  # cache slots per suffix block: the granularity of what a step reads

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; sample at least 1 token.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 (greedy) or more.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to turn it off.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0; use 0 to turn it off.")
        if self.block_len < 1:
            raise ValueError(f"block_len={self.block_len} must be >= 1 cache slots.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens_NxL: Array  # generated tokens, pad after the stop token / beyond `lengths`
    logprobs_NxL: Array  # behaviour log-probs (see module docstring); 0 beyond `lengths`
    lengths_N: Array
    finished_N: Array  # a stop token was sampled
    cache: Any  # the family's decode state after the rows' tokens (its sampler module says what it holds)
    next_positions_N: Array  # prompt length + generated length: the next free position


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefilled:
    """Where the decode loop starts: the prompts prefilled once each, for N = B·G rows."""

    logits_NxV: Array  # the first generated token's logits: each prompt's, repeated to its G rows
    prompt_lengths_N: Array  # int32: the prompt length of each row, where its generated tokens go
    cache: Any  # the family's decode state of the prompts, with room for the rows' tokens


def filter_logits(logits_NxV: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Top-k then nucleus (top-p) truncation: excluded tokens get -inf."""
    neg_inf = jnp.finfo(logits_NxV.dtype).min
    if top_k and top_k < logits_NxV.shape[-1]:
        kth_largest = jax.lax.top_k(logits_NxV, top_k)[0][..., -1:]
        logits_NxV = jnp.where(logits_NxV < kth_largest, neg_inf, logits_NxV)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits_NxV, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest logit still inside the nucleus (the top token is always kept).
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_NxV = jnp.where(logits_NxV < threshold, neg_inf, logits_NxV)
    return logits_NxV


def _argmax(x_NxV: Array) -> Array:
    """`jnp.argmax(x, -1)` (the first maximum) as two plain reductions: XLA:CPU runs argmax's
    (value, index) reduction several times slower than a max and an integer min."""
    V = x_NxV.shape[-1]
    first = jnp.min(jnp.where(x_NxV == jnp.max(x_NxV, axis=-1, keepdims=True), jnp.arange(V), V), axis=-1)
    return jnp.minimum(first, V - 1)  # a row of NaNs has no maximum: the last token, not V


def next_token(logits_NxV: Array, key: Array, step: Array, cfg: SamplingConfig):
    """One token per row from `logits_NxV` as `cfg` samples (argmax at temperature 0), and its
    log-probability under the distribution drawn from (at `step`, the stop tokens are masked
    while `step < cfg.min_new_tokens`)."""
    logits = logits_NxV.astype(jnp.float32)
    if cfg.stop_tokens and cfg.min_new_tokens > 0:
        stop = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(cfg.stop_tokens)].set(True)
        logits_for_choice = jnp.where(stop & (step < cfg.min_new_tokens), -jnp.inf, logits)
    else:
        logits_for_choice = logits
    if cfg.temperature == 0:
        token = _argmax(logits_for_choice)
        temperature = 1.0
    else:
        temperature = cfg.temperature
        truncated = filter_logits(logits_for_choice / temperature, cfg.top_k, cfg.top_p)
        # jax.random.categorical(key, truncated) draws exactly this (the same Gumbel noise, the
        # same first maximum); only the argmax is cheaper.
        token = _argmax(truncated + jax.random.gumbel(key, truncated.shape, truncated.dtype))
    # The distribution drawn from (stop tokens masked before `min_new_tokens`), before top-k/top-p.
    scaled = logits_for_choice / temperature
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob
