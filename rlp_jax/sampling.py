"""Jitted prefill + decode over the rollout cache (rlp_jax.models.decode).

`sample(weights, prompts, ...)` is a pure function (call it inside your own jit, e.g. a train
step); `generate(model, ...)` is the jitted convenience for a live NNX model. `sample` is exactly
`decode_loop(weights, prefill(weights, prompts, ...), key, cfg)`: the two halves are public so
that each can be run (and timed, `rlp-jax bench`) on its own.

Conventions
- Prompts are right-padded `[B, P]` with lengths `[B]`; each prompt is prefilled ONCE and its keys
  and values stored once for its G samples (rows `b·G … b·G+G−1` belong to prompt b).
- The decode runs in segments of `block_len` steps; segment i reads cache blocks `0 … i` only, so a
  step reads the filled part of the cache (to a block), not its full length. The loop ends as soon
  as every row has finished.
- Behaviour log-probs are `log softmax(logits / temperature)` at the sampled token, with the stop
  tokens masked out before `min_new_tokens` as the draw masks them — the distribution sampled
  from BEFORE top-k / top-p truncation, i.e. exactly what `rollouts.thought_logprobs` of a
  teacher-forced forward gives, so that importance ratios start at 1. (With top-k/top-p they are
  not the truncated sampling probabilities.) With temperature 0 (greedy) they are taken at
  temperature 1.
- `lengths` count generated tokens including a sampled stop token; `finished` says a stop token was
  sampled. Every generated token, the stop token included, is in the returned cache (suffix slot
  u holds generated token u), and `next_positions = prompt_lengths + lengths` is where a caller
  continues (RLP appends `</think>` and the true next token(s) with `decode.extend`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlp_jax.models import decode
from rlp_jax.models.decode import DecodeWeights, RolloutCache

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
    cache: RolloutCache  # prompts once each + every generated token of each row
    next_positions_N: Array  # prompt length + generated length: the next free position


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefilled:
    """Where the decode loop starts: the prompts prefilled once each, for N = B·G rows."""

    logits_NxV: Array  # the first generated token's logits: each prompt's, repeated to its G rows
    prompt_lengths_N: Array  # int32: the prompt length of each row, where its generated tokens go
    cache: RolloutCache  # the prompts' keys and values and empty suffix blocks (hybrid: nemotron_h.State)


def weights_of(model: nnx.Module):
    """The weights `sample` decodes a live model with: `decode.decode_weights(model)`, or for the
    Nemotron-H hybrid `hybrid_sampling.decode_weights(model.weights())`. Call it once per rollout,
    outside any loop."""
    from rlp_jax.models.nemotron_h import NemotronH
    if isinstance(model, NemotronH):
        from rlp_jax import hybrid_sampling
        return hybrid_sampling.decode_weights(model.weights())
    return decode.decode_weights(model)


def sample(weights: DecodeWeights, prompts_BxP: Array, prompt_lengths_B: Array, key: Array,
           cfg: SamplingConfig, num_samples: int = 1, extra_slots: int = 0) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt. Pure; jit it (cfg static).

    `weights`: `weights_of(model)`, made once outside any loop. `extra_slots`: room in the cache
    for tokens a caller appends afterwards (`1 + target_len` for RLP scoring). The Nemotron-H
    hybrid's weights sample on its recurrent state instead (rlp_jax.hybrid_sampling; `cache` is
    then that state).
    """
    start = prefill(weights, prompts_BxP, prompt_lengths_B, cfg, num_samples, extra_slots)
    return decode_loop(weights, start, key, cfg)


