"""The Nemotron-H family's sampler: prefill + decode on the hybrid's rollout cache
(rlp_jax.models.nemotron_h_decode), the counterpart of rlp_jax.models.transformer_sampling with
the same `SamplingConfig` semantics and the conventions of rlp_jax.models.sampling_core.
rlp_jax.sampling runs it through the family registry.

This sampler's own conventions
- Each prompt is prefilled ONCE: its attention keys and values are stored once for its G rows,
  its Mamba state is copied to each row (rows diverge from the first sampled token).
- The decode runs in segments of `block_len` steps; segment i reads attention blocks `0 … i` only.
  The loop ends as soon as every row has finished.
- A recurrent state cannot take a token back, so a row's Mamba state holds every generated token
  EXCEPT a sampled stop token: the state a caller continues from. The stop token's keys and values
  are in its slot, `prompt_len + lengths − finished`, which is where `</think>` goes next for
  sampled and forced closes alike (the same token rewrites its own slot with the same keys).
  What comes after the thought (RLP's scored targets, RPT's prediction) is each fed from this
  cache (`feed`); the family's sampler has `rewrites_slots=False`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlp_jax.models import decode
from rlp_jax.models import nemotron_h_decode as hd
from rlp_jax.models.sampling_core import Prefilled, SampleOutput, SamplingConfig, next_token

Array = jax.Array


def weights_of(model) -> hd.HybridDecodeWeights:
    """The weights the sampler decodes a live NemotronH with, sliced per layer and cast once."""
    return hd.decode_weights(model.weights())


def prefill(weights: hd.HybridDecodeWeights, prompts_BxP: Array, prompt_lengths_B: Array, cfg: SamplingConfig,
            num_samples: int = 1, extra_slots: int = 0) -> Prefilled:
    """Each prompt's forward once, its last position's logits for its `num_samples` rows, and a
    cache with room for `cfg.max_new_tokens + extra_slots` tokens per row. Pure; jit it (cfg,
    num_samples and extra_slots static)."""
    c = weights.config
    G, L = num_samples, cfg.max_new_tokens
    N = prompts_BxP.shape[0] * G
    block_len = min(cfg.block_len, L + extra_slots)  # a short thought must not read a long block
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    hidden_BxPxD, prefix_k, prefix_v, conv, ssm = hd.prefill(weights, prompts_BxP, prompt_lengths_B)
    last_BxD = jnp.take_along_axis(hidden_BxPxD, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
    logits_NxV = jnp.repeat(hd.logits(weights, last_BxD), G, axis=0)
    blocks = [hd.empty_blocks(c, N, block_len) for _ in range(decode.num_blocks(L + extra_slots, block_len))]
    kv = decode.RolloutCache(prefix_k, prefix_v, prompt_lengths_B, tuple(k for k, _ in blocks),
                             tuple(v for _, v in blocks))
    rows = lambda a: jnp.repeat(a, G, axis=0)
    cache = hd.HybridCache(kv, tuple({k: rows(v) for k, v in layer.items()} for layer in conv),
                           tuple(rows(s) for s in ssm))
    return Prefilled(logits_NxV, jnp.repeat(prompt_lengths_B, G), cache)


def decode_loop(weights: hd.HybridDecodeWeights, start: Prefilled, key: Array, cfg: SamplingConfig) -> SampleOutput:
    """`cfg.max_new_tokens` steps (fewer once every row has finished) from `start`, which
    `prefill` made with the same `cfg`; `SampleOutput.cache` is the rows' `HybridCache` (see the
    module docstring). Pure; jit it (cfg static)."""
    N, L = start.logits_NxV.shape[0], cfg.max_new_tokens
    cache = start.cache
    block_len = cache.kv.block_v[0][0].shape[2] if cache.kv.block_v[0] else min(cfg.block_len, L)
    stop_ids = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    state = (jnp.int32(0), start.logits_NxV, jnp.full((N, L), cfg.pad_id, jnp.int32), jnp.zeros((N, L), jnp.float32),
             jnp.zeros((N,), bool), jnp.zeros((N,), jnp.int32))
    for i in range(decode.num_blocks(L, block_len)):
        state, cache = _decode_segment(weights, cache, state, key, cfg, i, min((i + 1) * block_len, L), stop_ids)
    _, _, tokens_NxL, logprobs_NxL, finished_N, lengths_N = state
    return SampleOutput(tokens_NxL, logprobs_NxL, lengths_N, finished_N, cache, start.prompt_lengths_N + lengths_N)


def _decode_segment(weights, cache: hd.HybridCache, state, key, cfg: SamplingConfig, block: int, end: int, stop_ids):
    """Decode steps up to `end` (or until every row has finished) that write attention block
    `block`: the loop carries that block and the Mamba state, and only reads the rest."""

    def with_block(block_k, block_v):
        kv = cache.kv
        return dataclasses.replace(kv, block_k=_with(kv.block_k, block, block_k), block_v=_with(kv.block_v, block, block_v))

    def cond(carry):
        step, finished_N = carry[0][0], carry[0][4]
        return (step < end) & ~jnp.all(finished_N)

    def body(carry):
        (step, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N), block_k, block_v, conv, ssm = carry
        token_N, logprob_N = next_token(logits_NxV, jax.random.fold_in(key, step), step, cfg)
        active_N = ~finished_N
        token_N = jnp.where(active_N, token_N, cfg.pad_id)
        tokens_NxL = tokens_NxL.at[:, step].set(token_N)
        logprobs_NxL = logprobs_NxL.at[:, step].set(jnp.where(active_N, logprob_N, 0.0))
        slots_N = jnp.where(active_N, lengths_N, -1)  # active rows write generated token `step` at slot `step`
        lengths_N = lengths_N + active_N
        stopped_N = active_N & jnp.isin(token_N, stop_ids)
        finished_N = finished_N | stopped_N
        current = hd.HybridCache(with_block(block_k, block_v), conv, ssm)
        hidden, current = hd.extend(weights, current, token_N[:, None], slots_N[:, None], attend_blocks=block + 1,
                                    write_blocks=(block,), advance_N=active_N & ~stopped_N,
                                    decode_slot=step)
        logits_NxV = hd.logits(weights, hidden)[:, 0]
        state = (step + 1, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N)
        return state, current.kv.block_k[block], current.kv.block_v[block], current.conv, current.ssm

    carry = (state, cache.kv.block_k[block], cache.kv.block_v[block], cache.conv, cache.ssm)
    state, block_k, block_v, conv, ssm = jax.lax.while_loop(cond, body, carry)
    return state, hd.HybridCache(with_block(block_k, block_v), conv, ssm)


def _with(blocks: tuple, index: int, block) -> tuple:
    return blocks[:index] + (block,) + blocks[index + 1:]


def feed(weights: hd.HybridDecodeWeights, cache: hd.HybridCache, tokens_NxT: Array, first_slot_N: Array
         ) -> tuple[Array, hd.HybridCache]:
    """`T` tokens per row fed from `cache` in one pass over the layers, at suffix slots
    `first_slot_N … first_slot_N + T − 1` (attention slots already written are rewritten; every
    row's Mamba state advances): the final-norm hidden states `[N, T, D]` after each, and the cache
    after all of them."""
    blocks = len(cache.kv.block_k)
    slots_NxT = first_slot_N[:, None] + jnp.arange(tokens_NxT.shape[1])
    return hd.extend(weights, cache, tokens_NxT, slots_NxT, attend_blocks=blocks, write_blocks=tuple(range(blocks)))
