"""The RLP step on the Nemotron-H hybrid (issue #14): the Mamba state its sampler leaves, the
step's update against an unfused policy gradient, a (2, 2, 2) mesh against one device, and
checkpoint resume bitwise. What every family's sampler and scoring must do (against fresh full
forwards) is tests/test_family_contract.py."""

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


# ---------------------------------------------------------------- the sampler's Mamba state
# (what every family's sampler must do is tests/test_family_contract.py)

PROMPTS = np.array([[5, 9, 3, 7, 11], [4, 8, 0, 0, 0], [13, 6, 17, 0, 0]], np.int32)
LENGTHS = np.array([5, 2, 3], np.int32)


def test_a_rows_mamba_state_holds_its_thought_without_a_sampled_stop(model):
    """After the decode loop, each row's Mamba conv and SSM state equal a fresh prefill of
    `[prompt, thought]` without a sampled stop token (where `</think>` goes next); each prompt's
    attention keys are kept once, and every new and extra token has a suffix slot."""
    G, steps = 2, 7
    cfg = sampling.SamplingConfig(max_new_tokens=steps, temperature=0.8, stop_tokens=(CLOSE,), min_new_tokens=2,
                                  block_len=3)
    out = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(3), cfg, num_samples=G, extra_slots=2)
    N = len(PROMPTS) * G
    finished = np.asarray(out.finished_N)
    assert finished.any() and (~finished).any()
    kv = out.cache.kv
    assert isinstance(out.cache, hd.HybridCache) and kv.prefix_k[0].shape[0] == len(PROMPTS)
    assert sum(b[0].shape[3] for b in kv.block_k) >= steps + 2 and kv.block_k[0][0].shape[0] == N
    held = []
    for n in range(N):
        thought = list(np.asarray(out.tokens_NxL[n, :out.lengths_N[n] - finished[n]]))
        held.append(list(PROMPTS[n // G, :LENGTHS[n // G]]) + thought)
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
