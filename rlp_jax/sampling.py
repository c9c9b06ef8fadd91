"""Jitted prefill + decode over a fixed-size KV cache.

`sample(graphdef, params, prompts, ...)` is a pure function (call it inside your own jit, e.g. a
train step); `generate(model, ...)` is the jitted convenience for a live NNX model.

Conventions
- Prompts are right-padded `[B, P]` with lengths `[B]`; each prompt is prefilled ONCE and its
  cache row tiled for its G samples (rows `b·G … b·G+G−1` belong to prompt b).
- Behaviour log-probs are `log softmax(logits / temperature)` at the sampled token — the
  temperature-scaled distribution BEFORE top-k / top-p truncation, i.e. exactly what
  `losses.token_logprobs(logits, tokens, temperature)` of a teacher-forced forward gives, so that
  importance ratios start at 1. (With top-k/top-p they are not the truncated sampling
  probabilities.) With temperature 0 (greedy) they are taken at temperature 1.
- `lengths` count generated tokens including a sampled stop token; `finished` says a stop token was
  sampled. Every generated token, the stop token included, is in the returned cache, and
  `next_positions = prompt_lengths + lengths` is where a caller continues feeding tokens (RLP appends
  `</think>` where a thought was truncated and then scores the true next token on this cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlp_jax.models.transformer import KVCache
from rlp_jax.sharding import constrain

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

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; sample at least 1 token.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 (greedy) or more.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to turn it off.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0; use 0 to turn it off.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens_NxL: Array  # generated tokens, pad after the stop token / beyond `lengths`
    logprobs_NxL: Array  # behaviour log-probs (see module docstring); 0 beyond `lengths`
    lengths_N: Array
    finished_N: Array  # a stop token was sampled
    cache: KVCache  # holds prompt + every generated token of each row
    next_positions_N: Array  # prompt length + generated length: the next free cache slot


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


def _next_token(logits_NxV: Array, key: Array, step: Array, cfg: SamplingConfig):
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
    scaled = logits / temperature
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


def _last_logits(model, hidden_BxPxD: Array, lengths_B: Array) -> Array:
    last_BxD = jnp.take_along_axis(hidden_BxPxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last_BxD)


def _constrain_cache(cache: KVCache) -> KVCache:
    axes = ("layers", "batch", "length", "kv_heads", None)
    return KVCache(constrain(cache.k, axes), constrain(cache.v, axes))


def sample(graphdef: nnx.GraphDef, params: nnx.State, prompts_BxP: Array, prompt_lengths_B: Array,
           key: Array, cfg: SamplingConfig, num_samples: int = 1,
           cache_len: int | None = None) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt. Pure; jit it (cfg static).

    `cache_len` (default `P + max_new_tokens`) is the cache size; give room for tokens a caller
    will append afterwards (e.g. `+ 1 + target_len` for RLP scoring).
    """
    model = nnx.merge(graphdef, params)
    B, P = prompts_BxP.shape
    G, L = num_samples, cfg.max_new_tokens
    cache_len = P + L if cache_len is None else cache_len
    if cache_len < P + L:
        raise ValueError(f"cache_len={cache_len} cannot hold {P} prompt + {L} new tokens; "
                         f"use cache_len >= {P + L}.")
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    cache = _constrain_cache(KVCache.zeros(model.config, B, cache_len))
    hidden_BxPxD, cache = model.hidden_states(prompts_BxP, positions_BxP, cache=cache)
    logits_NxV = jnp.repeat(_last_logits(model, hidden_BxPxD, prompt_lengths_B), G, axis=0)
    cache = _constrain_cache(cache.repeat(G))
    start_N = jnp.repeat(prompt_lengths_B, G)
    N = B * G
    stop_ids = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        step, finished_N = carry[0], carry[5]
        return (step < L) & ~jnp.all(finished_N)

    def body(carry):
        step, cache, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N = carry
        token_N, logprob_N = _next_token(logits_NxV, jax.random.fold_in(key, step), step, cfg)
        active_N = ~finished_N
        token_N = jnp.where(active_N, token_N, cfg.pad_id)
        tokens_NxL = tokens_NxL.at[:, step].set(token_N)
        logprobs_NxL = logprobs_NxL.at[:, step].set(jnp.where(active_N, logprob_N, 0.0))
        # Finished rows rewrite their next free slot with padding; it is overwritten later.
        feed_positions_N = start_N + lengths_N
        lengths_N = lengths_N + active_N
        finished_N = finished_N | (active_N & jnp.isin(token_N, stop_ids))
        hidden, cache = model.hidden_states(token_N[:, None], feed_positions_N[:, None], cache=cache)
        logits_NxV = model.logits(hidden[:, 0])
        return step + 1, cache, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N

    init = (jnp.int32(0), cache, logits_NxV, jnp.full((N, L), cfg.pad_id, jnp.int32),
            jnp.zeros((N, L), jnp.float32), jnp.zeros((N,), bool), jnp.zeros((N,), jnp.int32))
    _, cache, _, tokens_NxL, logprobs_NxL, finished_N, lengths_N = jax.lax.while_loop(cond, body, init)
    return SampleOutput(tokens_NxL, logprobs_NxL, lengths_N, finished_N, cache, start_N + lengths_N)


# `sample`, jitted on its own (graphdef, cfg, num_samples and cache_len static).
sample_jit = jax.jit(sample, static_argnames=("graphdef", "cfg", "num_samples", "cache_len"))


def generate(model: nnx.Module, prompts_BxP: Array, prompt_lengths_B: Array, key: Array,
             cfg: SamplingConfig, num_samples: int = 1, cache_len: int | None = None) -> SampleOutput:
    """Jitted `sample` for a live NNX model (compiled once per shape and config)."""
    graphdef, params = nnx.split(model)
    return sample_jit(graphdef, params, jnp.asarray(prompts_BxP), jnp.asarray(prompt_lengths_B),
                      key, cfg, num_samples, cache_len)
