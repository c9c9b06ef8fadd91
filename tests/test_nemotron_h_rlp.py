"""The RLP step on the Nemotron-H hybrid (issue #14): the rollout-cache sampler against a sampler
that reruns the full forward with the same noise, scoring after the thought and behaviour
log-probs against fresh forwards, the step's update against an unfused policy gradient, a
(2, 2, 2) mesh against one device, and checkpoint resume bitwise.

Reference forwards run on right-padded rows of one width (causal model: padding after a row's
tokens changes none of its logits), so each reference compiles once."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlp_jax import checkpoint, losses, rollouts, sampling, sharding
from rlp_jax import train_step as ts
from rlp_jax.batch import prompt_batch
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_decode as hd
from rlp_jax.rollouts import RolloutConfig

VOCAB, OPEN, CLOSE = 32, 1, 2
HYBRID = nh.NemotronHConfig(vocab_size=VOCAB, hidden_size=32, pattern="M*-M", num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
                            ssm_state_size=8, n_groups=2, chunk_size=4)


@pytest.fixture(scope="module")
def model():
    return nh.init_model(HYBRID, seed=1, init_std=0.3)  # large weights: peaked, row-dependent logits


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, seq_NxW):
    return nnx.merge(graphdef, params)(seq_NxW)


def forward(model, rows: list, shape=(12, 20)) -> np.ndarray:
    """Logits `[len(rows), W, V]` of each row (a token list), right-padded to one shape (one compile)."""
    seq = np.zeros(shape, np.int32)
    for n, r in enumerate(rows):
        seq[n, :len(r)] = r
    graphdef, params = nnx.split(model)
    return np.asarray(_forward(graphdef, params, jnp.asarray(seq)))[:len(rows)]


# ---------------------------------------------------------------- the sampler

PROMPTS = np.array([[5, 9, 3, 7, 11], [4, 8, 0, 0, 0], [13, 6, 17, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 3], np.int32)


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_sampler_equals_one_that_reruns_the_full_forward_with_the_same_noise(model, temperature):
    """Each step of the recurrent sampler against a fresh full forward over `[prompt, tokens so
    far]` drawn by `sampling.next_token` with the same key (`fold_in(key, step)`): the same tokens,
    log-probs within float32 rounding; top-k/top-p, `min_new_tokens` and the stop token as the
    attention sampler applies them. Greedy: every rollout of a prompt the same (one prefill)."""
    G, steps, key = 2, 7, jax.random.key(3)
    cfg = sampling.SamplingConfig(max_new_tokens=steps, temperature=temperature, top_k=12, top_p=0.95,
                                  stop_tokens=(CLOSE,), min_new_tokens=2, block_len=3)  # 3 cache blocks
    out = sampling.generate(model, PROMPTS, LENGTHS, key, cfg, num_samples=G, extra_slots=2)  # → the hybrid family's sampler
    N = len(PROMPTS) * G
    rows = [list(PROMPTS[n // G, :LENGTHS[n // G]]) for n in range(N)]
    finished = np.zeros(N, bool)
    for step in range(steps):
        logits = forward(model, rows)[np.arange(N), [len(r) - 1 for r in rows]]
        want_tokens, want_logp = sampling.next_token(jnp.asarray(logits), jax.random.fold_in(key, step), step, cfg)
        want_tokens, want_logp = np.asarray(want_tokens), np.asarray(want_logp)
        got = np.asarray(out.tokens_NxL[:, step])
        np.testing.assert_array_equal(got[~finished], want_tokens[~finished])
        assert (got[finished] == cfg.pad_id).all()
        np.testing.assert_allclose(np.asarray(out.logprobs_NxL[:, step])[~finished], want_logp[~finished], atol=2e-5)
        for n in np.flatnonzero(~finished):
            rows[n].append(int(got[n]))
        finished |= got == CLOSE
    lengths = np.array([len(r) for r in rows]) - np.repeat(LENGTHS, G)
    np.testing.assert_array_equal(out.lengths_N, lengths)
    np.testing.assert_array_equal(out.finished_N, finished)
    np.testing.assert_array_equal(out.next_positions_N, np.repeat(LENGTHS, G) + lengths)
    # Each prompt's keys once; room for every new and extra token in each row's suffix blocks.
    kv = out.cache.kv
    assert isinstance(out.cache, hd.HybridCache) and kv.prefix_k[0].shape[0] == len(PROMPTS)
    assert sum(b[0].shape[3] for b in kv.block_k) >= steps + 2 and kv.block_k[0][0].shape[0] == N
    # The Mamba state holds the thought without a sampled stop token (where </think> goes next):
    # it equals a prefill of [prompt, thought minus a sampled stop].
    held = [r[:len(r) - 1] if f else r for r, f in zip(rows, finished)]
    seq = np.zeros((N, max(map(len, held))), np.int32)
    for n, r in enumerate(held):
        seq[n, :len(r)] = r
    _, _, _, conv, ssm = jax.jit(hd.prefill)(sampling.weights_of(model), jnp.asarray(seq),
                                             jnp.asarray([len(r) for r in held], jnp.int32))
    for got_layer, want_layer in zip(out.cache.conv, conv):
        for k in want_layer:
            np.testing.assert_allclose(got_layer[k], want_layer[k], atol=2e-5)
    for got_ssm, want_ssm in zip(out.cache.ssm, ssm):
        np.testing.assert_allclose(got_ssm, want_ssm, atol=2e-5)
    if temperature == 0:
        tokens = np.asarray(out.tokens_NxL).reshape(len(PROMPTS), G, steps)
        assert (tokens == tokens[:, :1]).all()
    else:
        assert finished.any() and (~finished).any()


def test_prefill_then_decode_loop_jitted_apart_equal_sample(model):
    """The hybrid sampler's two halves, each jitted alone (as `rlp-jax bench` times them):
    `prefill` holds each prompt's last logits and state on its G rows with room for every new and
    extra token, and `decode_loop` from it samples what `sample` samples."""
    G, steps, key = 2, 6, jax.random.key(4)
    cfg = sampling.SamplingConfig(max_new_tokens=steps, temperature=0.8, stop_tokens=(CLOSE,))
    weights = sampling.weights_of(model)
    start = sampling.prefill_jit(weights, PROMPTS, LENGTHS, cfg, num_samples=G, extra_slots=2)
    kv = start.cache.kv
    assert isinstance(start.cache, hd.HybridCache) and kv.prefix_k[0].shape[0] == len(PROMPTS)
    np.testing.assert_array_equal(kv.prefix_len_B, LENGTHS)
    assert sum(b[0].shape[3] for b in kv.block_k) >= steps + 2
    np.testing.assert_array_equal(start.cache.ssm[0][0::G], start.cache.ssm[0][1::G])  # a prompt's state, to each row
    np.testing.assert_array_equal(start.prompt_lengths_N, np.repeat(LENGTHS, G))
    np.testing.assert_array_equal(start.logits_NxV[0::G], start.logits_NxV[1::G])
    logits = forward(model, [list(PROMPTS[b, :LENGTHS[b]]) for b in range(len(PROMPTS))])
    np.testing.assert_allclose(start.logits_NxV[::G], logits[np.arange(len(PROMPTS)), LENGTHS - 1], atol=1e-4)

    split = sampling.decode_loop_jit(weights, start, key, cfg)
    whole = sampling.sample_jit(weights, PROMPTS, LENGTHS, key, cfg, num_samples=G, extra_slots=2)
    for name in ("tokens_NxL", "lengths_N", "finished_N", "next_positions_N"):
        np.testing.assert_array_equal(getattr(split, name), getattr(whole, name), err_msg=name)
    np.testing.assert_allclose(split.logprobs_NxL, whole.logprobs_NxL, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split.cache, whole.cache)


# ---------------------------------------------------------------- rollouts: scoring and log-probs

B, T, G, L, K = 4, 7, 3, 6, 2
ROLLOUT = RolloutConfig(think_open_id=OPEN, think_close_id=CLOSE, num_rollouts=G, max_thought_len=L,
                        temperature=3.0, prompt_suffix_ids=(5, 6),  # hot: closed and truncated rows
                        cache_block_len=4)  # scoring straddles a block boundary


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    lengths = np.array([7, 1, 4, 5], np.int32)
    context = np.where(np.arange(T) < lengths[:, None], rng.randint(3, VOCAB, (B, T)), 0).astype(np.int32)
    targets = rng.randint(3, VOCAB, (B, K)).astype(np.int32)
    target_mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    return jax.tree.map(jnp.asarray, prompt_batch(context, lengths, targets, target_mask))


@pytest.mark.parametrize("prediction_len", [0, 2])
def test_scoring_after_thoughts_and_behaviour_logprobs_equal_fresh_forwards(model, prediction_len):
    """`S_pred` of `[</think>, x_t, x_t+1]` fed from the rollout state equals a fresh forward over
    `[prompt, thought, </think>, targets]`, for sampled and forced closes; the behaviour log-probs
    of every action (RPT: thought and prediction) equal the teacher-forced `thought_logprobs` (the
    update's forward, here on the hybrid) and a fresh forward."""
    M = prediction_len
    cfg = dataclasses.replace(ROLLOUT, prediction_len=M, mask_markers_in_scoring=M > 0)
    graphdef, params = nnx.split(model)
    batch = _batch(seed=1)
    roll = jax.jit(lambda p, b: rollouts.sample_and_score(graphdef, p, b, jax.random.key(1), cfg))(params, batch)
    truncated = np.asarray(roll.truncated_N)
    assert truncated.any() and (~truncated).any()
    assert roll.thoughts_NxL.shape == (B * G, L + 1 + M if M else L)
    seq_NxS, predict_at_NxL = rollouts.thought_sequences(roll, G)
    logp, _ = rollouts.thought_logprobs(graphdef, params, seq_NxS, predict_at_NxL, roll.thoughts_NxL,
                                        cfg.temperature, 0, *cfg.banned_close)
    scored_rows, action_rows, ends, thought_lens = [], [], [], []
    for n in range(B * G):
        b, P = n // G, int(roll.prompt_len_B[n // G])
        tokens, mask = np.asarray(roll.thoughts_NxL[n]), np.asarray(roll.thought_mask_NxL[n])
        end = int(np.flatnonzero(mask)[-1]) + 1  # the last action
        thought_len = end - M - int(truncated[n]) if M else end
        thought = tokens[:thought_len]
        assert (thought[-1] == CLOSE) != truncated[n]
        closed = thought if thought[-1] == CLOSE else np.append(thought, CLOSE)
        prompt = list(np.asarray(roll.prompt_BxP[b, :P]))
        scored_rows.append(prompt + list(closed) + list(np.asarray(batch.target_BxK[b])))
        action_rows.append(prompt + list(tokens[:end]))
        ends.append(end)
        thought_lens.append(len(closed))
    scored = forward(model, scored_rows)
    acted = forward(model, action_rows)
    for n in range(B * G):
        b, P = n // G, int(roll.prompt_len_B[n // G])
        first = P + thought_lens[n] - 1  # the logits after </think> predict x_t
        logits = jnp.asarray(scored[n, first:first + K])
        if cfg.mask_markers_in_scoring:
            logits = logits.at[:, jnp.array([OPEN, CLOSE])].set(jnp.finfo(jnp.float32).min)
        np.testing.assert_allclose(roll.s_pred_NxK[n], losses.token_logprobs(logits, batch.target_BxK[b]), atol=2e-5)
        np.testing.assert_array_equal(roll.predicted_NxK[n], np.argmax(np.asarray(logits), -1))
        end, mask = ends[n], np.asarray(roll.thought_mask_NxL[n, :ends[n]])
        tokens = np.asarray(roll.thoughts_NxL[n, :end])
        logits = jnp.asarray(acted[n, P - 1:P - 1 + end]).at[0, CLOSE].set(-jnp.inf)  # min_thought_len 1
        want = np.asarray(jax.nn.log_softmax(logits / cfg.temperature))[np.arange(end), tokens]
        np.testing.assert_allclose(np.asarray(roll.behaviour_logprobs_NxL[n, :end])[mask], want[mask], atol=3e-5)
        np.testing.assert_allclose(np.asarray(logp[n, :end])[mask], want[mask], atol=3e-5)
    if M:
        ends_N = np.asarray(ends)
        np.testing.assert_array_equal(roll.prediction_NxM, np.asarray(roll.thoughts_NxL)[
            np.arange(B * G)[:, None], ends_N[:, None] - M + np.arange(M)])


# ---------------------------------------------------------------- the train step

STEP_B, STEP_T, STEP_G, STEP_L = 4, 6, 2, 4
STEP_ROLLOUT = RolloutConfig(think_open_id=OPEN, think_close_id=CLOSE, num_rollouts=STEP_G,
                             max_thought_len=STEP_L, temperature=1.0)


def step_batch(seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(jnp.asarray, prompt_batch(
        rng.randint(3, VOCAB, (STEP_B, STEP_T)).astype(np.int32),
        rng.randint(2, STEP_T + 1, STEP_B).astype(np.int32),
        rng.randint(3, VOCAB, (STEP_B, 1)).astype(np.int32), np.ones((STEP_B, 1), bool)))


def single_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def compiled(mesh, cfg, optimizer, batch):
    graphdef, state, shardings = ts.create_state_from_scratch(HYBRID, optimizer, 0, mesh)
    batch_sharding = ts.batch_shardings(batch, mesh)
    return graphdef, state, shardings, ts.compile_train_step(graphdef, optimizer, cfg, mesh, shardings,
                                                             batch_sharding), batch_sharding


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


SGD_CFG = ts.StepConfig(rollout=STEP_ROLLOUT, head_chunk_len=3, update_length_buckets=2, grad_accum_steps=2)


@pytest.fixture(scope="module")
def sgd_step():
    """One step on one device with SGD(lr=1) (the update is −∇L), the chunked LM head, length
    buckets and 2 accumulated micro-batches: the state before (a host copy) and after, the metrics."""
    batch = step_batch()
    graphdef, state0, shardings, step, _ = compiled(single_device_mesh(), SGD_CFG, optax.sgd(1.0), batch)
    before = jax.device_get(state0)  # (the step donates its input)
    state1, metrics = step(state0, batch)
    return dict(graphdef=graphdef, before=before, after=jax.device_get(state1), metrics=jax.device_get(metrics),
                batch=batch, step=step, shardings=shardings)


def test_hybrid_update_is_the_unfused_policy_gradient_of_thought_tokens(sgd_step):
    """The step's update equals −∇ of the policy loss written out by hand from the plain forward's
    logits of `[prompt, thought]` and the step's own rollouts and no-think baseline; the step's
    metrics are finite."""
    graphdef, batch, metrics = sgd_step["graphdef"], sgd_step["batch"], sgd_step["metrics"]
    params0 = jax.tree.map(jnp.asarray, sgd_step["before"].params)
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(sgd_step["before"].rng)), 0)
    roll = rollouts.sample_and_score(graphdef, params0, batch, key, STEP_ROLLOUT)
    s_ema, _ = rollouts.no_think_logprobs(graphdef, params0, batch, STEP_ROLLOUT)
    rewards = losses.information_gain_reward(roll.s_pred_NxK.reshape(STEP_B, STEP_G, 1), s_ema[:, None],
                                             batch.target_mask_BxK[:, None])
    adv = losses.group_relative_advantages(rewards)
    seq, predict_at = rollouts.thought_sequences(roll, STEP_G)
    mask = roll.thought_mask_NxL.reshape(STEP_B, STEP_G, STEP_L)
    num_thoughts = float((mask.sum(-1) > 0).sum())
    first = jnp.arange(STEP_L) < STEP_ROLLOUT.min_thought_len

    def manual(p):  # log π from the plain forward's logits: no chunking, no buckets, no helper
        logits = nnx.merge(graphdef, p)(seq)
        logits = jnp.take_along_axis(logits, predict_at[..., None], axis=1)
        logits = jnp.where(first[None, :, None] & (jnp.arange(VOCAB) == CLOSE), -jnp.inf, logits)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), roll.thoughts_NxL[..., None], -1)[..., 0]
        per_thought = jnp.where(mask, logp.reshape(mask.shape), 0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
        return -(adv * per_thought).sum() / num_thoughts

    want = jax.grad(manual)(params0)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite_skipped"]) == 0
    assert float(metrics["thought_tokens"]) == float(mask.sum())
    got = jax.tree.map(lambda new, old: old - new, sgd_step["after"].params, sgd_step["before"].params)
    for g, w in zip(leaves(got), leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_hybrid_step_on_a_2x2x2_mesh_equals_one_device(sgd_step):
    """The same step with params, batch and rollout state sharded over (data, fsdp, tensor) =
    (2, 2, 2): the same metrics and the same update (SGD: the gradient itself, no Adam
    amplification of reduction-order noise)."""
    mesh = sharding.make_mesh((2, 2, 2))
    _, state, _, step, batch_sharding = compiled(mesh, SGD_CFG, optax.sgd(1.0), sgd_step["batch"])
    state, metrics = step(state, jax.device_put(sgd_step["batch"], batch_sharding))
    want = sgd_step["metrics"]
    for name in want:
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    before = leaves(sgd_step["before"].params)
    for a, b, a0 in zip(leaves(state.params), leaves(sgd_step["after"].params), before):
        np.testing.assert_allclose(a - a0, b - a0, rtol=1e-4, atol=1e-7)


def test_hybrid_steps_resume_from_a_checkpoint_bitwise(sgd_step, tmp_path):
    """The state after step 1 saved and restored (Orbax, onto the same shardings), then steps 2–3
    on new batches: every leaf of the state (params, EMA, optimizer state, step, rng) bitwise
    equal to the run that never stopped. (The compiled step of `sgd_step`, reused.)"""
    step, shardings = sgd_step["step"], sgd_step["shardings"]
    batches = [step_batch(seed) for seed in (1, 2)]

    def two_steps(state):
        history = []
        for batch in batches:
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        return jax.device_get(state), history

    want, want_history = two_steps(jax.device_put(sgd_step["after"], shardings))
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    saver.save(1, jax.device_put(sgd_step["after"], shardings), {"position": 1}, "{}")
    saver.close()
    reader = checkpoint.Checkpointer(tmp_path / "ckpt")
    at, restored, data = reader.restore_latest(checkpoint.abstract_like(sgd_step["after"], shardings))
    reader.close()
    assert at == 1 and data == {"position": 1}
    got, history = two_steps(restored)
    assert int(got.step) == 3 and all(np.isfinite(float(v)) for m in history for v in m.values())
    for a, b in zip(leaves(got), leaves(want)):
        np.testing.assert_array_equal(a, b)
    for m, w in zip(history, want_history):
        assert {k: float(v) for k, v in m.items()} == {k: float(v) for k, v in w.items()}
    # Resuming is not a no-op: the two steps moved the weights and the EMA.
    assert not np.array_equal(leaves(got.params)[0], leaves(sgd_step["after"].params)[0])
    assert not np.array_equal(leaves(got.ema_params)[0], leaves(sgd_step["after"].ema_params)[0])
