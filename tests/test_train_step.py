"""The sharded RLP train step: meshes agree, gradients come only from thought tokens (padding rows
count nowhere), the EMA teacher behaves, the objectives, and multi-host. (Scoring on the rollout
cache: tests/test_rollouts.py.)"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlp_jax import losses, rollouts, sharding
from rlp_jax import train_step as ts
from rlp_jax.batch import prompt_batch, step_fields
from rlp_jax.config import ConfigError, base_config, validate
from rlp_jax.models import preset
from rlp_jax.rollouts import RolloutConfig

VOCAB, B, T, G, L = 32, 8, 9, 4, 5
MODEL = preset("tiny", vocab_size=VOCAB)
ROLLOUT = RolloutConfig(think_open_id=1, think_close_id=2, num_rollouts=G, max_thought_len=L,
                        temperature=1.0)


def make_batch(seed=0, K=1, example_mask=None):
    rng = np.random.RandomState(seed)
    return jax.tree.map(jnp.asarray, prompt_batch(
        rng.randint(3, VOCAB, (B, T)).astype(np.int32), rng.randint(2, T + 1, B).astype(np.int32),
        rng.randint(3, VOCAB, (B, K)).astype(np.int32), np.arange(K) < rng.randint(1, K + 1, (B, 1)),
        example_mask))


def single_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def run_steps(mesh, cfg, optimizer, steps=2, batch=None, state_edit=None, model_config=MODEL):
    graphdef, state, shardings = ts.create_state_from_scratch(model_config, optimizer, 0, mesh)
    if state_edit is not None:
        state = state_edit(state)
    batch = make_batch() if batch is None else batch
    batch_sharding = ts.batch_shardings(batch, mesh)
    step = ts.compile_train_step(graphdef, optimizer, cfg, mesh, shardings, batch_sharding)
    history = []
    for _ in range(steps):
        state, metrics = step(state, jax.device_put(batch, batch_sharding))
        history.append(jax.device_get(metrics))
    return graphdef, state, history


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_single_device_and_two_meshes_agree_after_two_steps():
    cfg = ts.StepConfig(rollout=ROLLOUT, ppo_epochs=2)  # two updates: ratios and clipping move
    optimizer = optax.adamw(1e-2)
    _, initial, _ = run_steps(single_device_mesh(), cfg, optimizer, steps=0)
    _, want_state, want = run_steps(single_device_mesh(), cfg, optimizer)
    for shape in ((2, 2, 2), (8, 1, 1)):
        _, state, got = run_steps(sharding.make_mesh(shape), cfg, optimizer)
        for i, (step_metrics, step_want) in enumerate(zip(got, want)):
            for name in step_want:
                # Before any update, only summation order differs: float32 rounding. A metric read
                # after an update (the second PPO epoch's ratios and clipping, every metric of step
                # 2) inherits the updated weights' spread below (0.1% of the update): 1e-3.
                after_update = i > 0 or name.startswith(("ratio", "clip"))
                np.testing.assert_allclose(step_metrics[name], step_want[name], rtol=1e-3 if after_update else 1e-4,
                                           atol=1e-5, err_msg=f"{shape} {name}")
        # Adam divides by sqrt(v): for near-zero gradients, float32 reduction-order noise of
        # another mesh becomes a visible step (up to ~lr/2 per update, seen: 3.5e-4 on 1 of 16,384
        # weights). So: elementwise within 5e-4 (lr 1e-2, 4 updates), and the whole update within
        # 0.1% in norm.
        for a, b, a0 in zip(leaves(state.params), leaves(want_state.params), leaves(initial.params)):
            np.testing.assert_allclose(a, b, atol=5e-4)
            assert np.linalg.norm((a - a0) - (b - a0)) <= 1e-3 * np.linalg.norm(b - a0)
    assert want[1]["ratio_mean"] != 1.0  # the second PPO epoch saw moved ratios


@pytest.mark.parametrize("real_rows", [B, B // 2])
def test_update_is_the_policy_gradient_of_thought_tokens_only(real_rows):
    """With SGD(lr=1) the update is −∇L, and ∇L equals −Σ (A/|c|)/N ∇log π(thought tokens) built
    from the step's own rollouts — nothing else (targets, S_pred, S_ema) contributes. Padding rows
    of a short final batch (`real_rows` < B) train nothing and count in no normaliser: N counts
    the real prompts' thoughts only."""
    cfg = ts.StepConfig(rollout=ROLLOUT)
    optimizer = optax.sgd(1.0)
    mesh = single_device_mesh()
    graphdef, state0, _ = ts.create_state_from_scratch(MODEL, optimizer, 0, mesh)
    params0 = jax.tree.map(jnp.copy, state0.params)
    batch = make_batch(example_mask=np.arange(B) < real_rows)
    key = jax.random.fold_in(jax.random.wrap_key_data(state0.rng), 0)
    roll = rollouts.sample_and_score(graphdef, params0, batch, key, ROLLOUT)
    s_ema, _ = rollouts.no_think_logprobs(graphdef, params0, batch, ROLLOUT)
    rewards = losses.information_gain_reward(roll.s_pred_NxK.reshape(B, G, 1), s_ema[:, None],
                                             batch.target_mask_BxK[:, None])
    adv = losses.group_relative_advantages(rewards)
    seq, predict_at = rollouts.thought_sequences(roll, G)
    mask = roll.thought_mask_NxL.reshape(B, G, L) & (np.arange(B) < real_rows)[:, None, None]
    num_thoughts = float((mask.sum(-1) > 0).sum())

    def manual(p):
        logp, _ = rollouts.thought_logprobs(graphdef, p, seq, predict_at, roll.thoughts_NxL, 1.0, 0,
                                            *ROLLOUT.banned_close)
        per_thought = jnp.where(mask, logp.reshape(B, G, L), 0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
        return -(adv * per_thought).sum() / num_thoughts

    want = jax.grad(manual)(params0)
    step = ts.compile_train_step(graphdef, optimizer, cfg, mesh, *_shardings(state0, optimizer, mesh, batch))
    state1, metrics = step(state0, batch)
    got = jax.tree.map(lambda new, old: old - new, state1.params, params0)  # θ0 − θ1 = lr · ∇L
    for g, w in zip(leaves(got), leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
    assert float(metrics["grad_norm"]) > 0
    assert float(metrics["num_prompts"]) == real_rows
    # What the step processed, counted by hand from the same rollouts (real rows only).
    real = np.arange(B) < real_rows
    context = np.asarray(batch.context_len_B)[real].sum()
    targets = np.asarray(batch.target_mask_BxK)[real].sum()
    forced = np.asarray(roll.truncated_N).reshape(B, G)[real].sum()
    assert float(metrics["context_tokens"]) == context and float(metrics["target_tokens"]) == targets
    assert float(metrics["thought_tokens"]) == mask.sum()
    # T_flop for one step: G·[context, <think>, thought, targets] per prompt + [context, targets] once
    assert float(metrics["flop_tokens"]) == G * (context + targets + real_rows) + mask.sum() + forced + context + targets


@pytest.mark.parametrize("chunk", [2, 3])  # L = 5: padded last chunk either way
def test_chunked_lm_head_gives_the_same_logprobs_gradients_and_update(chunk):
    graphdef, state, _ = ts.create_state_from_scratch(MODEL, optax.sgd(1.0), 0, single_device_mesh())
    batch = make_batch()
    roll = rollouts.sample_and_score(graphdef, state.params, batch, jax.random.key(3), ROLLOUT)
    seq, predict_at = rollouts.thought_sequences(roll, G)
    weights = jax.random.normal(jax.random.key(4), roll.thoughts_NxL.shape)

    def objective(p, head_chunk_len):
        # </think> banned at the first 3 positions: the ban crosses a chunk boundary.
        logp, entropy = rollouts.thought_logprobs(graphdef, p, seq, predict_at, roll.thoughts_NxL, 0.7,
                                                  head_chunk_len, ROLLOUT.think_close_id, 3)
        return (weights * logp).sum(), (logp, entropy)

    (_, (logp, entropy)), grads = jax.value_and_grad(objective, has_aux=True)(state.params, 0)
    (_, (logp_c, entropy_c)), grads_c = jax.jit(jax.value_and_grad(objective, has_aux=True),
                                                static_argnums=1)(state.params, chunk)
    np.testing.assert_allclose(logp_c, logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy_c, entropy, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves(grads_c), leaves(grads)):  # float32 sums in another order: ~1e-6 apart
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The whole compiled step: the same SGD update.
    _, whole, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optax.sgd(1.0), steps=1)
    _, chunked, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT, head_chunk_len=chunk),
                              optax.sgd(1.0), steps=1)
    for a, b in zip(leaves(chunked.params), leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_lm_head_bounds_the_logits_memory_of_the_update():
    """XLA's own buffer assignment (compiled, not run): with a 16k vocabulary and 256 thought
    positions the forward + backward of the thought log-probs holds about 2.5 [N, L, V] float32
    buffers at once (339 MB); with chunks of 8 positions 103 MB, the rest being the body's."""
    config = preset("tiny", vocab_size=16_384)
    graphdef, state, _ = ts.create_state_from_scratch(config, optax.sgd(1.0), 0, single_device_mesh())
    N, S, Lt = 8, 272, 256
    seq = jnp.zeros((N, S), jnp.int32)
    predict_at = jnp.broadcast_to(jnp.arange(S - Lt - 1, S - 1), (N, Lt))
    thoughts = jnp.ones((N, Lt), jnp.int32)

    def temp_bytes(head_chunk_len):
        grad = jax.grad(lambda p: rollouts.thought_logprobs(graphdef, p, seq, predict_at, thoughts, 1.0,
                                                            head_chunk_len)[0].sum())
        return jax.jit(grad).lower(state.params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = N * Lt * config.vocab_size * 4  # one float32 [N, L, V]
    whole, chunked = temp_bytes(0), temp_bytes(8)
    assert whole >= 2 * logits_bytes
    assert whole - chunked > 1.5 * logits_bytes, (whole, chunked, logits_bytes)


def _shardings(state, optimizer, mesh, batch):
    abstract = jax.eval_shape(lambda s: s, state)
    return ts.state_shardings(abstract, optimizer, mesh), ts.batch_shardings(batch, mesh)


def test_update_ignores_the_baseline_and_targets_enter_only_through_advantages():
    """S_ema is the same for the G thoughts of a prompt, so it cancels in the advantages: an EMA
    teacher with other weights changes the reward metrics but not one bit of the update."""
    cfg = ts.StepConfig(rollout=ROLLOUT)
    optimizer = optax.sgd(0.5)  # Adam would magnify float noise in near-zero gradients
    mesh = single_device_mesh()
    _, state_a, hist_a = run_steps(mesh, cfg, optimizer, steps=1, state_edit=lambda s: dataclasses.replace(s, step=s.step + 5))

    def other_teacher(s):
        ema = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), s.ema_params)
        return dataclasses.replace(s, step=s.step + 5, ema_params=ema)

    _, state_b, hist_b = run_steps(mesh, cfg, optimizer, steps=1, state_edit=other_teacher)
    assert abs(hist_a[0]["s_ema_mean"] - hist_b[0]["s_ema_mean"]) > 1e-3
    # Equal up to float32 rounding of r − mean(r); a leak of S_ema into the gradient would show
    # at the size of the 0.05 perturbation.
    for a, b in zip(leaves(state_a.params), leaves(state_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_ema_lazy_init_exact_update_and_float32_under_bf16_params():
    bf16_model = MODEL.replace(param_dtype="bfloat16", dtype="bfloat16")
    optimizer = optax.adam(1e-2)
    cfg = ts.StepConfig(rollout=ROLLOUT, ema_decay=0.9)
    garbage = lambda s: dataclasses.replace(s, ema_params=jax.tree.map(lambda x: x + 100.0, s.ema_params))
    graphdef, state0, _ = ts.create_state_from_scratch(bf16_model, optimizer, 0, single_device_mesh())
    theta0 = leaves(state0.params)
    _, state1, _ = run_steps(single_device_mesh(), cfg, optimizer, steps=1, state_edit=garbage,
                             model_config=bf16_model)
    for ema, p0, p1 in zip(leaves(state1.ema_params), theta0, leaves(state1.params)):
        assert ema.dtype == np.float32 and p1.dtype == jnp.bfloat16
        p0, p1 = p0.astype(np.float32), p1.astype(np.float32)
        want = (p0 + (1 - np.float32(0.9)) * (p1 - p0)).astype(np.float32)  # φ ← θ0, then one update
        # XLA may keep the new θ in excess precision (xla_allow_excess_precision) when it feeds
        # the EMA in the same program: allow (1 − τ) times one bf16 ulp of θ1.
        ulp = np.abs(p1) * 2.0**-7 + 1e-30
        assert (np.abs(ema - want) <= 0.1 * ulp + 1e-7).all()
    # φ keeps precision bfloat16 cannot hold.
    ema = np.concatenate([x.ravel() for x in leaves(state1.ema_params)])
    assert (ema != ema.astype(jnp.bfloat16).astype(np.float32)).mean() > 0.5


def test_when_thought_cannot_change_prediction_rewards_and_update_are_zero():
    """final_norm = 0 makes every prediction uniform whatever the thought; with φ = θ every reward
    is exactly 0, so every advantage and the whole update are exactly 0."""
    optimizer = optax.adam(1e-2)

    def blind(s):
        params = jax.tree.map(jnp.copy, s.params)
        params["final_norm"] = jax.tree.map(jnp.zeros_like, params["final_norm"])
        return dataclasses.replace(s, params=params)

    _, state0, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optimizer, steps=0,
                             state_edit=blind)
    _, state1, history = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optimizer,
                                   steps=1, state_edit=blind)
    m = history[0]
    assert m["reward_mean"] == 0 and m["reward_std"] == 0 and m["advantage_abs_mean"] == 0
    assert m["grad_norm"] == 0
    for a, b in zip(leaves(state1.params), leaves(state0.params)):
        np.testing.assert_array_equal(a, b)