def prefill(weights: DecodeWeights, prompts_BxP: Array, prompt_lengths_B: Array, cfg: SamplingConfig,
            num_samples: int = 1, extra_slots: int = 0) -> Prefilled:
    """The first half of `sample`: each prompt's forward once, its last position's logits for
    its `num_samples` rows, and a cache with room for `cfg.max_new_tokens + extra_slots` tokens
    per row. Pure; jit it (cfg, num_samples and extra_slots static)."""
    if not isinstance(weights, DecodeWeights):
        from rlp_jax import hybrid_sampling
        return hybrid_sampling.prefill(weights, prompts_BxP, prompt_lengths_B, cfg, num_samples, extra_slots)
    c = weights.config
    G, L = num_samples, cfg.max_new_tokens
    N = prompts_BxP.shape[0] * G
    # Blocks no longer than the suffix needs: a short thought must not read a long block.
    block_len = min(cfg.block_len, L + extra_slots)
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    hidden_BxPxD, prefix_k, prefix_v = decode.prefill(weights, prompts_BxP, prompt_lengths_B)
    last_BxD = jnp.take_along_axis(hidden_BxPxD, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
    logits_NxV = jnp.repeat(decode.logits(weights, last_BxD), G, axis=0)
    blocks = [decode.empty_block(c, N, block_len) for _ in range(decode.num_blocks(L + extra_slots, block_len))]
    cache = RolloutCache(prefix_k, prefix_v, prompt_lengths_B, tuple(k for k, _ in blocks), tuple(v for _, v in blocks))
    return Prefilled(logits_NxV, jnp.repeat(prompt_lengths_B, G), cache)


def decode_loop(weights: DecodeWeights, start: Prefilled, key: Array, cfg: SamplingConfig) -> SampleOutput:
    """The second half of `sample`: `cfg.max_new_tokens` steps (fewer once every row has
    finished) from `start`, which `prefill` made with the same `cfg`. Pure; jit it (cfg static)."""
    if not isinstance(weights, DecodeWeights):
        from rlp_jax import hybrid_sampling
        return hybrid_sampling.decode_loop(weights, start, key, cfg)
    N, L = start.logits_NxV.shape[0], cfg.max_new_tokens
    cache, block_len = start.cache, start.cache.block_len
    stop_ids = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    state = (jnp.int32(0), start.logits_NxV, jnp.full((N, L), cfg.pad_id, jnp.int32), jnp.zeros((N, L), jnp.float32),
             jnp.zeros((N,), bool), jnp.zeros((N,), jnp.int32))
    # Segment i: steps i·block_len … while no row writes past block i, reading blocks 0 … i.
    for i in range(decode.num_blocks(L, block_len)):
        state, cache = _decode_segment(weights, cache, state, key, cfg, i, min((i + 1) * block_len, L), stop_ids)
    _, _, tokens_NxL, logprobs_NxL, finished_N, lengths_N = state
    return SampleOutput(tokens_NxL, logprobs_NxL, lengths_N, finished_N, cache, start.prompt_lengths_N + lengths_N)


def _decode_segment(weights, cache: RolloutCache, state, key, cfg: SamplingConfig, block: int, end: int, stop_ids):
    """Decode steps up to `end` (or until every row has finished) that write cache block `block`;
    the block is the only part of the cache the loop carries, the rest it only reads."""
    written_k, written_v = cache.block_k[block], cache.block_v[block]

    def cond(carry):
        step, finished_N = carry[0][0], carry[0][4]
        return (step < end) & ~jnp.all(finished_N)

    def body(carry):
        (step, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N), block_k, block_v = carry
        token_N, logprob_N = next_token(logits_NxV, jax.random.fold_in(key, step), step, cfg)
        active_N = ~finished_N
        token_N = jnp.where(active_N, token_N, cfg.pad_id)
        tokens_NxL = tokens_NxL.at[:, step].set(token_N)
        logprobs_NxL = logprobs_NxL.at[:, step].set(jnp.where(active_N, logprob_N, 0.0))
        # Active rows write generated token `step` into slot `step`; finished rows nothing.
        slots_N = jnp.where(active_N, lengths_N, -1)
        lengths_N = lengths_N + active_N
        finished_N = finished_N | (active_N & jnp.isin(token_N, stop_ids))
        current = dataclasses.replace(cache, block_k=_with(cache.block_k, block, block_k),
                                      block_v=_with(cache.block_v, block, block_v))
        hidden, current = decode.extend(weights, current, token_N[:, None], slots_N[:, None],
                                        attend_blocks=block + 1, write_blocks=(block,))
        logits_NxV = decode.logits(weights, hidden[:, 0])
        state = (step + 1, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N)
        return state, current.block_k[block], current.block_v[block]

    state, written_k, written_v = jax.lax.while_loop(cond, body, (state, written_k, written_v))
    return state, dataclasses.replace(cache, block_k=_with(cache.block_k, block, written_k),
                                      block_v=_with(cache.block_v, block, written_v))


def _with(blocks: tuple, index: int, block) -> tuple:
    return blocks[:index] + (block,) + blocks[index + 1:]


# `sample` and its two halves jitted on their own (cfg, num_samples and extra_slots static).
sample_jit = jax.jit(sample, static_argnames=("cfg", "num_samples", "extra_slots"))
prefill_jit = jax.jit(prefill, static_argnames=("cfg", "num_samples", "extra_slots"))
decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg",))


def generate(model: nnx.Module, prompts_BxP: Array, prompt_lengths_B: Array, key: Array,
             cfg: SamplingConfig, num_samples: int = 1, extra_slots: int = 0) -> SampleOutput:
    """Jitted `sample` for a live NNX model (compiled once per shape and config); the Nemotron-H
    hybrid samples on its recurrent state (rlp_jax.hybrid_sampling.generate)."""
    from rlp_jax.models.nemotron_h import NemotronH
    if isinstance(model, NemotronH):
        from rlp_jax import hybrid_sampling
        return hybrid_sampling.generate(model, prompts_BxP, prompt_lengths_B, key, cfg, num_samples, extra_slots)
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, jnp.asarray(prompts_BxP), jnp.asarray(prompt_lengths_B), key, cfg,
                     num_samples, extra_slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "num_samples", "extra_slots"))
def _generate(graphdef, params, prompts_BxP, prompt_lengths_B, key, cfg, num_samples, extra_slots):
    weights = decode.decode_weights(nnx.merge(graphdef, params))
    return sample(weights, prompts_BxP, prompt_lengths_B, key, cfg, num_samples, extra_slots)
