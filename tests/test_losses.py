"""rlp_jax.losses against hand-computed numbers, gradients, masks, dtypes and the paper's propositions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax import losses


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- token_logprobs

def test_token_logprobs_hand_computed():
    logits = jnp.array([[0.0, math.log(3.0)], [1.0, 1.0]])
    got = losses.token_logprobs(logits, jnp.array([1, 0]))
    np.testing.assert_allclose(got, [math.log(0.75), math.log(0.5)], rtol=1e-6)


def test_token_logprobs_temperature_scales_logits():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    got = losses.token_logprobs(logits, targets, temperature=0.7)
    want = np.take_along_axis(log_softmax_np(np.asarray(logits) / 0.7), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        losses.token_logprobs(logits, targets, temperature=0.0)


def test_token_logprobs_numerically_stable_for_huge_logits():
    logits = jnp.array([[1e4, 1e4 - 2.0, -1e4]])
    got = losses.token_logprobs(logits, jnp.array([1]))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [-2.0 - math.log1p(math.exp(-2.0))], rtol=1e-6)


def test_token_logprobs_bf16_matches_float32_of_same_values():
    logits32 = 4.0 * jax.random.normal(jax.random.key(2), (4, 7, 50))
    logits16 = logits32.astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(3), (4, 7), 0, 50)
    got = losses.token_logprobs(logits16, targets)
    assert got.dtype == jnp.float32
    # Exact float32 math on the bf16 values: equal to the float32 answer for the rounded inputs...
    np.testing.assert_allclose(got, losses.token_logprobs(logits16.astype(jnp.float32), targets), atol=1e-6)
    # ...and within bf16 rounding of the unrounded float32 answer.
    np.testing.assert_allclose(got, losses.token_logprobs(logits32, targets), atol=0.1)


# ---------------------------------------------------------------- information gain

def test_information_gain_reward_hand_computed_and_broadcast():
    reasoned_BxG = jnp.array([[-1.0, -3.0], [-0.5, -0.25]])
    baseline_Bx1 = jnp.array([[-2.0], [-0.5]])
    got = losses.information_gain_reward(reasoned_BxG, baseline_Bx1)
    np.testing.assert_allclose(got, [[1.0, -1.0], [0.0, 0.25]])


def test_information_gain_reward_multi_token_sums_valid_terms():
    reasoned = jnp.array([[[-1.0, -2.0, -7.0]]])
    baseline = jnp.array([[[-1.5, -1.0, 99.0]]])
    mask = jnp.array([[[True, True, False]]])
    got = losses.information_gain_reward(reasoned, baseline, mask)
    assert got.shape == (1, 1)
    np.testing.assert_allclose(got, [[0.5 - 1.0]])


def test_information_gain_reward_is_stop_gradient():
    grad = jax.grad(lambda a, b: losses.information_gain_reward(a, b).sum(), argnums=(0, 1))(
        jnp.ones(3), jnp.zeros(3))
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in grad)


# ---------------------------------------------------------------- advantages

def test_group_relative_advantages_hand_computed_equals_leave_one_out():
    rewards = jnp.array([[1.0, 2.0, 3.0, 6.0]])
    got = losses.group_relative_advantages(rewards)
    np.testing.assert_allclose(got, [[-8 / 3, -4 / 3, 0.0, 4.0]], rtol=1e-6)
    r = np.asarray(rewards[0])
    loo = [r[i] - np.delete(r, i).mean() for i in range(4)]
    np.testing.assert_allclose(got[0], loo, rtol=1e-6)


def test_group_relative_advantages_rejects_single_rollout_at_trace_time():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        jax.jit(losses.group_relative_advantages)(jnp.ones((4, 1)))


def test_group_relative_advantages_valid_mask():
    rewards = jnp.array([[1.0, 5.0, 3.0], [2.0, 100.0, 0.0]])
    valid = jnp.array([[True, False, True], [False, True, False]])
    got = losses.group_relative_advantages(rewards, valid)
    # Row 0: two valid rollouts (1, 3): mean 2, factor 2 -> (-2, 0, 2). Row 1: one valid -> all 0.
    np.testing.assert_allclose(got, [[-2.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    grad = jax.grad(lambda r: losses.group_relative_advantages(r).sum())(rewards)
    assert float(jnp.abs(grad).sum()) == 0.0


# ---------------------------------------------------------------- clipped surrogate

def test_clipped_surrogate_hand_computed():
    # One prompt, two thoughts. Thought 0 (A=+1): ratios 1.5 (clipped to 1.2) and 0.5 (unclipped),
    # one masked token. Thought 1 (A=-2): ratio 0.5 (clipped to 0.8: -1.6 vs -1.0 -> min -1.6).
    logp = jnp.log(jnp.array([[[1.5, 0.5, 7.0], [0.5, 1.0, 1.0]]]))
    old = jnp.zeros_like(logp)
    adv = jnp.array([[1.0, -2.0]])
    mask = jnp.array([[[True, True, False], [True, False, False]]])
    loss, m = losses.clipped_surrogate_loss(logp, old, adv, mask)
    thought0 = (min(1.5, 1.2) * 1.0 + 0.5 * 1.0) / 2
    thought1 = min(0.5 * -2.0, 0.8 * -2.0)
    np.testing.assert_allclose(loss, -(thought0 + thought1) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (1.5 + 0.5 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-6)
    assert float(m["num_thoughts"]) == 2.0


def test_surrogate_gradient_at_ratio_one_is_advantage_over_length():
    key = jax.random.key(4)
    logp = -jax.random.uniform(key, (2, 3, 5), minval=0.1, maxval=3.0)
    adv = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]])
    lengths = jnp.array([[5, 2, 1], [3, 4, 0]])  # the last thought is empty
    mask = jnp.arange(5) < lengths[..., None]
    grad = jax.grad(lambda lp: losses.clipped_surrogate_loss(lp, logp, adv, mask)[0])(logp)
    num_thoughts = 5  # thoughts with at least one valid token
    want = jnp.where(mask, -(adv / jnp.maximum(lengths, 1))[..., None] / num_thoughts, 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_surrogate_gradient_vanishes_only_where_clipping_binds(advantage):
    eps_low, eps_high = 0.1, 0.3
    ratios = jnp.array([0.85, 0.95, 1.2, 1.35])
    logp = jnp.log(ratios)[None, None]
    old = jnp.zeros_like(logp)
    mask = jnp.ones_like(logp, bool)
    grad = jax.grad(lambda lp: losses.clipped_surrogate_loss(
        lp, old, jnp.array([[advantage]]), mask, eps_low, eps_high)[0])(logp)[0, 0]
    # d/dlogp of -(ρ A)/|c| is -ρ A/4 where unclipped; 0 where the clip binds.
    if advantage > 0:  # binds above 1 + eps_high only
        want = [-0.85 / 4, -0.95 / 4, -1.2 / 4, 0.0]
    else:  # binds below 1 - eps_low only
        want = [0.0, 0.95 / 4, 1.2 / 4, 1.35 / 4]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)


def test_surrogate_masked_tokens_and_empty_thoughts_contribute_nothing():
    logp = jnp.array([[[-1.0, -2.0], [-0.5, -0.5]]])
    old = jnp.array([[[-1.1, -1.9], [-0.4, -0.6]]])
    adv = jnp.array([[1.0, -1.0]])
    mask = jnp.array([[[True, False], [False, False]]])
    garbage_logp = logp.at[0, 0, 1].set(jnp.nan).at[0, 1].set(jnp.inf)
    garbage_old = old.at[0, 0, 1].set(-jnp.inf).at[0, 1].set(jnp.nan)
    garbage_adv = adv  # the empty thought's advantage does not matter either
    clean, _ = losses.clipped_surrogate_loss(logp[:, :1, :1], old[:, :1, :1], adv[:, :1], mask[:, :1, :1])
    loss, metrics = losses.clipped_surrogate_loss(garbage_logp, garbage_old, garbage_adv, mask)
    np.testing.assert_allclose(loss, clean, rtol=1e-6)
    grad = jax.grad(lambda lp: losses.clipped_surrogate_loss(lp, garbage_old, adv, mask)[0])(garbage_logp)
    assert np.isfinite(grad).all() and float(grad[0, 0, 0]) != 0.0
    assert float(jnp.abs(grad).sum()) == float(jnp.abs(grad[0, 0, 0]))
    assert float(metrics["num_thoughts"]) == 1.0
    all_masked, _ = losses.clipped_surrogate_loss(logp, old, adv, jnp.zeros_like(mask))
    assert float(all_masked) == 0.0


def test_surrogate_bf16_inputs_match_float32_within_rounding():
    key1, key2, key3 = jax.random.split(jax.random.key(5), 3)
    logp = -jax.random.uniform(key1, (4, 4, 8), minval=0.1, maxval=4.0)
    old = logp + 0.3 * jax.random.normal(key2, logp.shape)
    adv = jax.random.normal(key3, (4, 4))
    mask = jnp.ones(logp.shape, bool)
    l32, _ = losses.clipped_surrogate_loss(logp, old, adv, mask)
    l16, _ = losses.clipped_surrogate_loss(logp.astype(jnp.bfloat16), old.astype(jnp.bfloat16),
                                           adv.astype(jnp.bfloat16), mask)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.02)


# ---------------------------------------------------------------- KL, sparse reward, NTP, EMA

def test_kl_estimators_hand_computed():
    logp = jnp.array([[[-1.0, -2.0]]])
    ref = jnp.array([[[-1.5, -1.0]]])
    mask = jnp.ones_like(logp, bool)
    d = np.array([-0.5, 1.0])  # ref - logp
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, mask, "k1"), (-d).mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, mask, "k2"), (0.5 * d**2).mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref, mask, "k3"), (np.exp(d) - 1 - d).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="k1"):
        losses.kl_penalty(logp, ref, mask, "k4")


def test_kl_k1_and_k3_are_unbiased_for_the_true_kl():
    p = jax.nn.log_softmax(jnp.array([0.0, 1.0, -1.0, 2.0]))
    q = jax.nn.log_softmax(jnp.array([0.5, 0.0, 0.0, 1.0]))
    samples = jax.random.categorical(jax.random.key(6), p, shape=(1, 200_000, 1))
    mask = jnp.ones(samples.shape, bool)
    true_kl = float((jnp.exp(p) * (p - q)).sum())
    for estimator in ("k1", "k3"):
        est = losses.kl_penalty(p[samples], q[samples], mask, estimator)
        np.testing.assert_allclose(est, true_kl, atol=0.01)


def test_sparse_match_reward():
    pred = jnp.array([[3, 4], [5, 5]])
    target = jnp.array([[3, 0], [5, 5]])
    np.testing.assert_array_equal(losses.sparse_match_reward(pred, target), [[1.0, 0.0], [1.0, 1.0]])
    mask = jnp.array([[True, False], [True, True]])
    np.testing.assert_array_equal(losses.sparse_match_reward(pred, target, mask), [1.0, 1.0])
    np.testing.assert_array_equal(losses.sparse_match_reward(pred, target, jnp.ones_like(mask)), [0.0, 1.0])


def test_next_token_loss_hand_computed_with_mask():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    targets = jnp.array([[1, 0, 1]])
    mask = jnp.array([[True, True, False]])
    want = -(math.log(0.75) + math.log(0.5)) / 2
    np.testing.assert_allclose(losses.next_token_loss(logits, targets, mask), want, rtol=1e-6)
    full = -(math.log(0.75) + math.log(0.5) + float(jax.nn.log_softmax(logits[0, 2])[1])) / 3
    np.testing.assert_allclose(losses.next_token_loss(logits, targets), full, rtol=1e-6)


def test_ema_update_values_and_dtypes():
    ema = {"w": jnp.array([1.0, 2.0], jnp.float32), "b": jnp.array([4.0], jnp.bfloat16)}
    params = {"w": jnp.array([3.0, 2.0], jnp.bfloat16), "b": jnp.array([0.0], jnp.float32)}
    new = losses.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(new["w"], [1.5, 2.0])
    np.testing.assert_allclose(new["b"].astype(jnp.float32), [3.0])
    assert new["w"].dtype == jnp.float32 and new["b"].dtype == jnp.bfloat16


def test_ema_in_float32_keeps_small_updates_that_bf16_loses():
    ema32 = jnp.ones((), jnp.float32)
    ema16 = jnp.ones((), jnp.bfloat16)
    theta = jnp.full((), 1.5, jnp.bfloat16)
    for _ in range(10):
        ema32 = losses.ema_update(ema32, theta, 0.999)
        ema16 = losses.ema_update(ema16, theta, 0.999)
    np.testing.assert_allclose(ema32, 1.0 + 0.5 * (1 - 0.999**10), rtol=1e-6)
    assert float(ema16) == 1.0  # the motivation for keeping φ in float32


# ---------------------------------------------------------------- rlp_loss

def _rollout_batch(key, B=3, G=4, L=6, K=2):
    k = jax.random.split(key, 6)
    logp = -jax.random.uniform(k[0], (B, G, L), minval=0.1, maxval=3.0)
    old = logp + 0.1 * jax.random.normal(k[1], logp.shape)
    mask = jnp.arange(L) < jax.random.randint(k[2], (B, G, 1), 1, L + 1)
    reasoned = -jax.random.uniform(k[3], (B, G, K), minval=0.1, maxval=4.0)
    baseline = -jax.random.uniform(k[4], (B, K), minval=0.1, maxval=4.0)
    target_mask = jnp.arange(K) < jax.random.randint(k[5], (B, 1), 1, K + 1)
    return logp, old, mask, reasoned, baseline, target_mask


def test_rlp_loss_is_the_composition_of_its_parts():
    logp, old, mask, reasoned, baseline, target_mask = _rollout_batch(jax.random.key(7))
    ref = logp - 0.2
    loss, m = losses.rlp_loss(logp, old, mask, reasoned, baseline, target_mask=target_mask,
                              ref_logp_BxGxL=ref, kl_coef=0.1, eps_low=0.2, eps_high=0.28)
    rewards = losses.information_gain_reward(reasoned, baseline[:, None], target_mask[:, None])
    adv = losses.group_relative_advantages(rewards)
    surrogate, _ = losses.clipped_surrogate_loss(logp, old, adv, mask, 0.2, 0.28)
    kl = losses.kl_penalty(logp, ref, mask, "k3")
    np.testing.assert_allclose(loss, surrogate + 0.1 * kl, rtol=1e-6)
    np.testing.assert_allclose(m["reward_mean"], rewards.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["reward_std"], rewards.std(), rtol=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        losses.rlp_loss(logp, old, mask, reasoned, baseline, target_mask=target_mask, kl_coef=0.1)


def test_rlp_loss_gradient_only_through_thought_logprobs():
    logp, old, mask, reasoned, baseline, target_mask = _rollout_batch(jax.random.key(8))
    grads = jax.grad(lambda *a: losses.rlp_loss(*a, target_mask=target_mask)[0], argnums=(0, 1, 3, 4))(
        logp, old, mask, reasoned, baseline)
    assert float(jnp.abs(grads[0]).sum()) > 0
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in grads[1:])


def test_jit_vmap_grad_compose():
    batch = _rollout_batch(jax.random.key(9))
    logp, old, mask, reasoned, baseline, target_mask = batch
    fn = lambda lp: losses.rlp_loss(lp, old, mask, reasoned, baseline, target_mask=target_mask)[0]
    # The loss is a mean of O(1) terms that nearly cancel (centred advantages): fused and op-by-op
    # summation orders differ by rounding at the terms' scale, not at the mean's (3.9e-8 seen).
    np.testing.assert_allclose(jax.jit(fn)(logp), fn(logp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(fn))(logp), jax.grad(fn)(logp), rtol=1e-5, atol=1e-8)
    # vmap over an outer "micro-batch" axis equals separate calls.
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), batch, _rollout_batch(jax.random.key(10)))
    per_call = jax.vmap(lambda *a: losses.rlp_loss(*a[:5], target_mask=a[5])[0])(*stacked)
    separate = [losses.rlp_loss(*jax.tree.map(lambda x: x[i], stacked)[:5],
                                target_mask=stacked[5][i])[0] for i in range(2)]
    np.testing.assert_allclose(per_call, separate, rtol=1e-6)


# ---------------------------------------------------------------- the paper's propositions

def test_proposition_1_expected_reward_is_cross_entropy_difference():
    """E_{x~p*}[r] = CE(p*, p̄_φ) − CE(p*, p_θ(·|x_<t, c)) for a fixed thought."""
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    V = 12
    p_star = jax.nn.softmax(2.0 * jax.random.normal(k1, (V,)))
    reasoned_logits = jax.random.normal(k2, (V,))
    baseline_logits = jax.random.normal(k3, (V,))
    every_token = jnp.arange(V)
    rewards_V = losses.information_gain_reward(
        losses.token_logprobs(jnp.broadcast_to(reasoned_logits, (V, V)), every_token),
        losses.token_logprobs(jnp.broadcast_to(baseline_logits, (V, V)), every_token))
    ce = lambda p, logits: -float((np.asarray(p) * log_softmax_np(logits)).sum())
    want = ce(p_star, baseline_logits) - ce(p_star, reasoned_logits)
    np.testing.assert_allclose(float((p_star * rewards_V).sum()), want, rtol=1e-5)
    # The same by sampling next tokens from the data distribution.
    samples = jax.random.categorical(jax.random.key(12), jnp.log(p_star), shape=(400_000,))
    n = samples.shape[0]
    mc = losses.information_gain_reward(
        losses.token_logprobs(jnp.broadcast_to(reasoned_logits, (n, V)), samples),
        losses.token_logprobs(jnp.broadcast_to(baseline_logits, (n, V)), samples)).mean()
    np.testing.assert_allclose(float(mc), want, atol=0.02)


def test_proposition_2_jensen_lower_bound():
    """E_c[S_pred] <= log E_c[p_θ(x_t | x_<t, c)], with equality when the thought is ignored."""
    k1, k2 = jax.random.split(jax.random.key(13))
    num_thoughts, V, target = 16, 9, 3
    thought_probs = jax.nn.softmax(jax.random.normal(k1, (num_thoughts,)))
    logits_CxV = 3.0 * jax.random.normal(k2, (num_thoughts, V))
    s_pred_C = losses.token_logprobs(logits_CxV, jnp.full((num_thoughts,), target))
    lhs = float((thought_probs * s_pred_C).sum())
    rhs = float(jnp.log((thought_probs * jnp.exp(s_pred_C)).sum()))
    assert lhs < rhs - 1e-3
    same_CxV = jnp.broadcast_to(logits_CxV[0], logits_CxV.shape)
    s_same = losses.token_logprobs(same_CxV, jnp.full((num_thoughts,), target))
    np.testing.assert_allclose(float((thought_probs * s_same).sum()),
                               float(jnp.log((thought_probs * jnp.exp(s_same)).sum())), atol=1e-6)


def test_reward_is_exactly_zero_when_thought_is_ignored_and_teacher_equals_model():
    """A predictor that ignores the thought, scored by θ and by φ = θ, earns exactly 0 reward."""
    V, D = 20, 8
    k1, k2, k3 = jax.random.split(jax.random.key(14), 3)
    params = {"embed": jax.random.normal(k1, (V, D)), "out": jax.random.normal(k2, (D, V))}
    ema = losses.ema_update(params, params, 0.999)  # φ ← τφ + (1−τ)θ with φ = θ stays θ

    def next_token_logits(p, context_BxT):  # sees only the context, never the thought
        return p["embed"][context_BxT].mean(axis=1) @ p["out"]

    B, G = 5, 4
    context_BxT = jax.random.randint(k3, (B, 7), 0, V)
    targets_B = context_BxT[:, -1]
    s_pred_BxG = jnp.stack([losses.token_logprobs(next_token_logits(params, context_BxT), targets_B)] * G, 1)
    s_ema_B = losses.token_logprobs(next_token_logits(ema, context_BxT), targets_B)
    rewards = losses.information_gain_reward(s_pred_BxG, s_ema_B[:, None])
    assert np.array_equal(np.asarray(rewards), np.zeros((B, G)))
    assert np.array_equal(np.asarray(losses.group_relative_advantages(rewards)), np.zeros((B, G)))


def test_proposition_3_position_average_is_sequence_ce_gain():
    """Averaged over positions, the rewards equal the per-token sequence-level CE gain."""
    T, V = 10, 7
    k1, k2, k3 = jax.random.split(jax.random.key(15), 3)
    tokens = jax.random.randint(k1, (T,), 0, V)
    reasoned_TxV = jax.random.normal(k2, (T, V))
    baseline_TxV = jax.random.normal(k3, (T, V))
    rewards_T = losses.information_gain_reward(losses.token_logprobs(reasoned_TxV, tokens),
                                               losses.token_logprobs(baseline_TxV, tokens))
    gain = losses.next_token_loss(baseline_TxV, tokens) - losses.next_token_loss(reasoned_TxV, tokens)
    np.testing.assert_allclose(float(rewards_T.mean()), float(gain), rtol=1e-5)


def test_losses_example_raises_information_gain():
    from rlp_jax import loss_example

    gains = loss_example.run(steps=60, echo=lambda *_: None)
    assert np.mean(gains[:5]) < 0.6
    assert np.mean(gains[-10:]) > np.mean(gains[:5]) + 0.5


# A byte table by hand: id -> bytes ("" for id 0, the padding; id 6 an EOS with no bytes, as in the
# byte and demo tokenizers; id 7 an EOS spelled by its text, as HF tokenizers give special tokens).
_PIECES = [b"", b"a", b"b", b"bc", b"abc", b"c", b"", b"<e>"]
_TABLE = np.zeros((len(_PIECES), 3), np.uint8)
for _i, _p in enumerate(_PIECES):
    _TABLE[_i, :len(_p)] = np.frombuffer(_p, np.uint8)
_LENGTHS = np.array([len(p) for p in _PIECES], np.int32)


@pytest.mark.parametrize("prediction, target, mask, want", [
    ([1, 3], [4, 0], [1, 0], 1.0),   # "a"+"bc" predicts the one token "abc": another tokenization matches
    ([4, 0], [1, 3], [1, 1], 1.0),   # "abc" predicts "a","bc"
    ([1, 0], [4, 0], [1, 0], 0.0),   # "a" is a prefix of "abc" but ends inside its token
    ([1, 0], [1, 3], [1, 1], 1.0),   # ... and on a boundary of "a","bc"
    ([1, 2], [1, 3], [1, 1], 0.0),   # "ab": not on a boundary of "a","bc"
    ([4, 5], [4, 5], [1, 0], 0.0),   # "abcc" is longer than the continuation scored ("abc")
    ([4, 5], [4, 5], [1, 1], 1.0),
    ([0, 0], [4, 0], [1, 0], 0.0),   # an empty prediction never matches
    ([2, 0], [4, 0], [1, 0], 0.0),   # not a prefix
])
def test_prefix_match_reward_on_bytes_by_hand(prediction, target, mask, want):
    got = losses.prefix_match_reward(jnp.array([prediction]), jnp.array([target]), jnp.array([mask], bool),
                                     _TABLE, _LENGTHS)
    assert float(got[0]) == want


_ENDS = (0, 6, 7)


@pytest.mark.parametrize("prediction, target, mask, want, without_ends", [
    ([6, 4], [4, 0], [1, 0], 0.0, 1.0),  # [eos, "abc"] predicts no text; skipping the eos matched
    ([4, 6], [4, 0], [1, 0], 1.0, 1.0),  # ["abc", eos] predicts "abc", exactly like ["abc"]
    ([4, 7], [4, 5], [1, 1], 1.0, 0.0),  # an EOS with bytes ends the prediction too
    ([7, 4], [4, 5], [1, 1], 0.0, 0.0),
    ([4, 5], [4, 6], [1, 1], 0.0, 0.0),  # "abcc" runs past the document's end after "abc"
    ([4, 6], [4, 6], [1, 1], 1.0, 1.0),
    ([4, 7], [4, 7], [1, 1], 1.0, 1.0),  # the document's HF-style EOS is not text to predict
    ([4, 5], [4, 7], [1, 1], 0.0, 0.0),
    ([6, 0], [6, 0], [1, 0], 0.0, 0.0),  # at a document's end there is no text to predict
])
def test_prefix_match_reward_ends_the_prediction_at_eos_by_hand(prediction, target, mask, want, without_ends):
    args = (jnp.array([prediction]), jnp.array([target]), jnp.array([mask], bool), _TABLE, _LENGTHS)
    assert float(losses.prefix_match_reward(*args, end_ids=_ENDS)[0]) == want
    assert float(losses.prefix_match_reward(*args)[0]) == without_ends


def test_grpo_advantages_by_hand():
    """A = (r − mean) / (std + 1e-6) with the group's sample std (n − 1); all-equal groups and
    invalid rollouts get exactly 0."""
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0],   # mean 0.5, std √(1/3) = 0.57735
                         [1.0, 1.0, 1.0, 1.0],   # no signal
                         [0.0, 1.0, 0.0, 0.0],   # mean 0.25, std √(0.75/3) = 0.5
                         [2.0, 0.0, 1.0, 9.0],   # the 9 is invalid: mean 1, std √(2/2) = 1
                         [0.1, 0.1, 0.1, 0.1]])  # equal: exactly 0, whatever r − mean rounds to
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    want = [[0.866024, -0.866024, -0.866024, 0.866024],
            [0.0, 0.0, 0.0, 0.0],
            [-0.499999, 1.499997, -0.499999, -0.499999],
            [0.999999, -0.999999, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0]]
    got = losses.grpo_advantages(rewards, valid)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (np.asarray(got)[[1, 4]] == 0).all() and np.asarray(got)[3, 3] == 0
    one_valid = losses.grpo_advantages(jnp.array([[3.0, 5.0]]), jnp.array([[True, False]]))
    assert (np.asarray(one_valid) == 0).all()
    # The leave-one-out advantage of the RLP paper (eq. 7) on the first group, for contrast: ±2/3.
    np.testing.assert_allclose(losses.group_relative_advantages(rewards[:1]), [[2 / 3, -2 / 3, -2 / 3, 2 / 3]],
                               rtol=1e-6)


def test_top_k_entropy_by_hand():
    uniform = jnp.zeros((2, 40))
    np.testing.assert_allclose(losses.top_k_entropy(uniform, 16), [np.log(16)] * 2, rtol=1e-6)
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25, 1e-9]]))  # top-2 renormalised: (2/3, 1/3)
    p = np.array([2 / 3, 1 / 3])
    np.testing.assert_allclose(losses.top_k_entropy(logits, 2), [-(p * np.log(p)).sum()], rtol=1e-5)