def test_grad_accumulation_and_minibatches_give_the_unsplit_update():
    optimizer = optax.sgd(0.5)
    _, whole, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optimizer, steps=1)
    _, split, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT, grad_accum_steps=4),
                            optimizer, steps=1)
    for a, b in zip(leaves(split.params), leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of it"):
        run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT, grad_accum_steps=3), optimizer, steps=1)


def test_length_buckets_give_the_unbucketed_update_and_metrics():
    """Rows sorted by length and each gradient micro-batch cut to the shortest bucket that holds
    it: the same SGD update as every row at full width (contexts of 24 … 2 tokens, so the
    micro-batches of short rows run at a fraction of the width). 5 real prompts padded to 8: the
    sort reverses the rows and moves the padding rows first, and every metric, the row metrics
    (s_pred_mean, s_ema_mean, thought_len_*, truncated_frac, match_rate) included, still equals
    the one-bucket step's (same state, same key)."""
    rng = np.random.RandomState(7)
    batch = jax.tree.map(jnp.asarray, prompt_batch(rng.randint(3, VOCAB, (B, 24)).astype(np.int32),
                                                   np.linspace(24, 2, B).astype(np.int32),
                                                   rng.randint(3, VOCAB, (B, 1)).astype(np.int32),
                                                   example_mask_B=np.arange(B) < 5))
    assert ts.bucket_lengths(30, 4) == (8, 16, 24, 30)
    runs = {}
    for buckets in (1, 4):
        cfg = ts.StepConfig(rollout=ROLLOUT, grad_accum_steps=4, update_length_buckets=buckets)
        runs[buckets] = run_steps(single_device_mesh(), cfg, optax.sgd(0.5), steps=1, batch=batch)
    (_, whole, m1), (_, bucketed, m4) = runs[1], runs[4]
    for a, b in zip(leaves(bucketed.params), leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert m1[0].keys() == m4[0].keys() and m1[0]["num_prompts"] == 5
    for name in m1[0]:
        np.testing.assert_allclose(m4[0][name], m1[0][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_rollout_microbatches_chunk_the_ema_baseline_without_changing_it():
    graphdef, state, _ = ts.create_state_from_scratch(MODEL, optax.sgd(0.1), 0, sharding.make_mesh((2, 2, 2)))
    batch = make_batch(K=3)
    baseline = {n: jax.jit(lambda s, b, n=n: ts.ema_baseline(s, b, graphdef, ts.StepConfig(
        rollout=ROLLOUT, rollout_microbatches=n)))(state, batch) for n in (1, 2, 4)}
    # The same rows in the same order: chunking only bounds how many prompts one forward holds.
    expected, _ = jax.jit(lambda p, b: rollouts.no_think_logprobs(graphdef, p, b, ROLLOUT))(state.ema_params, batch)
    for n, s_ema_BxK in baseline.items():
        assert s_ema_BxK.shape == (B, 3)
        np.testing.assert_allclose(s_ema_BxK, expected, rtol=1e-5, atol=1e-6, err_msg=f"{n} chunks")
    # Inside the compiled sharded step too (its rollouts differ: each chunk draws its own key).
    mesh = sharding.make_mesh((2, 2, 2))
    metrics = {n: run_steps(mesh, ts.StepConfig(rollout=ROLLOUT, rollout_microbatches=n), optax.sgd(0.1),
                            steps=1, batch=batch)[2][0] for n in (1, 2)}
    np.testing.assert_allclose(metrics[2]["s_ema_mean"], metrics[1]["s_ema_mean"], rtol=1e-5)
    assert np.isfinite(metrics[2]["loss"]) and metrics[2]["thought_len_mean"] > 0


# One byte per token id (id 0: none), so RPT's byte prefix match is visible token by token.
BYTES = (np.arange(VOCAB, dtype=np.uint8)[:, None], (np.arange(VOCAB) > 0).astype(np.int32))


def _rpt_reward_by_hand(prediction, target, target_mask, truncated, end=0):
    """1 byte per token: the prediction before its first EOS is non-empty, no longer than the
    document's continuation before its EOS, and equals its start; a thought cut at L earns 0."""
    cut = lambda xs: xs[:xs.index(end)] if end in xs else xs
    p, t = cut(list(prediction)), cut([x for x, m in zip(target, target_mask) if m])
    return float(not truncated and 0 < len(p) <= len(t) and p == t[:len(p)])


def test_rpt_update_is_the_policy_gradient_of_thought_and_prediction_with_prefix_rewards():
    """objective='rpt': the action is the thought then M sampled prediction tokens; the reward is 1
    where the prediction (ended at EOS) is a byte prefix of the true continuation ending on a token
    boundary, and 0 for a thought cut at L, whose prediction is then no action; the advantage is
    GRPO's (RPT's default). SGD(lr=1) moves θ by exactly the hand-built policy gradient. Two
    padding prompts and length buckets (rows re-sorted for the update): the row metrics are the
    rollouts' own, by hand."""
    M, K, L_rpt = 2, 2, 24  # L long enough that about 2 in 3 thoughts close on their own
    rollout = dataclasses.replace(ROLLOUT, prediction_len=M, max_thought_len=L_rpt)
    cfg = ts.StepConfig(rollout=rollout, objective="rpt", token_bytes=BYTES, rpt_end_ids=(0,), update_length_buckets=2)
    assert cfg.advantage_estimator == "grpo" and ts.StepConfig(rollout=ROLLOUT).advantage_estimator == "rlp"
    optimizer = optax.sgd(1.0)
    mesh = single_device_mesh()
    graphdef, state0, _ = ts.create_state_from_scratch(MODEL, optimizer, 0, mesh)
    params0 = jax.tree.map(jnp.copy, state0.params)
    key = jax.random.fold_in(jax.random.wrap_key_data(state0.rng), 0)
    # Targets that some predictions match: each prompt's first rollout's prediction; prompt 1 then
    # has one target token only (a 2-token prediction runs past it), prompt 2 ends at EOS after one.
    real = np.arange(B) < 6
    batch = make_batch(seed=3, K=K, example_mask=real)
    first = np.asarray(rollouts.sample_and_score(graphdef, params0, batch, key, rollout).prediction_NxM)[::G]
    target, target_mask = first.copy(), np.ones((B, K), bool)
    target_mask[1, 1] = False
    target[2, 1] = 0
    batch = dataclasses.replace(batch, target_BxK=jnp.asarray(target), target_mask_BxK=jnp.asarray(target_mask))
    roll = rollouts.sample_and_score(graphdef, params0, batch, key, rollout)
    np.testing.assert_array_equal(np.asarray(roll.prediction_NxM)[::G], first)  # targets do not steer sampling
    pred, truncated = np.asarray(roll.prediction_NxM).reshape(B, G, M), np.asarray(roll.truncated_N).reshape(B, G)
    want = np.array([[_rpt_reward_by_hand(pred[b, g], target[b], target_mask[b], truncated[b, g]) for g in range(G)]
                     for b in range(B)], np.float32)
    rewards = ts.rpt_rewards(batch, roll, cfg)
    np.testing.assert_array_equal(rewards, want)
    assert want[real].sum() >= 2 and truncated[real].any() and not truncated[real].all()
    valid = np.broadcast_to(real[:, None], (B, G))
    adv = losses.grpo_advantages(want * valid, valid)
    seq, predict_at = rollouts.thought_sequences(roll, G)
    # A thought cut at L: its prediction (after the forced </think>) is not trained; padding prompts train nothing.
    mask = np.asarray(roll.thought_mask_NxL).reshape(B, G, -1).copy()
    lengths = mask.sum(-1)  # the whole action as sampled: the row metrics count it
    mask[:, :, L_rpt:] &= ~truncated[..., None]
    mask &= real[:, None, None]
    num_thoughts = float((mask.sum(-1) > 0).sum())

    def manual(p):
        logp, _ = rollouts.thought_logprobs(graphdef, p, seq, predict_at, roll.thoughts_NxL, rollout.temperature, 0,
                                            *rollout.banned_close)
        per_action = jnp.where(mask, logp.reshape(mask.shape), 0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
        return -(adv * per_action).sum() / num_thoughts

    want_grad = jax.grad(manual)(params0)
    step = ts.compile_train_step(graphdef, optimizer, cfg, mesh, *_shardings(state0, optimizer, mesh, batch))
    state1, metrics = step(state0, batch)
    got = jax.tree.map(lambda new, old: old - new, state1.params, params0)
    for g, w in zip(leaves(got), leaves(want_grad)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
    assert float(metrics["grad_norm"]) > 0
    assert float(metrics["rpt_match_rate"]) == float(want[real].mean())
    s_pred = np.where(target_mask[:, None], np.asarray(roll.s_pred_NxK).reshape(B, G, K), 0)[real].sum(-1)
    argmax_hit = np.asarray(roll.predicted_NxK)[:, 0].reshape(B, G) == target[:, :1]
    np.testing.assert_allclose(metrics["s_pred_mean"], s_pred.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["thought_len_mean"], lengths[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["truncated_frac"], truncated[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["match_rate"], argmax_hit[real].mean(), rtol=1e-6)
    assert float(metrics["thought_len_max"]) == lengths[real].max() and float(metrics["num_prompts"]) == 6


def test_rpt_hardness_is_of_the_next_text_token_not_of_the_think_marker():
    """A proxy sure of `<think>` (id 1) but uniform over the text tokens is uncertain about the
    text: its top-16 entropy without the markers is log 16, with them it would be near 0."""
    logits = jnp.zeros((1, VOCAB)).at[0, 1].set(30.0)
    assert float(losses.top_k_entropy(logits, 16)[0]) < 1e-6  # the marker alone: looks easy
    np.testing.assert_allclose(losses.text_token_entropy(logits, (1, 2))[0], np.log(16), rtol=1e-6)


def test_ntp_matches_hand_cross_entropy():
    optimizer = optax.sgd(0.0)  # lr 0: look at the first step's numbers only
    graphdef, state, ntp = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT, objective="ntp"),
                                     optimizer, steps=1)
    batch = make_batch()
    model = nnx.merge(graphdef, state.params)
    nll, count = 0.0, 0
    for b in range(B):
        n = int(batch.context_len_B[b])
        seq = np.concatenate([np.asarray(batch.context_BxT[b, :n]), np.asarray(batch.target_BxK[b])])
        logits = model(jnp.asarray(seq)[None], jnp.arange(len(seq))[None])
        nll += -float(losses.token_logprobs(logits[0, :-1], jnp.asarray(seq[1:])).sum())
        count += len(seq) - 1
    np.testing.assert_allclose(ntp[0]["loss"], nll / count, rtol=1e-5)
    assert ntp[0]["tokens"] == count


def test_kl_reference_policy_exists_only_with_beta():
    optimizer = optax.adam(1e-2)
    mesh = single_device_mesh()
    graphdef, state, shardings = ts.create_state_from_scratch(MODEL, optimizer, 0, mesh, with_reference=True)
    assert state.ref_params is not None
    cfg = ts.StepConfig(rollout=ROLLOUT, kl_coef=0.1, ppo_epochs=2)
    batch = make_batch()
    step = ts.compile_train_step(graphdef, optimizer, cfg, mesh, shardings, ts.batch_shardings(batch, mesh))
    state, m1 = step(state, batch)
    state, m2 = step(state, batch)
    assert float(m1["kl"]) >= 0 and float(m2["kl"]) > 0  # the policy moved away from the reference
    _, plain, _ = ts.create_state_from_scratch(MODEL, optimizer, 0, mesh)
    assert plain.ref_params is None


def test_nonfinite_update_is_skipped_and_counted():
    optimizer = optax.adam(1e-2)

    def poison(s):
        params = jax.tree.map(jnp.copy, s.params)
        params["final_norm"] = jax.tree.map(lambda x: x.at[0].set(jnp.nan), params["final_norm"])
        return dataclasses.replace(s, params=params, step=s.step + 1)

    _, before, _ = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optimizer, steps=0,
                             state_edit=poison)
    _, after, history = run_steps(single_device_mesh(), ts.StepConfig(rollout=ROLLOUT), optimizer,
                                  steps=1, state_edit=poison)
    assert history[0]["nonfinite_skipped"] == 1
    for a, b in zip(leaves(after.params), leaves(before.params)):
        np.testing.assert_array_equal(a, b)


def test_bad_configs_fail_with_one_sentence():
    with pytest.raises(ValueError, match="G >= 2"):
        RolloutConfig(think_open_id=1, think_close_id=2, num_rollouts=1)
    with pytest.raises(ValueError, match="objective"):
        ts.StepConfig(rollout=ROLLOUT, objective="dpo")
    with pytest.raises(ValueError, match="advantage"):
        ts.StepConfig(rollout=ROLLOUT, advantage="ppo")
    c = base_config()
    c.rlp.objective, c.rlp.rpt_prediction_len, c.data.target_len = "rpt", 3, 2
    with pytest.raises(ConfigError, match=r"data.target_len >= rlp.rpt_prediction_len"):
        validate(c, 8)
    c.data.target_len = 3
    validate(c, 8)
    with pytest.raises(ValueError, match="needs 8 devices but 4"):
        sharding.make_mesh((2, 2, 2), devices=jax.devices()[:4])


def test_two_processes_with_four_devices_each_match_one_process_with_eight(tmp_path):
    """jax.distributed with gloo on CPU: 2 × 4 devices give the metrics of 1 × 8."""
    import portpicker

    worker = Path(__file__).with_name("multihost_worker.py")
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(worker), "0", "1", "0", str(single)], check=True, timeout=600,
                   capture_output=True)
    port = str(portpicker.pick_unused_port())
    multi = tmp_path / "multi.json"
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", port, str(multi)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    finally:
        for p in procs:  # a dead peer leaves the other hanging: never leave one behind
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outputs
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    np.testing.assert_allclose(a["q_sum"], b["q_sum"], rtol=1e-5, atol=1e-5)
    for sa, sb in zip(a["metrics"], b["metrics"]):
        for name in sa:
            np.testing.assert_allclose(sb[name], sa[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_padded_final_pipeline_batch_trains_on_its_real_rows_only(tmp_path):
    """The data pipeline's demo prompts (with padding rows) through one RLP step."""
    from rlp_jax import data

    tokenizer = data.demo_tokenizer()
    corpus = data.build_demo_corpus(str(tmp_path), "plain", num_train=13, num_validation=2, seed=0)
    config = data.PromptBatchConfig(
        batch_size=B, max_context=12, target_len=3, num_epochs=1, pad_final_batch=True,
        shuffle_window=0, positions=data.PositionConfig("marked", None, marked_kinds=("answer_start",)))
    pipeline_batches = list(data.prompt_batches(corpus, "train", tokenizer, config,
                                                process_index=0, process_count=1))
    last = pipeline_batches[-1]
    real_rows = int(last.example_mask_B.sum())
    assert 0 < real_rows < B
    batch = jax.tree.map(jnp.asarray, step_fields(last))
    for b in range(real_rows):  # the right-padded context ends right before the answer
        n = int(batch.context_len_B[b])
        assert tokenizer.decode(np.asarray(batch.context_BxT[b, :n])).endswith("=")
        assert (np.asarray(batch.context_BxT[b, n:]) == tokenizer.pad_id).all()
    rollout = dataclasses.replace(ROLLOUT, think_open_id=tokenizer.think_open_id,
                                  think_close_id=tokenizer.think_close_id, pad_id=tokenizer.pad_id)
    model = MODEL.replace(vocab_size=tokenizer.vocab_size)
    _, _, history = run_steps(single_device_mesh(), ts.StepConfig(rollout=rollout), optax.adam(1e-3),
                              steps=1, batch=batch, model_config=model)
    m = history[0]
    assert m["num_prompts"] == real_rows
    assert all(np.isfinite(v) for v in m.values())
    assert m["nonfinite_skipped"] == 0
