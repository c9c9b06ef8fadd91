"""ONE pure function `(state, batch) -> (state, metrics)`: Algorithm 1 of the RLP paper.

1. θ_old ← θ (line 5): this step's params sample G thoughts per prompt (line 7,
   rollouts.sample_and_score), and the true next token(s) are scored after each thought on the
   rollout cache (S_pred, eq. 3).
2. φ ← θ on the very first step (lines 8–9, lazy EMA init), then the EMA scores the targets with
   no thought (S_ema, eq. 4).
3. Rewards and group-relative advantages: `losses.rlp_advantages` (eq. 5, eq. 7), or RPT's
   byte prefix-match reward on the sampled prediction (`rpt_rewards`), with GRPO's
   std-normalised advantage (`StepConfig.advantage`); RPT's hard positions are chosen by the
   data pipeline before the step (rlp_jax.data.hard_positions).
4. `losses.policy_loss` — the clipped surrogate over the thought tokens only (eq. 8), + β·KL to a
   frozen reference — in `ppo_epochs × num_minibatches` optimizer steps per rollout batch (line
   14), each accumulated over `grad_accum_steps` micro-batches; φ ← τφ + (1−τ)θ after every
   optimizer step (line 15).
The objective `ntp` (continued pretraining on the same documents) runs through the same state,
optimizer steps and EMA. See docs/train_step.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlp_jax import losses, rollouts, sharding
from rlp_jax.batch import Batch, DocumentBatch, PromptBatch
from rlp_jax.rollouts import RolloutConfig

Array = jax.Array
Objective = Literal["rlp", "rpt", "ntp"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    rollout: RolloutConfig
    objective: Objective = "rlp"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0  # β; the paper's default is 0
    kl_estimator: losses.KLEstimator = "k3"
    ema_decay: float = 0.999  # τ
    ppo_epochs: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    rollout_microbatches: int = 1  # prompts in this many sequential chunks: rollouts and S_ema
    head_chunk_len: int = 0  # > 0: the update's LM head over this many thought positions at a time
    update_length_buckets: int = 1  # > 1: update rows sorted by length, each micro-batch cut to a bucket length
    # Every token id's bytes (data.tokenizer.token_byte_table), for RPT's prefix-match reward.
    token_bytes: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False, hash=False)
    # RPT: the token ids that end a prediction (EOS, padding; losses.prefix_match_reward).
    rpt_end_ids: tuple[int, ...] = ()
    # The group advantage: "rlp" (the RLP paper's eq. 7, losses.group_relative_advantages),
    # "grpo" (std-normalised, RPT's: losses.grpo_advantages), or "auto": grpo for rpt, else rlp.
    advantage: str = "auto"

    def __post_init__(self):
        if self.objective not in ("rlp", "rpt", "ntp"):
            raise ValueError(f"objective={self.objective!r}; choose 'rlp', 'rpt' or 'ntp'.")
        for name in ("ppo_epochs", "num_minibatches", "grad_accum_steps", "rollout_microbatches",
                     "update_length_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.head_chunk_len < 0:
            raise ValueError(f"head_chunk_len must be >= 0 (0: off), got {self.head_chunk_len}.")
        if self.advantage not in ("auto", "rlp", "grpo"):
            raise ValueError(f"advantage={self.advantage!r}; choose 'auto', 'rlp' or 'grpo'.")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; choose 'k1', 'k2' or 'k3'.")
        if self.objective == "rpt" and (self.rollout.prediction_len < 1 or self.token_bytes is None):
            raise ValueError("objective='rpt' samples a prediction after the thought: set rlp.rpt_prediction_len >= 1 "
                             "(and pass the tokenizer's token bytes).")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"clip range eps_low={self.eps_low}, eps_high={self.eps_high}; need 0 <= eps_low < 1 "
                             "and eps_high >= 0.")

    @property
    def advantage_estimator(self) -> str:
        """`advantage` resolved: "auto" is GRPO's for RPT (the objective RPT trains with) and the
        RLP paper's eq. 7 otherwise."""
        if self.advantage != "auto":
            return self.advantage
        return "grpo" if self.objective == "rpt" else "rlp"

    @property
    def needs_reference(self) -> bool:
        """A frozen copy of the start weights is kept: the KL reference."""
        return self.kl_coef > 0

    @property
    def fresh_old_logprobs(self) -> bool:
        """One update per rollout batch: θ_old = θ, so the old log-probs are the current ones
        (stop-gradient) and the importance ratio is exactly 1."""
        return self.ppo_epochs == 1 and self.num_minibatches == 1

    def check_batch_size(self, batch_size: int) -> None:
        for name, parts in (("rollout_microbatches", self.rollout_microbatches),
                            ("num_minibatches × grad_accum_steps", self.num_minibatches * self.grad_accum_steps)):
            if batch_size % parts:
                raise ValueError(f"batch size {batch_size} does not divide into {name} = {parts}; "
                                 "choose a batch size that is a multiple of it.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # θ (nnx.State of the model's Params)
    ema_params: Any  # φ, float32 always
    opt_state: Any
    step: Array
    rng: Array  # raw uint32 key data (checkpointable)
    ref_params: Any = None  # frozen reference policy, only when kl_coef > 0


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_state(params, optimizer: optax.GradientTransformation, seed: int | Array,
               with_reference: bool = False) -> TrainState:
    """A fresh TrainState around `params` (φ = θ in float32). Jit it with out_shardings."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return TrainState(params=params, ema_params=_to_f32(params), opt_state=optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(key),
                      ref_params=params if with_reference else None)


# ---------------------------------------------------------------- the step

def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict[str, Array]]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Algorithm 1 lines 8–9: φ ← θ on the first batch.
    ema = jax.lax.cond(state.step == 0, lambda: _to_f32(state.params), lambda: state.ema_params)
    state = dataclasses.replace(state, ema_params=ema)
    if isinstance(batch, DocumentBatch):
        if cfg.objective != "ntp":
            raise ValueError(f"a DocumentBatch trains next-token prediction only, but objective="
                             f"{cfg.objective!r}; feed PromptBatches or use objective='ntp'.")
        return _ntp_step(state, *_whole_documents(batch), graphdef, optimizer, cfg)
    if cfg.objective == "ntp":
        return _ntp_step(state, *_context_and_targets(batch), graphdef, optimizer, cfg)
    return _policy_step(state, batch, key, graphdef, optimizer, cfg)


def _split(tree, parts: int):
    """Leading axis B → [parts, B/parts]."""
    return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), tree)


def _merge(tree):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def _chunked(fn, tree, chunks: int):
    """`fn` over `chunks` sequential slices of the leading axis of `tree`, results re-joined."""
    if chunks == 1:
        return fn(tree)
    return _merge(jax.lax.map(fn, _split(tree, chunks)))


def _rollouts(state, batch: PromptBatch, key, graphdef, cfg: StepConfig) -> rollouts.Rollouts:
    """Rollouts in `rollout_microbatches` sequential chunks of prompts (bounds the KV cache);
    each chunk draws with its own key."""
    n = cfg.rollout_microbatches
    if n == 1:
        return rollouts.sample_and_score(graphdef, state.params, batch, key, cfg.rollout)
    chunk = lambda xs: rollouts.sample_and_score(graphdef, state.params, xs[0], xs[1], cfg.rollout)
    return _merge(jax.lax.map(chunk, (_split(batch, n), jax.random.split(key, n))))


def ema_baseline(state: TrainState, batch: PromptBatch, graphdef: nnx.GraphDef, cfg: StepConfig) -> Array:
    """`S_ema = log p_φ(x_t | x_<t)` (eq. 4) of every target token, over the same
    `rollout_microbatches` chunks of prompts as the rollouts (bounds the forward's activations)."""
    baseline = lambda chunk: rollouts.no_think_logprobs(graphdef, state.ema_params, chunk, cfg.rollout)[0]
    return jax.lax.stop_gradient(_chunked(baseline, batch, cfg.rollout_microbatches))


def _advantages(batch: PromptBatch, roll: rollouts.Rollouts, s_ema_BxK: Array, valid_BxG: Array,
                cfg: StepConfig) -> tuple[Array, Array]:
    B, K = batch.target_BxK.shape
    G = cfg.rollout.num_rollouts
    if cfg.objective == "rlp":
        rewards_BxG, advantages_BxG = losses.rlp_advantages(
            roll.s_pred_NxK.reshape(B, G, K), s_ema_BxK, target_mask=batch.target_mask_BxK,
            rollout_valid_BxG=valid_BxG)
        if cfg.advantage_estimator == "rlp":
            return rewards_BxG, advantages_BxG
    else:
        rewards_BxG = jnp.where(valid_BxG, rpt_rewards(batch, roll, cfg), 0.0)
    group = losses.grpo_advantages if cfg.advantage_estimator == "grpo" else losses.group_relative_advantages
    return rewards_BxG, group(rewards_BxG, valid_BxG)


def rpt_rewards(batch: PromptBatch, roll: rollouts.Rollouts, cfg: StepConfig) -> Array:
    """RPT's reward of each rollout `[B, G]`: the byte prefix match of its prediction against the
    true continuation (`losses.prefix_match_reward`, the prediction ended at an end marker),
    and 0 for a thought cut off at L: it never reached a prediction of its own (RPT's response
    that runs out of length has no answer to score)."""
    B, K = batch.target_BxK.shape
    G, M = cfg.rollout.num_rollouts, cfg.rollout.prediction_len
    if K < M:  # a correct prediction of M tokens could never be verified against fewer
        raise ValueError(f"RPT scores its {M}-token prediction against {K} target token(s); set "
                         f"data.target_len >= rlp.rpt_prediction_len ({M}).")
    bytes_VxW, length_V = cfg.token_bytes
    match_BxG = losses.prefix_match_reward(roll.prediction_NxM.reshape(B, G, M), batch.target_BxK[:, None],
                                           batch.target_mask_BxK[:, None], bytes_VxW, length_V, cfg.rpt_end_ids)
    return jnp.where(roll.truncated_N.reshape(B, G), 0.0, match_BxG)


def _without_unreached_predictions(roll: rollouts.Rollouts, max_thought_len: int) -> rollouts.Rollouts:
    """RPT: a thought cut off at L never reached its prediction, so the tokens sampled after its
    forced `</think>` are not its actions: only its thought is trained (with reward 0)."""
    beyond_NxW = roll.truncated_N[:, None] & (jnp.arange(roll.thought_mask_NxL.shape[1]) >= max_thought_len)
    return dataclasses.replace(roll, thought_mask_NxL=roll.thought_mask_NxL & ~beyond_NxW)


def rollout_flop_tokens(context_len, thought_len, forced_close, target_len, suffix_len=0):
    """The tokens one rollout processes: `l_seq`, the per-rollout length of the paper's compute
    accounting `T_flop = n · l_seq · bs · iters + T_inp`, as `[context, suffix, <think>, thought,
    </think> when forced, targets]`. `thought_len` counts the tokens sampled (a sampled
    `</think>` included; RPT's prediction too), `forced_close` is 1 for a thought cut at L (its
    `</think>` fed by force), the targets are scored after the thought (S_pred). Ints or
    arrays: `processed_tokens` counts a step with it at the real lengths, `ablate.rlp_token_budget`
    and `plan` bound a run with every length at its maximum (`thought_len = L (+ M)`, forced 1)."""
    return context_len + suffix_len + 1 + thought_len + forced_close + target_len


def input_flop_tokens(context_len, target_len):
    """One prompt's share of T_inp: its inputs `[context, targets]`, scored once without a thought
    (S_ema)."""
    return context_len + target_len


def processed_tokens(batch: PromptBatch, thought_len_BxG: Array, truncated_BxG: Array, suffix_len: int = 0
                     ) -> dict[str, Array]:
    """What an RLP step processed, counted from the real lengths (padding rows and slots excluded):

    - `context_tokens`: the prompts' context tokens, once per prompt (the paper's "tokens");
    - `thought_tokens` (the policy's choices, a sampled `</think>` included), `target_tokens`;
    - `flop_tokens`: the paper's compute accounting `T_flop = n · l_seq · bs + T_inp` for one step
      with each sequence at its processed length: every rollout's `rollout_flop_tokens` plus
      each prompt's `input_flop_tokens`.
    """
    valid_B = batch.example_mask_B.astype(bool)
    context_B = jnp.where(valid_B, batch.context_len_B, 0)
    targets_B = jnp.where(valid_B, batch.target_mask_BxK.sum(-1), 0)
    thought_BxG = jnp.where(valid_B[:, None], thought_len_BxG, 0)
    rollout_BxG = rollout_flop_tokens(context_B[:, None], thought_BxG, truncated_BxG.astype(jnp.int32),
                                      targets_B[:, None], suffix_len)
    flop_B = jnp.where(valid_B, rollout_BxG.sum(-1) + input_flop_tokens(context_B, targets_B), 0)
    return {"context_tokens": context_B.sum(), "thought_tokens": thought_BxG.sum(), "target_tokens": targets_B.sum(),
            "flop_tokens": flop_B.sum()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class UpdateBatch:
    """What the policy update reads, one row per thought (N = B·G rows)."""

    seq_NxS: Array  # [prompt, thought], contiguous, pads after
    predict_at_NxL: Array  # the index whose logits predict each thought token
    thoughts_NxL: Array
    mask_NxL: Array  # tokens the policy chose
    advantages_N: Array
    valid_N: Array  # False on the thoughts of padding prompts
    old_logp_NxL: Array | None = None  # θ_old's log-probs, when several updates share the batch
    ref_logp_NxL: Array | None = None  # the reference policy's, when kl_coef > 0


def update_batch(roll: rollouts.Rollouts, advantages_BxG: Array, valid_BxG: Array) -> UpdateBatch:
    """The update's rows from a step's rollouts and advantages."""
    seq_NxS, predict_at_NxL = rollouts.thought_sequences(roll, advantages_BxG.shape[1])
    return UpdateBatch(seq_NxS, predict_at_NxL, roll.thoughts_NxL, roll.thought_mask_NxL,
                       advantages_BxG.reshape(-1), valid_BxG.reshape(-1))


def _policy_step(state, batch: PromptBatch, key, graphdef, optimizer, cfg: StepConfig):
    B, G = batch.size, cfg.rollout.num_rollouts
    cfg.check_batch_size(B)
    roll = _rollouts(state, batch, key, graphdef, cfg)
    s_ema_BxK = ema_baseline(state, batch, graphdef, cfg)
    valid_B = batch.example_mask_B.astype(bool)
    valid_BxG = jnp.broadcast_to(valid_B[:, None], (B, G))
    rewards_BxG, advantages_BxG = _advantages(batch, roll, s_ema_BxK, valid_BxG, cfg)

    acted = _without_unreached_predictions(roll, cfg.rollout.max_thought_len) if cfg.objective == "rpt" else roll
    rows = update_batch(acted, advantages_BxG, valid_BxG)
    if cfg.update_length_buckets > 1:
        rows = _sorted_by_length(rows, cfg.num_minibatches)
    micro = cfg.num_minibatches * cfg.grad_accum_steps
    if not cfg.fresh_old_logprobs:  # one no-grad pass with θ_old, in the update's micro-batch sizes
        rows.old_logp_NxL = _thought_logprobs_chunked(graphdef, state.params, rows, micro, cfg)
    if cfg.kl_coef:
        rows.ref_logp_NxL = _thought_logprobs_chunked(graphdef, state.ref_params, rows, micro, cfg)
    (params, ema_params, opt_state, skipped), aux = _optimizer_steps(
        state, _split(rows, cfg.num_minibatches),
        lambda p, mb: policy_gradient(graphdef, p, mb, cfg), optimizer, cfg)

    tokens = jnp.maximum(aux["num_tokens"].sum(), 1.0)
    token_mean = lambda name: aux[name].sum() / tokens
    valid_N = valid_BxG.reshape(-1)  # the rollouts' order: `rows` may be re-sorted by length
    num_rows = jnp.maximum(valid_N.sum(), 1)
    row_mean = lambda x_N: jnp.where(valid_N, x_N, 0).sum() / num_rows
    lengths_N = roll.thought_mask_NxL.sum(-1)
    s_pred_N = jnp.where(jnp.repeat(batch.target_mask_BxK, G, axis=0), roll.s_pred_NxK, 0.0).sum(-1)
    s_ema_B = jnp.where(batch.target_mask_BxK, s_ema_BxK, 0.0).sum(-1)
    metrics = {
        "loss": aux["loss"].mean(),
        "policy_loss": aux["policy_loss"].mean(),
        "kl": aux["kl"].mean(),
        **losses.reward_statistics(rewards_BxG, advantages_BxG, valid_BxG),
        "s_pred_mean": row_mean(s_pred_N),
        "s_ema_mean": row_mean(jnp.repeat(s_ema_B, G)),
        "thought_len_mean": row_mean(lengths_N),
        "thought_len_max": jnp.where(valid_N, lengths_N, 0).max(),
        "truncated_frac": row_mean(roll.truncated_N),
        **{name: token_mean(name) for name in _TOKEN_METRICS},
        "ratio_max": aux["ratio_max"].max(),
        "entropy": token_mean("entropy"),
        "grad_norm": aux["grad_norm"].mean(),
        "nonfinite_skipped": skipped,
        "match_rate": row_mean((roll.predicted_NxK == jnp.repeat(batch.target_BxK, G, 0))[:, 0]),
        "num_prompts": valid_B.sum(),
        **({"rpt_match_rate": jnp.where(valid_BxG, rewards_BxG, 0).sum() / jnp.maximum(valid_BxG.sum(), 1)}
           if cfg.objective == "rpt" else {}),
        **processed_tokens(batch, lengths_N.reshape(B, G), roll.truncated_N.reshape(B, G),
                           len(cfg.rollout.prompt_suffix_ids)),
    }
    new_state = dataclasses.replace(state, params=params, ema_params=ema_params, opt_state=opt_state,
                                    step=state.step + 1)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def _optimizer_steps(state: TrainState, minibatches, gradient, optimizer, cfg: StepConfig):
    """`ppo_epochs × num_minibatches` optimizer steps (Algorithm 1 line 14), each followed by the
    EMA update (line 15). A step whose loss or gradient is not finite leaves θ, φ and the optimizer
    as they were and is counted. Returns `((params, ema, opt_state, skipped), per-update aux)`."""

    def update(carry, index):
        params, ema_params, opt_state, skipped = carry
        mb = jax.tree.map(lambda x: x[index % cfg.num_minibatches], minibatches)
        grads, aux = gradient(params, mb)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
        changes, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, changes)
        new_ema = losses.ema_update(ema_params, new_params, cfg.ema_decay)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        carry = (keep(new_params, params), keep(new_ema, ema_params), keep(new_opt_state, opt_state),
                 skipped + (~ok).astype(jnp.int32))
        return carry, aux | {"grad_norm": grad_norm}

    init = (state.params, state.ema_params, state.opt_state, jnp.zeros((), jnp.int32))
    return jax.lax.scan(update, init, jnp.arange(cfg.ppo_epochs * cfg.num_minibatches))


def _row_lengths(rows: UpdateBatch) -> Array:
    """Tokens of `[prompt, thought]` each update row really uses (to its last action: RPT's
    action has a forced `</think>`, not an action, inside it)."""
    L = rows.mask_NxL.shape[1]
    return rows.predict_at_NxL[:, 0] + 1 + (rows.mask_NxL * (jnp.arange(L) + 1)).max(-1)


def _sorted_by_length(rows: UpdateBatch, num_minibatches: int) -> UpdateBatch:
    """The rows of each minibatch in order of length, so that its micro-batches each hold rows of
    similar length (the loss is a sum over thoughts: the order changes no number, only which
    rows share a micro-batch)."""
    lengths_MxR = _row_lengths(rows).reshape(num_minibatches, -1)
    order_MxR = jnp.argsort(lengths_MxR, axis=1, stable=True)
    order_N = (order_MxR + jnp.arange(num_minibatches)[:, None] * lengths_MxR.shape[1]).reshape(-1)
    return jax.tree.map(lambda x: x[order_N], rows)


def bucket_lengths(seq_len: int, buckets: int) -> tuple[int, ...]:
    """The row lengths an update micro-batch is cut to: `buckets` steps up to `seq_len`, multiples
    of 8 where they can be."""
    return tuple(sorted({min(seq_len, -(-seq_len * i // (buckets * 8)) * 8) for i in range(1, buckets + 1)}))


def _thought_logprobs_chunked(graphdef, params, rows: UpdateBatch, chunks: int, cfg: StepConfig) -> Array:
    def one(mb: UpdateBatch):
        logp, _ = rollouts.thought_logprobs(graphdef, params, mb.seq_NxS, mb.predict_at_NxL, mb.thoughts_NxL,
                                            cfg.rollout.temperature, cfg.head_chunk_len, *cfg.rollout.banned_close)
        return jax.lax.stop_gradient(logp)

    return _chunked(one, rows, chunks)


_TOKEN_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "approx_kl")


def policy_gradient(graphdef: nnx.GraphDef, params: Any, minibatch: UpdateBatch,
                    cfg: StepConfig) -> tuple[Any, dict[str, Array]]:
    """The gradient of `losses.policy_loss` over one minibatch of thoughts, summed over
    `grad_accum_steps` micro-batches with weights that make it the gradient of the whole
    minibatch at once; and the loss and its metrics, summed the same way (token metrics as
    token-weighted sums, to be divided by `num_tokens`)."""
    micro = _split(minibatch, cfg.grad_accum_steps)
    taking_part = lambda m: (m.mask_NxL & m.valid_N[..., None]).astype(jnp.float32)
    thoughts_per_micro = (taking_part(micro).sum(-1) > 0).sum(axis=1).astype(jnp.float32)
    total_thoughts = jnp.maximum(thoughts_per_micro.sum(), 1.0)

    def loss_fn(p, m: UpdateBatch, width: int):
        # Only the first `width` columns: every token a row uses lies in them (causal attention
        # makes the cut exact); predictions for masked positions past them are clamped, unused.
        logp, entropy = rollouts.thought_logprobs(graphdef, p, m.seq_NxS[:, :width],
                                                  jnp.minimum(m.predict_at_NxL, width - 1), m.thoughts_NxL,
                                                  cfg.rollout.temperature, cfg.head_chunk_len,
                                                  *cfg.rollout.banned_close)
        old = jax.lax.stop_gradient(logp) if m.old_logp_NxL is None else m.old_logp_NxL
        loss, sm = losses.policy_loss(logp, old, m.advantages_N, m.mask_NxL, rollout_valid_BxG=m.valid_N,
                                      eps_low=cfg.eps_low, eps_high=cfg.eps_high, ref_logp_BxGxL=m.ref_logp_NxL,
                                      kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
        weight = sm["num_thoughts"] / total_thoughts
        num_tokens = taking_part(m).sum()
        aux = {name: sm[name] * num_tokens for name in _TOKEN_METRICS}
        aux |= {"entropy": (entropy * taking_part(m)).sum(), "num_tokens": num_tokens,
                "ratio_max": sm["ratio_max"], "policy_loss": sm["policy_loss"] * weight,
                "kl": sm["kl"] * weight}
        return loss * weight, aux

    widths = bucket_lengths(minibatch.seq_NxS.shape[1], cfg.update_length_buckets)
    branches = [functools.partial(jax.value_and_grad(loss_fn, has_aux=True), width=w) for w in widths]

    def accumulate(grads, m):
        bucket = jnp.searchsorted(jnp.asarray(widths), _row_lengths(m).max())  # the shortest that holds every row
        (loss, aux), g = jax.lax.switch(jnp.minimum(bucket, len(widths) - 1), branches, params, m)
        return jax.tree.map(jnp.add, grads, g), aux | {"loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, aux = jax.lax.scan(accumulate, zeros, micro)
    summed = {k: v.sum() for k, v in aux.items() if k != "ratio_max"}
    return grads, summed | {"ratio_max": aux["ratio_max"].max()}


def _whole_documents(batch: DocumentBatch) -> tuple[Array, Array]:
    lengths_B = batch.token_mask_BxT.sum(-1).astype(jnp.int32)
    return batch.tokens_BxT, jnp.where(batch.example_mask_B, lengths_B, 0)


def _context_and_targets(batch: PromptBatch) -> tuple[Array, Array]:
    seq_BxS, _ = rollouts.context_then_targets(batch)
    lengths_B = batch.context_len_B + batch.target_mask_BxK.sum(-1)
    return seq_BxS, jnp.where(batch.example_mask_B, lengths_B, 0)


def _ntp_step(state, seq_BxS: Array, len_B: Array, graphdef, optimizer, cfg: StepConfig):
    """Continued pretraining: next-token cross-entropy over the first `len_B` tokens of each row
    (`losses.next_token_loss`), through the same optimizer steps, EMA and guard."""
    cfg.check_batch_size(seq_BxS.shape[0])
    targets_mask = lambda m: jnp.arange(1, m["seq"].shape[1])[None] < m["len"][:, None]

    def gradient(params, mb):
        micro = _split(mb, cfg.grad_accum_steps)
        total = jnp.maximum(targets_mask(mb).sum(), 1)

        def loss_fn(p, m):
            model = nnx.merge(graphdef, p)
            positions = jnp.broadcast_to(jnp.arange(m["seq"].shape[1]), m["seq"].shape)
            logits = model(m["seq"][:, :-1], positions[:, :-1])
            mask = targets_mask(m)
            return losses.next_token_loss(logits, m["seq"][:, 1:], mask) * mask.sum() / total

        def accumulate(grads, m):
            loss, g = jax.value_and_grad(loss_fn)(params, m)
            return jax.tree.map(jnp.add, grads, g), loss

        grads, loss = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), micro)
        return grads, {"loss": loss.sum()}

    inputs = {"seq": seq_BxS, "len": len_B}
    (params, ema_params, opt_state, skipped), aux = _optimizer_steps(
        state, _split(inputs, cfg.num_minibatches), gradient, optimizer, cfg)
    metrics = {"loss": aux["loss"].mean(), "grad_norm": aux["grad_norm"].mean(),
               "nonfinite_skipped": skipped, "tokens": jnp.maximum(len_B - 1, 0).sum(),
               "flop_tokens": len_B.sum()}  # NTP processes every input token once
    new_state = dataclasses.replace(state, params=params, ema_params=ema_params, opt_state=opt_state,
                                    step=state.step + 1)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


# ---------------------------------------------------------------- sharded compilation

def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of the state: params, EMA and reference by their logical
    axes, optimizer moments like their params, scalars replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_sharding = sharding.param_shardings(abstract_state.params, mesh, rules)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, params_sharding,
        transform_non_params=lambda _: replicated)
    return TrainState(params=params_sharding, ema_params=params_sharding, opt_state=opt_sharding,
                      step=replicated, rng=replicated,
                      ref_params=None if abstract_state.ref_params is None else params_sharding)


def batch_shardings(batch_example: Batch, mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> Batch:
    """Every field of the batch split over `batch` on its leading (row) axis."""
    spec = sharding.logical_to_mesh(("batch",), rules)
    return jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, spec), batch_example)


def create_sharded_state(params, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                         with_reference: bool = False) -> tuple[TrainState, TrainState]:
    """(state, its shardings): `params` (already sharded or not) wrapped into a TrainState by a
    jitted init with out_shardings, so no device ever holds more than its shard."""
    init = functools.partial(init_state, optimizer=optimizer, seed=seed, with_reference=with_reference)
    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, optimizer, mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings


def abstract_state_from_scratch(model_config, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                                with_reference: bool = False):
    """(graphdef, abstract state, shardings, init) for a randomly initialised model, without
    creating any weights: `init()` builds the state inside one jitted init with out_shardings,
    identical on every process and never unsharded on any device."""
    from rlp_jax.models.families import family_of

    family = family_of(model_config)

    def init_fn(key):
        with nnx.use_eager_sharding(False):
            model = family.build(model_config, nnx.Rngs(params=key))
        return init_state(nnx.state(model, nnx.Param), optimizer, jax.random.fold_in(key, 1), with_reference)

    graphdef, _ = nnx.split(family.abstract_model(model_config), nnx.Param)
    key = jax.random.key(seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = state_shardings(abstract, optimizer, mesh, rules)

    def init():
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jax.jit(init_fn, out_shardings=shardings)(key)

    return graphdef, abstract, shardings, init


def create_state_from_scratch(model_config, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                              with_reference: bool = False):
    """(graphdef, state, shardings) for a randomly initialised model (see abstract_state_from_scratch)."""
    graphdef, _, shardings, init = abstract_state_from_scratch(model_config, optimizer, seed, mesh, rules,
                                                               with_reference)
    return graphdef, init(), shardings


def compile_train_step(graphdef, optimizer, cfg: StepConfig, mesh, state_sharding: TrainState,
                       batch_sharding, rules=sharding.DEFAULT_RULES):
    """The jitted step with explicit in/out shardings and the state donated; call it as
    `state, metrics = step(state, batch)`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg),
                     in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)

    def step(state, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(state, batch)

    step.jitted = jitted
    return step
