"""The RLP objective as pure array functions.

Everything here takes and returns JAX arrays (or pytrees of them): no Flax, no config objects, no
global state. Each function is jit-, vmap- and grad-safe, accepts masks, and accumulates in float32
whatever the input dtype. Equation numbers refer to Hatamizadeh et al., "RLP: Reinforcement as a
Pretraining Objective" (arXiv 2510.01265); see docs/losses.md.

Shape letters: B prompts, G rollouts (thoughts) per prompt, L thought tokens, K target tokens
scored after a thought, T sequence length, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
KLEstimator = Literal["k1", "k2", "k3"]

__all__ = [
    "token_logprobs",
    "information_gain_reward",
    "group_relative_advantages",
    "grpo_advantages",
    "clipped_surrogate_loss",
    "kl_penalty",
    "sparse_match_reward",
    "next_token_loss",
    "ema_update",
    "rlp_advantages",
    "policy_loss",
    "reward_statistics",
    "rlp_loss",
]


def _f32(x: Array) -> Array:
    """Casts to float32, or keeps a wider float (float64) as it is."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean_over_last(values: Array, mask: Array) -> tuple[Array, Array]:
    """Mean of `values` over the valid entries of the last axis; also returns the valid count."""
    mask = mask.astype(values.dtype)
    count = mask.sum(axis=-1)
    return (values * mask).sum(axis=-1) / jnp.maximum(count, 1.0), count


def _mean_over_thoughts(per_token: Array, mask: Array) -> Array:
    """Each thought's mean over its own valid tokens (1/|c|), then the mean over thoughts with
    at least one valid token. A batch with no valid token gives 0."""
    per_thought, count = _masked_mean_over_last(per_token, mask)
    has_tokens = (count > 0).astype(per_token.dtype)
    return (per_thought * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


def token_logprobs(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / temperature) gathered at `targets`.

    The log-probability of each target token under the model (eq. 1 of the paper scores
    `log p_θ(x_t | x_<t, c_t)` this way; the thought policy's `log π_θ(ℓ_u | prefix_u)` too).

    Args:
      logits: `[..., V]`, any float dtype.
      targets: `[...]` integer token ids.
      temperature: the sampling temperature the distribution is taken at. Pass the sampler's
        temperature for behaviour / importance-ratio log-probs so that they match the
        distribution the thoughts were drawn from; pass 1.0 to score tokens.

    Returns:
      `[...]` float32 log-probabilities.

    The float32 upcast feeds a fused max / exp-sum reduction and one gather; nothing of size V is
    returned or kept beyond it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use a positive temperature "
                         "(greedy decoding has no log-probabilities).")
    logits = _f32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    # Shift by the max first: target and normaliser then both stay near 0, so large logits keep
    # their float32 precision (1e4 − 2 and 1e4 differ by exactly 2 after the shift).
    shifted = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    log_normalizer = jnp.log(jnp.exp(shifted).sum(axis=-1))
    target_logits = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)
    return target_logits[..., 0] - log_normalizer


def information_gain_reward(
    logp_reasoned: Array, logp_baseline: Array, mask: Array | None = None
) -> Array:
    """Eq. 5: the information-gain reward `r = log p_θ(x_t|x_<t,c_t) − log p̄_φ(x_t|x_<t)`.

    Args:
      logp_reasoned: `S_pred`, log-probs of the true next token(s) after the thought, e.g. `[B, G]`
        or `[B, G, K]` for K target tokens.
      logp_baseline: `S_ema`, the no-think log-probs of the same tokens from the EMA teacher.
        Broadcast against `logp_reasoned` (give `[B, 1]` / `[B, 1, K]` to share one baseline per
        prompt across its G thoughts).
      mask: optional `[..., K]` validity of each target token. When given, the last axis is the
        target axis and the valid per-token gains are summed over it (a multi-token reward);
        when omitted the result keeps the input shape.

    Returns:
      float32 rewards, a constant for autodiff (stop-gradient): no gradient flows into the
      predictor or the teacher through the reward.
    """
    gain = _f32(logp_reasoned) - _f32(logp_baseline)
    if mask is not None:
        gain = jnp.where(mask, gain, 0.0).sum(axis=-1)
    return jax.lax.stop_gradient(gain)


