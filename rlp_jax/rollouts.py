"""From prompts to scored thoughts: the rollout half of an RLP step (Algorithm 1, lines 2–4).

Pure functions of `(graphdef, params, batch, key)` on a `rlp_jax.batch.PromptBatch`; jit them
inside a train step. Rows `b·G … b·G+G−1` of every `N = B·G` array are the G thoughts of prompt b.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlp_jax import losses, sampling
from rlp_jax.batch import PromptBatch
from rlp_jax.models.families import family_of
from rlp_jax.models.transformer import head_logits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How thoughts are elicited, sampled and scored.

    The prompt for a context is `[context, *prompt_suffix_ids, <think>]`: `prompt_suffix_ids` is the
    template's text between the context and the open marker (default: none — the open marker
    directly after the context, as in the paper). Base models that never open a thought on their
    own may need an instruction here.
    """

    think_open_id: int
    think_close_id: int
    num_rollouts: int = 16  # G
    max_thought_len: int = 2048  # L
    min_thought_len: int = 1
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    prompt_suffix_ids: tuple[int, ...] = ()
    pad_id: int = 0
    cache_block_len: int = 256  # rollout-cache slots per block: what a decode step reads, to a block
    # RPT (objective "rpt"): after the thought the policy also samples this many tokens of its
    # prediction of the continuation; they are actions like the thought's (0: no prediction).
    prediction_len: int = 0
    # Mask the think markers out of the distributions that score the true next token (both the
    # reasoned and the no-think score): a baseline that learned to expect "<think>" there would
    # otherwise hand the thought a free gain (docs/train_step.md).
    mask_markers_in_scoring: bool = False

    def __post_init__(self):
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts={self.num_rollouts}; group-relative advantages need "
                             "G >= 2 thoughts per prompt.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; RLP samples thoughts and needs "
                             "temperature > 0 (the paper uses 0.7).")
        if self.cache_block_len < 1:
            raise ValueError(f"cache_block_len={self.cache_block_len}; use at least 1 slot per block.")
        if self.prediction_len < 0:
            raise ValueError(f"prediction_len={self.prediction_len}; use 0 (no prediction) or more tokens.")
        if not 1 <= self.min_thought_len <= self.max_thought_len:
            raise ValueError(f"need 1 <= min_thought_len ({self.min_thought_len}) <= max_thought_len "
                             f"({self.max_thought_len}).")

    @property
    def banned_close(self) -> tuple[int, int]:
        """`(</think>, positions)`: the thought positions where the policy may not close."""
        return self.think_close_id, self.min_thought_len

    def sampling_config(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_thought_len, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, stop_tokens=(self.think_close_id,),
            min_new_tokens=self.min_thought_len, pad_id=self.pad_id, block_len=self.cache_block_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollouts:
    prompt_BxP: Array  # [context, suffix, <think>], right-padded
    prompt_len_B: Array
    thoughts_NxL: Array  # sampled tokens; a sampled </think> is the last valid one
    thought_mask_NxL: Array  # tokens the policy chose (the sampled </think> included)
    truncated_N: Array  # reached L without </think>; closed by force (the forced token is not an action)
    behaviour_logprobs_NxL: Array
    s_pred_NxK: Array  # log p_θ(x_t | x_<t, c) of each target token, on the rollout cache
    predicted_NxK: Array  # argmax prediction of each target after the thought
    # RPT: the sampled prediction after `</think>` (`prediction_len` tokens). The thought arrays
    # then hold the whole action [thought, (forced </think>), prediction] (`with_prediction`).
    prediction_NxM: Array | None = None


def build_prompts(context_BxT: Array, context_len_B: Array, cfg: RolloutConfig) -> tuple[Array, Array]:
    """`[context, *suffix, <think>]` per row, right-padded to `T + len(suffix) + 1`."""
    B, T = context_BxT.shape
    added = (*cfg.prompt_suffix_ids, cfg.think_open_id)
    prompt_BxP = jnp.concatenate(
        [context_BxT, jnp.full((B, len(added)), cfg.pad_id, context_BxT.dtype)], axis=1)
    rows = jnp.arange(B)
    for j, token in enumerate(added):
        prompt_BxP = prompt_BxP.at[rows, context_len_B + j].set(token)
    return prompt_BxP, context_len_B + len(added)


def _scoring_logits(logits_NxKxV: Array, cfg: RolloutConfig) -> Array:
    logits = logits_NxKxV.astype(jnp.float32)
    if cfg.mask_markers_in_scoring:
        markers = jnp.asarray([cfg.think_open_id, cfg.think_close_id])
        logits = logits.at[..., markers].set(jnp.finfo(jnp.float32).min)
    return logits


def _rollout_inputs(batch: PromptBatch, key: Array, cfg: RolloutConfig, greedy: bool):
    """What every family's sampler starts from: the prompts, the sampling config (argmax when
    `greedy`) and the keys of the thoughts and of RPT's prediction."""
    prompt_BxP, prompt_len_B = build_prompts(batch.context_BxT, batch.context_len_B, cfg)
    sampling_cfg = cfg.sampling_config()
    if greedy:
        sampling_cfg = dataclasses.replace(sampling_cfg, temperature=0.0)
    thought_key, prediction_key = jax.random.split(key) if cfg.prediction_len else (key, None)
    return prompt_BxP, prompt_len_B, sampling_cfg, thought_key, prediction_key


def _rollouts_of(prompt_BxP: Array, prompt_len_B: Array, out: sampling.SampleOutput, s_pred_NxK: Array,
                 predicted_NxK: Array, max_thought_len: int) -> Rollouts:
    thought_mask_NxL = jnp.arange(max_thought_len)[None, :] < out.lengths_N[:, None]
    return Rollouts(prompt_BxP, prompt_len_B, out.tokens_NxL, thought_mask_NxL, ~out.finished_N,
                    out.logprobs_NxL, s_pred_NxK, predicted_NxK)


def sample_and_score(graphdef: nnx.GraphDef, params: nnx.State, batch: PromptBatch, key: Array,
                     cfg: RolloutConfig, greedy: bool = False) -> Rollouts:
    """Samples G thoughts per prompt from `params` (the behaviour policy θ_old) and scores the true
    next token(s) after each thought on the rollout's own decode state (`score_after_thoughts`),
    whatever the model's family (its sampler: rlp_jax.sampling). `greedy` decodes the thought by
    argmax instead (evaluation); behaviour log-probs are then taken at temperature 1."""
    model = nnx.merge(graphdef, params)
    weights = sampling.weights_of(model)  # cast once for the whole rollout
    L, K, M = cfg.max_thought_len, batch.target_BxK.shape[1], cfg.prediction_len
    prompt_BxP, prompt_len_B, sampling_cfg, thought_key, prediction_key = _rollout_inputs(batch, key, cfg, greedy)
    out = sampling.sample(weights, prompt_BxP, prompt_len_B, thought_key, sampling_cfg, num_samples=cfg.num_rollouts,
                          extra_slots=1 + max(K, M))
    s_pred_NxK, predicted_NxK, cache = score_after_thoughts(weights, out, batch.target_BxK, cfg)
    roll = _rollouts_of(prompt_BxP, prompt_len_B, out, s_pred_NxK, predicted_NxK, L)
    if not M:
        return roll
    close_slot_N = out.lengths_N - out.finished_N.astype(jnp.int32)
    prediction_NxM, logprobs_NxM = sample_prediction(weights, cache, close_slot_N, cfg.think_close_id, prediction_key,
                                                     sampling_cfg, M)
    return with_prediction(roll, prediction_NxM, logprobs_NxM, cfg.think_close_id)


def sample_prediction(weights, cache, close_slot_N: Array, close_id: int, key: Array, cfg: sampling.SamplingConfig,
                      num_tokens: int) -> tuple[Array, Array]:
    """RPT's prediction: `</think>` fed at each row's `close_slot_N` (a sampled one rewrites its own
    slot; a recurrent state, which never held it, takes it next), then `num_tokens` tokens sampled
    as `cfg` samples (no stop, no minimum) on the rollout's decode state (`cache`: what
    `score_after_thoughts` returned), with their behaviour log-probs."""
    sampler = family_of(weights).sampler
    cfg = dataclasses.replace(cfg, stop_tokens=(), min_new_tokens=0)

    def step(carry, m):
        cache, fed_N = carry
        hidden_Nx1xD, cache = sampler.feed(weights, cache, fed_N[:, None], close_slot_N + m)
        token_N, logprob_N = sampling.next_token(sampler.logits(weights, hidden_Nx1xD)[:, 0].astype(jnp.float32),
                                                 jax.random.fold_in(key, m), m, cfg)
        return (cache, token_N), (token_N, logprob_N)

    start = (cache, jnp.full(close_slot_N.shape, close_id, jnp.int32))
    _, (tokens_MxN, logprobs_MxN) = jax.lax.scan(step, start, jnp.arange(num_tokens))
    return tokens_MxN.T, logprobs_MxN.T


def with_prediction(roll: Rollouts, prediction_NxM: Array, logprobs_NxM: Array, close_id: int) -> Rollouts:
    """The rollouts with RPT's whole action in the thought arrays (width L + 1 + M): the thought,
    `</think>` (an action when sampled; forced, and not an action, when the thought hit L), then
    the prediction (actions). The policy update then trains thought and prediction alike."""
    N, L = roll.thoughts_NxL.shape
    M = prediction_NxM.shape[1]
    lengths_N = roll.thought_mask_NxL.sum(-1)
    forced_N = roll.truncated_N.astype(jnp.int32)
    rows = jnp.arange(N)[:, None]
    tokens = jnp.concatenate([roll.thoughts_NxL, jnp.zeros((N, 1 + M), roll.thoughts_NxL.dtype)], axis=1)
    mask = jnp.concatenate([roll.thought_mask_NxL, jnp.zeros((N, 1 + M), bool)], axis=1)
    logprobs = jnp.concatenate([roll.behaviour_logprobs_NxL, jnp.zeros((N, 1 + M), jnp.float32)], axis=1)
    tokens = tokens.at[jnp.arange(N), lengths_N].set(jnp.where(forced_N == 1, close_id, tokens[jnp.arange(N), lengths_N]))
    at_NxM = (lengths_N + forced_N)[:, None] + jnp.arange(M)
    tokens = tokens.at[rows, at_NxM].set(prediction_NxM)
    mask = mask.at[rows, at_NxM].set(True)
    logprobs = logprobs.at[rows, at_NxM].set(logprobs_NxM)
    return dataclasses.replace(roll, thoughts_NxL=tokens, thought_mask_NxL=mask, behaviour_logprobs_NxL=logprobs,
                               prediction_NxM=prediction_NxM)


def score_after_thoughts(weights, out: sampling.SampleOutput, target_BxK: Array, cfg: RolloutConfig):
    """Eq. 3, `S_pred = log p_θ(x_t | x_<t, c)`: `[</think>, x_t, …]` fed into the finished
    rollout's decode state right after each thought (no second forward over context + thought).
    Returns the log-probs and argmax predictions of the K targets, and the decode state that RPT's
    prediction continues from: on an attention cache, the cache with these tokens written (a
    sampled `</think>` is rewritten in its own slot: same token, same prefix, the same keys and
    values); on a recurrent state, which cannot take them back, the state after the thought."""
    sampler = family_of(weights).sampler
    N, K = out.tokens_NxL.shape[0], target_BxK.shape[1]
    close_slot_N = out.lengths_N - out.finished_N.astype(jnp.int32)
    target_NxK = jnp.repeat(target_BxK, N // target_BxK.shape[0], axis=0)
    feed_Nx1K = jnp.concatenate([jnp.full((N, 1), cfg.think_close_id, jnp.int32), target_NxK], axis=1)
    hidden, cache = sampler.feed(weights, out.cache, feed_Nx1K, close_slot_N)
    logits_NxKxV = _scoring_logits(sampler.logits(weights, hidden[:, :K]), cfg)
    return (losses.token_logprobs(logits_NxKxV, target_NxK),
            jnp.argmax(logits_NxKxV, axis=-1).astype(jnp.int32), cache if sampler.rewrites_slots else out.cache)


def context_then_targets(batch: PromptBatch) -> tuple[Array, Array]:
    """`[context, x_t, x_t+1, …]` right-padded, and the index whose logits predict each target."""
    context_BxT, context_len_B, target_BxK = batch.context_BxT, batch.context_len_B, batch.target_BxK
    B, K = target_BxK.shape
    seq = jnp.concatenate([context_BxT, jnp.zeros_like(target_BxK)], axis=1)
    seq = seq.at[jnp.arange(B)[:, None], context_len_B[:, None] + jnp.arange(K)].set(target_BxK)
    return seq, jnp.maximum(context_len_B[:, None] - 1 + jnp.arange(K), 0)  # ≥ 0 on empty padding rows


def no_think_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: PromptBatch,
                      cfg: RolloutConfig) -> tuple[Array, Array]:
    """`log p(x_t | x_<t)` of each target token with no thought (teacher-forced over the
    targets), and the argmax predictions. With the EMA params this is the baseline `S_ema`."""
    model = nnx.merge(graphdef, params)
    seq_BxS, predict_at_BxK = context_then_targets(batch)
    positions = jnp.broadcast_to(jnp.arange(seq_BxS.shape[1]), seq_BxS.shape)
    hidden_BxSxD = model.hidden_states(seq_BxS, positions)
    hidden_BxKxD = jnp.take_along_axis(hidden_BxSxD, predict_at_BxK[..., None], axis=1)
    logits = _scoring_logits(model.logits(hidden_BxKxD), cfg)
    return losses.token_logprobs(logits, batch.target_BxK), jnp.argmax(logits, -1).astype(jnp.int32)


def no_think_logits(graphdef: nnx.GraphDef, params: nnx.State, batch: PromptBatch) -> Array:
    """The logits `[B, V]` of the first target token `x_t` given the context alone (float32)."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(batch.context_BxT.shape[1]), batch.context_BxT.shape)
    hidden_BxTxD = model.hidden_states(batch.context_BxT, positions)
    last_B = jnp.maximum(batch.context_len_B - 1, 0)
    hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    return model.logits(hidden_BxD[:, None])[:, 0].astype(jnp.float32)


def thought_sequences(rollouts: Rollouts, num_rollouts: int) -> tuple[Array, Array]:
    """`[prompt, thought]` rows (`N × (P + L)`, contiguous, pads after) and, per thought token,
    the index whose logits predict it."""
    prompt_NxP = jnp.repeat(rollouts.prompt_BxP, num_rollouts, axis=0)
    start_N = jnp.repeat(rollouts.prompt_len_B, num_rollouts)
    N, L = rollouts.thoughts_NxL.shape
    seq = jnp.concatenate([prompt_NxP, jnp.zeros((N, L), prompt_NxP.dtype)], axis=1)
    token_at_NxL = start_N[:, None] + jnp.arange(L)
    seq = seq.at[jnp.arange(N)[:, None], token_at_NxL].set(rollouts.thoughts_NxL)
    return seq, token_at_NxL - 1


def thought_logprobs(graphdef: nnx.GraphDef, params: nnx.State, seq_NxS: Array, predict_at_NxL: Array,
                     thoughts_NxL: Array, temperature: float, head_chunk_len: int = 0,
                     banned_token: int | None = None, banned_before: int = 0) -> tuple[Array, Array]:
    """Teacher-forced `log π(ℓ_u | prefix_u)` of every thought token at the sampling temperature
    (the only place the policy gradient enters), and the per-token policy entropy.

    The policy is the distribution the sampler draws from: with `banned_token` (`</think>`) the
    first `banned_before` (`min_thought_len`) thought positions exclude it, exactly as the sampler
    masks it there, so that behaviour and trained log-probs are of the same distribution.

    `head_chunk_len > 0` runs the LM head and its softmax over that many thought positions at a
    time, each chunk rematerialised in the backward pass: the `[N, L, V]` logits (with their
    float32 softmax and gradient, ~14 bytes × L × V per thought) never exist at once, only one
    chunk's. Same numbers either way."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(seq_NxS.shape[1]), seq_NxS.shape)
    hidden_NxSxD = model.hidden_states(seq_NxS, positions)
    hidden_NxLxD = jnp.take_along_axis(hidden_NxSxD, predict_at_NxL[..., None], axis=1)
    head_DxV = model.head_weights()

    def scored(h_NxCxD, t_NxC, u_C):
        logits_NxCxV = head_logits(h_NxCxD, head_DxV).astype(jnp.float32)
        if banned_token is not None and banned_before > 0:
            banned_CxV = (u_C < banned_before)[:, None] & (jnp.arange(logits_NxCxV.shape[-1]) == banned_token)
            logits_NxCxV = jnp.where(banned_CxV, jnp.finfo(jnp.float32).min, logits_NxCxV)
        logp_NxC = losses.token_logprobs(logits_NxCxV, t_NxC, temperature)
        log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(logits_NxCxV) / temperature, axis=-1)
        return logp_NxC, -(jnp.exp(log_probs) * log_probs).sum(-1)

    N, L = thoughts_NxL.shape
    if not 0 < head_chunk_len < L:
        return scored(hidden_NxLxD, thoughts_NxL, jnp.arange(L))
    chunks = -(-L // head_chunk_len)
    pad = chunks * head_chunk_len - L
    h_nxNxCxD = jnp.pad(hidden_NxLxD, ((0, 0), (0, pad), (0, 0))).reshape(
        N, chunks, head_chunk_len, -1).swapaxes(0, 1)
    t_nxNxC = jnp.pad(thoughts_NxL, ((0, 0), (0, pad))).reshape(N, chunks, head_chunk_len).swapaxes(0, 1)
    u_nxC = jnp.arange(chunks * head_chunk_len).reshape(chunks, head_chunk_len)
    logp_nxNxC, entropy_nxNxC = jax.lax.map(lambda xs: jax.checkpoint(scored)(*xs), (h_nxNxCxD, t_nxNxC, u_nxC))
    unchunk = lambda x_nxNxC: x_nxNxC.swapaxes(0, 1).reshape(N, chunks * head_chunk_len)[:, :L]
    return unchunk(logp_nxNxC), unchunk(entropy_nxNxC)
