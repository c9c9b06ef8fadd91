"""The Transformer family's sampler: prefill + decode over the rollout cache
(rlp_jax.models.decode). rlp_jax.sampling runs it through the family registry; the conventions
every sampler keeps are rlp_jax.models.sampling_core's.

This sampler's own conventions
- Each prompt's keys and values are stored once for its G samples.
- The decode runs in segments of `block_len` steps; segment i reads cache blocks `0 … i` only, so a
  step reads the filled part of the cache (to a block), not its full length. The loop ends as soon
  as every row has finished.
- Every generated token, the stop token included, is in the returned cache (suffix slot u holds
  generated token u), and `next_positions = prompt_lengths + lengths` is where a caller continues
  (RLP appends `</think>` and the true next token(s) with `feed`, which may rewrite a slot).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlp_jax.models import decode
from rlp_jax.models.decode import DecodeWeights, RolloutCache
from rlp_jax.models.sampling_core import Prefilled, SampleOutput, SamplingConfig, next_token

Array = jax.Array


def weights_of(model) -> DecodeWeights:
    """The weights the sampler decodes a live Transformer with (`decode.decode_weights`)."""
    return decode.decode_weights(model)


def prefill(weights: DecodeWeights, prompts_BxP: Array, prompt_lengths_B: Array, cfg: SamplingConfig,
            num_samples: int = 1, extra_slots: int = 0) -> Prefilled:
    """Each prompt's forward once, its last position's logits for its `num_samples` rows, and a
    cache with room for `cfg.max_new_tokens + extra_slots` tokens per row. Pure; jit it (cfg,
    num_samples and extra_slots static)."""
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
    """`cfg.max_new_tokens` steps (fewer once every row has finished) from `start`, which
    `prefill` made with the same `cfg`. Pure; jit it (cfg static)."""
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
        # Active rows write generated token `step` into slot `step`; finished rows leave it empty.
        slots_N = jnp.where(active_N, lengths_N, -1)
        lengths_N = lengths_N + active_N
        finished_N = finished_N | (active_N & jnp.isin(token_N, stop_ids))
        current = dataclasses.replace(cache, block_k=_with(cache.block_k, block, block_k),
                                      block_v=_with(cache.block_v, block, block_v))
        hidden, current = decode.extend(weights, current, token_N[:, None], slots_N[:, None],
                                        attend_blocks=block + 1, write_blocks=(block,), decode_slot=step)
        logits_NxV = decode.logits(weights, hidden[:, 0])
        state = (step + 1, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N)
        return state, current.block_k[block], current.block_v[block]

    state, written_k, written_v = jax.lax.while_loop(cond, body, (state, written_k, written_v))
    return state, dataclasses.replace(cache, block_k=_with(cache.block_k, block, written_k),
                                      block_v=_with(cache.block_v, block, written_v))


def _with(blocks: tuple, index: int, block) -> tuple:
    return blocks[:index] + (block,) + blocks[index + 1:]


def feed(weights: DecodeWeights, cache: RolloutCache, tokens_NxT: Array, first_slot_N: Array
         ) -> tuple[Array, RolloutCache]:
    """`T` tokens per row written into suffix slots `first_slot_N … first_slot_N + T − 1` (slots
    already written are rewritten), attending over every block: the final-norm hidden states
    `[N, T, D]` after each, and the cache holding them."""
    blocks = cache.num_blocks
    slots_NxT = first_slot_N[:, None] + jnp.arange(tokens_NxT.shape[1])
    return decode.extend(weights, cache, tokens_NxT, slots_NxT, attend_blocks=blocks,
                         write_blocks=tuple(range(blocks)))