def group_relative_advantages(rewards_BxG: Array, valid_BxG: Array | None = None) -> Array:
    """Eq. 7: `A_i = G/(G−1) · (r_i − mean_j r_j)`, a stop-gradient constant.

    The factor G/(G−1) makes this the leave-one-out baseline: `A_i = r_i − mean_{j≠i} r_j`.

    Args:
      rewards_BxG: rewards with the G rollouts of one prompt on the last axis.
      valid_BxG: optional mask of rollouts that take part. Invalid rollouts get advantage 0 and
        are left out of their group's mean; a group with fewer than two valid rollouts gets 0
        everywhere (a leave-one-out baseline needs another rollout).

    Raises:
      ValueError: at trace time when G < 2.
    """
    num_rollouts = rewards_BxG.shape[-1]
    if num_rollouts < 2:
        raise ValueError(f"group_relative_advantages needs at least 2 rollouts per prompt (got G="
                         f"{num_rollouts} on the last axis); sample G >= 2 thoughts per prompt.")
    rewards = _f32(rewards_BxG)
    if valid_BxG is None:
        valid = jnp.ones_like(rewards)
    else:
        valid = valid_BxG.astype(rewards.dtype)
    count = valid.sum(axis=-1, keepdims=True)
    mean = (rewards * valid).sum(axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    scale = jnp.where(count >= 2, count / jnp.maximum(count - 1.0, 1.0), 0.0)
    return jax.lax.stop_gradient(scale * (rewards - mean) * valid)


def grpo_advantages(rewards_BxG: Array, valid_BxG: Array | None = None, eps: float = 1e-6) -> Array:
    """GRPO's group-normalised advantage (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300,
    its outcome-supervision advantage), the advantage RPT (Dong et al. 2025, arXiv 2506.08007) trains
    with: `A_i = (r_i − mean_j r_j) / (std_j r_j + eps)`, a stop-gradient constant.

    `std` is the sample standard deviation of the group (divisor n − 1, as `torch.std` in the
    GRPO implementations TRL and verl), `eps = 1e-6` as verl's default. The paper writes only
    `std(r)`; with binary rewards the divisor changes the scale of A, not its sign.

    Args:
      rewards_BxG: rewards with the G rollouts of one prompt on the last axis.
      valid_BxG: optional mask of rollouts that take part. Invalid rollouts get advantage 0 and
        are left out of their group's mean and std; a group with fewer than two valid rollouts,
        or whose valid rewards are all equal (no signal), gets 0 everywhere — exactly 0, not the
        rounding residue of `r − mean` over `eps`.
    """
    rewards = _f32(rewards_BxG)
    valid = (jnp.ones(rewards.shape, bool) if valid_BxG is None else valid_BxG.astype(bool))
    fvalid = valid.astype(rewards.dtype)
    count = fvalid.sum(axis=-1, keepdims=True)
    mean = (rewards * fvalid).sum(axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = (rewards - mean) * fvalid
    std = jnp.sqrt((centred**2).sum(axis=-1, keepdims=True) / jnp.maximum(count - 1.0, 1.0))
    highest = jnp.where(valid, rewards, -jnp.inf).max(axis=-1, keepdims=True)
    lowest = jnp.where(valid, rewards, jnp.inf).min(axis=-1, keepdims=True)
    signal = (count >= 2) & (highest > lowest)
    return jax.lax.stop_gradient(jnp.where(signal & valid, centred / (std + eps), 0.0))


def clipped_surrogate_loss(
    logp_BxGxL: Array,
    old_logp_BxGxL: Array,
    advantages_BxG: Array,
    mask_BxGxL: Array,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Eq. 8 / Algorithm 1 line 14: the clipped policy-gradient surrogate over thought tokens.

    Per token `ρ_u = exp(log π_θ − log π_θold)`; per thought
    `L_i = −(1/|c_i|) Σ_u min(ρ_u A_i, clip(ρ_u, 1−ε_low, 1+ε_high) A_i)`; the loss is the mean of
    `L_i` over all thoughts with at least one valid token. Gradient flows only through
    `logp_BxGxL` (the current policy's log-probs of the sampled thought tokens).

    Args:
      logp_BxGxL: log π_θ of each sampled thought token (any leading dims; L last).
      old_logp_BxGxL: log π_θold, the behaviour log-probs (treated as constants).
      advantages_BxG: one advantage per thought (treated as constants).
      mask_BxGxL: valid thought tokens; masked positions contribute nothing, whatever they hold.
      eps_low, eps_high: clip range `[1 − eps_low, 1 + eps_high]`.

    Returns:
      `(loss, metrics)`; metrics (token-weighted over valid tokens): `clip_frac_low` (A < 0 and
      ρ < 1 − ε_low: the clip binds and the token gets no gradient), `clip_frac_high` (A > 0 and
      ρ > 1 + ε_high), `clip_frac`, `ratio_mean`, `ratio_max`, `approx_kl` (k3 estimate of
      KL(π_θold ‖ π_θ) on the sampled tokens), `num_thoughts` (thoughts with a valid token).
    """
    mask = mask_BxGxL.astype(bool)
    log_ratio = jnp.where(mask, _f32(logp_BxGxL) - jax.lax.stop_gradient(_f32(old_logp_BxGxL)), 0.0)
    ratio = jnp.exp(log_ratio)
    advantages = jax.lax.stop_gradient(_f32(advantages_BxG))[..., None]
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    surrogate = jnp.minimum(unclipped, clipped)
    loss = -_mean_over_thoughts(surrogate, mask)

    ratio_c = jax.lax.stop_gradient(ratio)
    fmask = mask.astype(jnp.float32)
    num_tokens = jnp.maximum(fmask.sum(), 1.0)
    token_mean = lambda x: (x.astype(jnp.float32) * fmask).sum() / num_tokens
    low = (advantages < 0) & (ratio_c < 1.0 - eps_low)
    high = (advantages > 0) & (ratio_c > 1.0 + eps_high)
    neg_log_ratio = -jax.lax.stop_gradient(log_ratio)
    metrics = {
        "clip_frac_low": token_mean(low),
        "clip_frac_high": token_mean(high),
        "clip_frac": token_mean(low | high),
        "ratio_mean": token_mean(ratio_c),
        "ratio_max": jnp.where(mask, ratio_c, -jnp.inf).max(initial=-jnp.inf),
        "approx_kl": token_mean(jnp.exp(-neg_log_ratio) - 1.0 + neg_log_ratio),
        "num_thoughts": (fmask.sum(axis=-1) > 0).sum().astype(jnp.float32),
    }
    return loss, metrics


def kl_penalty(
    logp: Array, ref_logp: Array, mask: Array, estimator: KLEstimator = "k3"
) -> Array:
    """Per-token estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ (the paper's β-ablation).

    With `d = log π_ref − log π_θ`: `k1 = −d` (unbiased, can be negative), `k2 = d²/2`,
    `k3 = exp(d) − 1 − d` (unbiased, non-negative; Schulman's estimator, as used by GRPO).
    Averaged like the surrogate: over each thought's valid tokens, then over thoughts with at
    least one valid token, so that `loss = surrogate + β · kl_penalty(...)` weighs both alike.
    Gradient flows through `logp` only.
    """
    d = jnp.where(mask, jax.lax.stop_gradient(_f32(ref_logp)) - _f32(logp), 0.0)
    if estimator == "k1":
        per_token = -d
    elif estimator == "k2":
        per_token = 0.5 * d**2
    elif estimator == "k3":
        per_token = jnp.exp(d) - 1.0 - d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of 'k1', 'k2', 'k3'.")
    return _mean_over_thoughts(per_token, mask.astype(bool))


def sparse_match_reward(
    predicted_ids: Array, target_ids: Array, mask: Array | None = None
) -> Array:
    """A token-level sparse binary reward: 1 where the token(s) predicted after the thought equal
    the true next token(s), else 0. It ignores how much the thought helped ("Sparse < Dense");
    RPT's own reward, a byte-level prefix match, is `prefix_match_reward`.

    With `mask` (`[..., K]`) the last axis is the target axis and the reward is 1 only if every
    valid target token matches (a prefix match); without it the comparison is elementwise.
    Returns float32, a constant for autodiff.
    """
    match = predicted_ids == target_ids
    if mask is not None:
        match = jnp.all(match | ~mask.astype(bool), axis=-1)
    return jax.lax.stop_gradient(match.astype(jnp.float32))


def concat_token_bytes(tokens: Array, bytes_VxW: Array, length_V: Array, mask: Array | None = None
                       ) -> tuple[Array, Array]:
    """The bytes of each row's tokens (`tokens[..., M]`, the `mask`ed ones only) end to end:
    `(bytes[..., M·W] uint8 zero-padded, length[...])`, from a token byte table (`bytes_VxW`,
    `length_V`: rlp_jax.data.tokenizer.token_byte_table)."""
    lead, M = tokens.shape[:-1], tokens.shape[-1]
    W = bytes_VxW.shape[1]
    flat = tokens.reshape(-1, M)
    lengths = jnp.asarray(length_V)[flat]
    if mask is not None:
        lengths = jnp.where(mask.reshape(-1, M), lengths, 0)
    offsets = jnp.cumsum(lengths, axis=-1) - lengths
    w = jnp.arange(W)
    index = jnp.where(w < lengths[..., None], offsets[..., None] + w, M * W)  # past the end: dropped
    rows = jnp.arange(flat.shape[0])[:, None, None]
    out = jnp.zeros((flat.shape[0], M * W + 1), jnp.uint8).at[rows, index].set(jnp.asarray(bytes_VxW)[flat])
    return out[:, :-1].reshape(*lead, M * W), lengths.sum(-1).reshape(lead)


def _before_first_end(ids: Array, end_ids: tuple[int, ...]) -> Array:
    """True on the tokens before the first of `end_ids` on the last axis (all of them without)."""
    if not end_ids:
        return jnp.ones(ids.shape, bool)
    return jnp.cumsum(jnp.isin(ids, jnp.asarray(end_ids)), axis=-1) == 0


def prefix_match_reward(prediction: Array, target_ids: Array, target_mask: Array, bytes_VxW: Array,
                        length_V: Array, end_ids: tuple[int, ...] = ()) -> Array:
    """The sparse reward of RPT (Dong et al. 2025, arXiv 2506.08007, its prefix-matching reward),
    the baseline the RLP paper compares against: 1 where the predicted text is a non-empty byte
    prefix of the true continuation that ends on one of its token boundaries, else 0.

    - The predicted text is the bytes of `prediction[..., M]` before its first end marker
      (`end_ids`: EOS, padding). The marker closes the prediction, as the end of RPT's answer
      does; it claims nothing about the document. So `[eos, x_t, …]` predicts no text (0) and
      `[x_t, eos]` predicts `x_t`, exactly like `[x_t]`.
    - The true continuation is the bytes of the valid `target_ids[..., K]` before the document's
      end (its first end marker). A prediction that runs past the end of the document, or past
      the K tokens scored, cannot be verified as a prefix and gets 0.
    Without `end_ids`, zero-byte tokens are skipped wherever they stand. Float32, a constant
    for autodiff."""
    pred, pred_len = concat_token_bytes(prediction, bytes_VxW, length_V, _before_first_end(prediction, end_ids))
    target_mask = target_mask.astype(bool) & _before_first_end(target_ids, end_ids)
    target, target_len = concat_token_bytes(target_ids, bytes_VxW, length_V, target_mask)
    width = max(pred.shape[-1], target.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    pred, target = pad(pred), pad(target)
    same = jnp.all((pred == target) | (jnp.arange(width) >= pred_len[..., None]), axis=-1)
    t_lengths = jnp.where(target_mask, jnp.asarray(length_V)[target_ids], 0)
    on_boundary = jnp.any((jnp.cumsum(t_lengths, axis=-1) == pred_len[..., None]) & target_mask, axis=-1)
    match = same & on_boundary & (pred_len > 0) & (pred_len <= target_len)
    return jax.lax.stop_gradient(match.astype(jnp.float32))


def top_k_entropy(logits: Array, k: int = 16) -> Array:
    """Entropy (nats) of the next-token distribution restricted to its `k` most likely tokens and
    renormalised: RPT's measure of how hard a position is for a proxy model (top-16)."""
    top, _ = jax.lax.top_k(logits.astype(jnp.float32), k)
    logp = jax.nn.log_softmax(top, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def text_token_entropy(logits: Array, marker_ids: tuple[int, ...], k: int = 16) -> Array:
    """RPT's hardness of a position: the top-k entropy (`top_k_entropy`) of the next TEXT token,
    the think markers masked out first, since a proxy that expects `<think>` is not thereby sure
    of the text (the demo's warm-up puts most of its mass on the marker at every answer)."""
    masked = logits.astype(jnp.float32).at[..., jnp.asarray(marker_ids)].set(jnp.finfo(jnp.float32).min)
    return top_k_entropy(masked, k)


def next_token_loss(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """The NTP / continued-pretraining objective: mean cross-entropy over valid tokens.

    `logits[..., t, :]` must already predict `targets[..., t]` (shift before calling).
    """
    nll = -token_logprobs(logits, targets)
    if mask is None:
        return nll.mean()
    fmask = mask.astype(nll.dtype)
    return (nll * fmask).sum() / jnp.maximum(fmask.sum(), 1.0)


def ema_update(ema_params: Any, params: Any, decay: float | Array) -> Any:
    """Algorithm 1 line 15: the EMA teacher update `φ ← τ φ + (1 − τ) θ` on a pytree.

    The arithmetic is float32 (or wider) and each leaf keeps the EMA's own dtype. Keep the EMA in
    float32: with τ = 0.999 a step moves φ by 1e-3 of the gap, which bfloat16 rounds away.
    """

    def update(ema_leaf, leaf):
        ema = _f32(ema_leaf)
        # φ + (1 − τ)(θ − φ): the same update, but exact when φ = θ (the lazy init's first step).
        return (ema + (1.0 - decay) * (_f32(leaf) - ema)).astype(ema_leaf.dtype)

    return jax.tree.map(update, ema_params, params)


def rlp_advantages(
    logp_reasoned_BxG: Array,
    logp_baseline_B: Array,
    *,
    target_mask: Array | None = None,
    rollout_valid_BxG: Array | None = None,
) -> tuple[Array, Array]:
    """Eq. 5 then eq. 7: the information-gain reward of each of the G thoughts of a prompt against
    the prompt's one no-think baseline, and the group-relative advantages of those rewards.

    Args:
      logp_reasoned_BxG: `S_pred`, `[B, G]`, or `[B, G, K]` with `target_mask`.
      logp_baseline_B: `S_ema`, `[B]` or `[B, K]`: one baseline per prompt, shared by its G thoughts.
      target_mask: `[B, K]` or `[B, G, K]` validity of multi-token targets (gains summed over K).
      rollout_valid_BxG: rollouts that take part; the others get reward 0 and advantage 0 and
        are left out of their group's mean.

    Returns:
      `(rewards_BxG, advantages_BxG)`, both float32 constants for autodiff.
    """
    baseline = jnp.expand_dims(logp_baseline_B, 1)  # one per prompt, shared across G
    if target_mask is not None and target_mask.ndim == logp_baseline_B.ndim:
        target_mask = jnp.expand_dims(target_mask, 1)
    rewards_BxG = information_gain_reward(logp_reasoned_BxG, baseline, target_mask)
    if rollout_valid_BxG is not None:
        rewards_BxG = jnp.where(rollout_valid_BxG, rewards_BxG, 0.0)
    return rewards_BxG, group_relative_advantages(rewards_BxG, rollout_valid_BxG)


def policy_loss(
    logp_BxGxL: Array,
    old_logp_BxGxL: Array,
    advantages_BxG: Array,
    thought_mask_BxGxL: Array,
    *,
    rollout_valid_BxG: Array | None = None,
    ref_logp_BxGxL: Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """The loss that carries the gradient: the clipped surrogate (eq. 8) over the thought tokens
    of the rollouts that take part, plus `kl_coef` × the KL estimate to a reference policy.

    Whatever produced the advantages (the dense information gain, a sparse match reward), this
    is the update. Invalid rollouts' tokens are masked out: they count in no normaliser.

    Returns:
      `(loss, metrics)`: the surrogate's metrics plus `policy_loss` and `kl`.
    """
    mask = thought_mask_BxGxL.astype(bool)
    if rollout_valid_BxG is not None:
        mask = mask & rollout_valid_BxG.astype(bool)[..., None]
    surrogate, metrics = clipped_surrogate_loss(
        logp_BxGxL, old_logp_BxGxL, advantages_BxG, mask, eps_low, eps_high)
    if kl_coef:
        if ref_logp_BxGxL is None:
            raise ValueError("kl_coef > 0 needs ref_logp_BxGxL; pass the reference policy's "
                             "log-probs of the thought tokens, or set kl_coef=0.")
        kl = kl_penalty(logp_BxGxL, ref_logp_BxGxL, mask, kl_estimator)
    else:
        kl = jnp.zeros((), jnp.float32)
    return surrogate + kl_coef * kl, {**metrics, "policy_loss": surrogate, "kl": kl}


def reward_statistics(rewards_BxG: Array, advantages_BxG: Array,
                      rollout_valid_BxG: Array | None = None) -> dict[str, Array]:
    """`reward_mean`, `reward_std`, `reward_pos_frac` and `advantage_abs_mean` over the rollouts
    that take part (what an RLP run logs about its rewards)."""
    valid = (jnp.ones(rewards_BxG.shape, jnp.float32) if rollout_valid_BxG is None
             else rollout_valid_BxG.astype(jnp.float32))
    n = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: (x * valid).sum() / n
    reward_mean = mean(rewards_BxG)
    return {"reward_mean": reward_mean,
            "reward_std": jnp.sqrt(mean((rewards_BxG - reward_mean) ** 2)),
            "reward_pos_frac": mean((rewards_BxG > 0).astype(jnp.float32)),
            "advantage_abs_mean": mean(jnp.abs(advantages_BxG))}


def rlp_loss(
    logp_BxGxL: Array,
    old_logp_BxGxL: Array,
    thought_mask_BxGxL: Array,
    logp_reasoned_BxG: Array,
    logp_baseline_B: Array,
    *,
    target_mask: Array | None = None,
    rollout_valid_BxG: Array | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp_BxGxL: Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Array, dict[str, Array]]:
    """The whole RLP objective for callers that already have the log-probabilities:
    `rlp_advantages` (eq. 5, eq. 7) then `policy_loss` (eq. 8, + β · KL when `kl_coef > 0`) —
    the same two functions rlp-jax's own train step calls.

    Args:
      logp_BxGxL: current-policy log-probs of the thought tokens (carries the gradient).
      old_logp_BxGxL: behaviour log-probs of the same tokens.
      thought_mask_BxGxL: valid thought tokens.
      logp_reasoned_BxG: `S_pred`, `[B, G]` or `[B, G, K]` with `target_mask`.
      logp_baseline_B: `S_ema`, `[B]` or `[B, K]`: one no-think baseline per prompt, shared by
        its G thoughts.
      target_mask: `[B, K]` or `[B, G, K]` validity of multi-token targets.
      rollout_valid_BxG: rollouts that take part in the group baseline and the loss.
      ref_logp_BxGxL: reference-policy log-probs; required when `kl_coef > 0`.

    Returns:
      `(loss, metrics)` with the surrogate's metrics plus `policy_loss`, `kl` and
      `reward_statistics`.
    """
    rewards_BxG, advantages_BxG = rlp_advantages(
        logp_reasoned_BxG, logp_baseline_B, target_mask=target_mask,
        rollout_valid_BxG=rollout_valid_BxG)
    loss, metrics = policy_loss(
        logp_BxGxL, old_logp_BxGxL, advantages_BxG, thought_mask_BxGxL,
        rollout_valid_BxG=rollout_valid_BxG, eps_low=eps_low, eps_high=eps_high,
        ref_logp_BxGxL=ref_logp_BxGxL, kl_coef=kl_coef, kl_estimator=kl_estimator)
    return loss, metrics | reward_statistics(rewards_BxG, advantages_BxG, rollout_valid_BxG)
