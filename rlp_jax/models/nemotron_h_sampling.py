"""The Nemotron-H family's sampler (rlp_jax.models.nemotron_h) on its recurrent state: the
hybrid counterpart of rlp_jax.models.transformer_sampling, with the same `SamplingConfig`
semantics and the conventions of rlp_jax.models.sampling_core. rlp_jax.sampling runs it through
the family registry (`sampling.sample` is `decode_loop(weights, prefill(weights, prompts, ...),
key, cfg)` here too).

This sampler's own conventions
- Each prompt is prefilled ONCE (B rows) and its state repeated to its G samples
  (`nemotron_h.repeat_rows`: rows `b·G … b·G+G−1`).
- Thoughts are decoded token by token (`nemotron_h.decode_step`) with the shared draw
  (`sampling_core.next_token`).
- A recurrent state cannot take a token back, so a row's state holds only what a caller will
  continue from: every generated token EXCEPT a sampled stop token (the Mamba state has no slot
  to rewrite). `cache.lengths_B = prompt_len + lengths − finished` is where the stop token (RLP:
  `</think>`) goes next, for sampled and forced closes alike (`extend`). Rows that have finished
  keep their conv and SSM state unchanged; their attention slot at `lengths_B` is scratch that the
  next token fed there overwrites before any query reads it. What comes after the thought (RLP's
  scored targets, RPT's prediction) is each fed from this state after the thought (`feed`): the
  family's sampler has `rewrites_slots=False`.
- Attention slots: `P + max_new_tokens + extra_slots`; decode attends over all of them under a
  mask (no block structure as in `rlp_jax.models.decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlp_jax.models import nemotron_h as nh
from rlp_jax.models.sampling_core import Prefilled, SampleOutput, SamplingConfig, next_token
from rlp_jax.sharding import constrain

Array = jax.Array


def weights_of(model: nh.NemotronH) -> nh.Weights:
    """The weights the sampler decodes a live NemotronH with (`decode_weights(model.weights())`)."""
    return decode_weights(model.weights())


def decode_weights(w: nh.Weights) -> nh.Weights:
    """The weights cast to the compute dtype once per rollout (the Mamba A_log, D and dt_bias stay
    float32, as the model keeps them) and, under a mesh, not split over `embed` (the FSDP axis):
    a sharded model gathers each weight once, outside the decode loop. Same numbers as `w`."""
    dtype = jnp.dtype(w.config.dtype)
    unsplit = lambda axes: tuple(None if a == "embed" else a for a in axes)
    cast = lambda name, a: a if name in nh.FLOAT32_WEIGHTS else a.astype(dtype)
    blocks = {t: {name: constrain(cast(name, a), unsplit(nh.AXES[t][name])) for name, a in stack.items()}
              for t, stack in w.blocks.items()}
    head = constrain(w.head_DxV.astype(dtype), (None, "vocab"))
    return nh.Weights(w.config, w.embed_VxD, w.final_norm_D, head, blocks)


def advance(w: nh.Weights, state: nh.State, tokens_N: Array, feed_N: Array) -> tuple[Array, nh.State]:
    """`decode_step` for the rows with `feed_N`; the others keep their conv, SSM state and length
    (the key and value they wrote at their slot `lengths_B` is overwritten by their next token).
    Returns the final-norm hidden states `[N, D]` (meaningless on rows not fed) and the state."""
    hidden_Nx1xD, new = nh.decode_step(w, state, tokens_N[:, None])
    row = lambda a: feed_N.reshape((1, -1) + (1,) * (a.ndim - 2))
    state = nh.State(conv={k: jnp.where(row(a), a, state.conv[k]) for k, a in new.conv.items()},
                     ssm=jnp.where(row(new.ssm), new.ssm, state.ssm), k=new.k, v=new.v,
                     lengths_B=jnp.where(feed_N, new.lengths_B, state.lengths_B))
    return hidden_Nx1xD[:, 0], nh.constrain_state(state)


def extend(w: nh.Weights, state: nh.State, tokens_NxK: Array) -> tuple[Array, nh.State]:
    """`K` tokens per row fed one after another from `state` (every row): the final-norm hidden
    states `[N, K, D]` after each, and the state after all of them."""
    def step(st, tokens_N):
        hidden_Nx1xD, st = nh.decode_step(w, st, tokens_N[:, None])
        return st, hidden_Nx1xD[:, 0]

    state, hidden_KxNxD = jax.lax.scan(step, state, tokens_NxK.T)
    return hidden_KxNxD.swapaxes(0, 1), state


def prefill(weights: nh.Weights, prompts_BxP: Array, prompt_lengths_B: Array, cfg: SamplingConfig,
            num_samples: int = 1, extra_slots: int = 0) -> Prefilled:
    """Each prompt's forward once, its last position's logits and its state repeated to its
    `num_samples` rows, with attention room for `cfg.max_new_tokens + extra_slots` tokens per row.
    Pure; jit it (cfg, num_samples and extra_slots static)."""
    P, G = prompts_BxP.shape[1], num_samples
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    hidden_BxPxD, state = nh.prefill(weights, prompts_BxP, prompt_lengths_B,
                                     capacity=P + cfg.max_new_tokens + extra_slots)
    last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (prompt_lengths_B - 1)[:, None, None], axis=1)
    logits_NxV = jnp.repeat(nh.logits(weights, last_Bx1xD)[:, 0], G, axis=0)
    return Prefilled(logits_NxV, jnp.repeat(prompt_lengths_B, G), nh.constrain_state(nh.repeat_rows(state, G)))


def decode_loop(weights: nh.Weights, start: Prefilled, key: Array, cfg: SamplingConfig) -> SampleOutput:
    """`cfg.max_new_tokens` steps (fewer once every row has finished) from `start`, which
    `prefill` made with the same `cfg`; `SampleOutput.cache` is the rows' `nemotron_h.State` (see
    the module docstring). Pure; jit it (cfg static)."""
    N, L = start.logits_NxV.shape[0], cfg.max_new_tokens
    stop_ids = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        step, finished_N = carry[0], carry[4]
        return (step < L) & ~jnp.all(finished_N)

    def body(carry):
        step, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N, state = carry
        token_N, logprob_N = next_token(logits_NxV, jax.random.fold_in(key, step), step, cfg)
        active_N = ~finished_N
        token_N = jnp.where(active_N, token_N, cfg.pad_id)
        tokens_NxL = tokens_NxL.at[:, step].set(token_N)
        logprobs_NxL = logprobs_NxL.at[:, step].set(jnp.where(active_N, logprob_N, 0.0))
        lengths_N = lengths_N + active_N
        stopped_N = active_N & jnp.isin(token_N, stop_ids)
        finished_N = finished_N | stopped_N
        hidden_NxD, state = advance(weights, state, token_N, active_N & ~stopped_N)
        logits_NxV = nh.logits(weights, hidden_NxD[:, None])[:, 0]
        return step + 1, logits_NxV, tokens_NxL, logprobs_NxL, finished_N, lengths_N, state

    carry = (jnp.int32(0), start.logits_NxV, jnp.full((N, L), cfg.pad_id, jnp.int32), jnp.zeros((N, L), jnp.float32),
             jnp.zeros((N,), bool), jnp.zeros((N,), jnp.int32), start.cache)
    _, _, tokens_NxL, logprobs_NxL, finished_N, lengths_N, state = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(tokens_NxL, logprobs_NxL, lengths_N, finished_N, state, start.prompt_lengths_N + lengths_N)


def feed(weights: nh.Weights, state: nh.State, tokens_NxT: Array, first_slot_N: Array) -> tuple[Array, nh.State]:
    """`T` tokens per row fed from `state` (every row; the state knows where each row stands, so
    `first_slot_N` is not needed): the final-norm hidden states `[N, T, D]` after each, and the
    state after all of them."""
    del first_slot_N
    if tokens_NxT.shape[1] == 1:
        return nh.decode_step(weights, state, tokens_NxT)
    return extend(weights, state, tokens_NxT)
