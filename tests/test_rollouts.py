"""From prompts to scored thoughts: prompt layout, the thought rows of the update, behaviour
log-probs against a teacher-forced forward, the no-think baseline, greedy thoughts, RPT's action.
Scoring on the rollout's cache against a fresh forward, for every model family, is
tests/test_family_contract.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlp_jax import losses, rollouts
from rlp_jax.batch import prompt_batch
from rlp_jax.models import init_model, preset
from rlp_jax.rollouts import RolloutConfig

VOCAB, B, T, G, L, K = 32, 4, 7, 3, 6, 2
OPEN, CLOSE = 1, 2
CFG = RolloutConfig(think_open_id=OPEN, think_close_id=CLOSE, num_rollouts=G, max_thought_len=L,
                    temperature=3.0, prompt_suffix_ids=(5, 6))  # hot: closed and truncated rows


@pytest.fixture(scope="module")
def model():
    return init_model(preset("tiny", vocab_size=VOCAB), seed=1)


def small_batch(seed=0):
    """B = 4 contexts of ragged lengths and K = 2 targets (the second masked on two rows)."""
    rng = np.random.RandomState(seed)
    lengths = np.array([7, 1, 4, 5], np.int32)
    context = np.where(np.arange(T) < lengths[:, None], rng.randint(3, VOCAB, (B, T)), 0).astype(np.int32)
    targets = rng.randint(3, VOCAB, (B, K)).astype(np.int32)
    target_mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    return jax.tree.map(jnp.asarray, prompt_batch(context, lengths, targets, target_mask))


def _forward_logits(model, seq):
    logits = model(jnp.asarray(seq)[None], jnp.arange(len(seq))[None])
    return logits[0]


def test_prompts_are_context_then_suffix_then_open_marker():
    batch = small_batch()
    prompt_BxP, prompt_len_B = rollouts.build_prompts(batch.context_BxT, batch.context_len_B, CFG)
    assert prompt_BxP.shape == (B, T + 3)
    for b in range(B):
        n = int(batch.context_len_B[b])
        np.testing.assert_array_equal(prompt_BxP[b, :n + 3], [*batch.context_BxT[b, :n], 5, 6, OPEN])
        assert (np.asarray(prompt_BxP[b, n + 3:]) == 0).all() and int(prompt_len_B[b]) == n + 3


def test_thought_rows_and_behaviour_logprobs_equal_a_teacher_forced_forward(model):
    graphdef, params = nnx.split(model)
    batch = small_batch()
    roll = jax.jit(lambda p, b: rollouts.sample_and_score(graphdef, p, b, jax.random.key(0), CFG))(params, batch)
    lengths = np.asarray(roll.thought_mask_NxL.sum(-1))
    closed = np.asarray([roll.thoughts_NxL[n, lengths[n] - 1] == CLOSE for n in range(B * G)])
    np.testing.assert_array_equal(np.asarray(roll.truncated_N), ~closed)
    assert closed.any() and (~closed).any()
    assert ((lengths == L) | closed).all()  # a thought ends at </think> or at L
    seq_NxS, predict_at_NxL = rollouts.thought_sequences(roll, G)
    logp, entropy = rollouts.thought_logprobs(graphdef, params, seq_NxS, predict_at_NxL, roll.thoughts_NxL,
                                              CFG.temperature, 0, *CFG.banned_close)
    mask = np.asarray(roll.thought_mask_NxL)
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(roll.behaviour_logprobs_NxL)[mask], atol=2e-5)
    for n in range(B * G):  # each row is [prompt, thought] and the log-probs are the forward's
        b, P = n // G, int(roll.prompt_len_B[n // G])
        thought = np.asarray(roll.thoughts_NxL[n, :lengths[n]])
        want_seq = np.concatenate([np.asarray(roll.prompt_BxP[b, :P]), thought])
        np.testing.assert_array_equal(np.asarray(seq_NxS[n, :len(want_seq)]), want_seq)
        logits = _forward_logits(model, want_seq)[P - 1:-1]
        # The policy the thought was drawn from: </think> impossible as the first token
        # (min_thought_len 1), so the first distribution is renormalised without it.
        logits = logits.at[0, CLOSE].set(-jnp.inf)
        want = jax.nn.log_softmax(logits / CFG.temperature)[jnp.arange(len(thought)), thought]
        np.testing.assert_allclose(logp[n, :lengths[n]], want, atol=2e-5)
        probs = jax.nn.softmax(logits / CFG.temperature)
        np.testing.assert_allclose(entropy[n, :lengths[n]], -jnp.where(probs > 0, probs * jnp.log(probs), 0).sum(-1),
                                   atol=2e-4)


def test_no_think_baseline_is_a_forward_over_context_then_targets(model):
    graphdef, params = nnx.split(model)
    batch = small_batch(seed=2)
    seq_BxS, predict_at_BxK = rollouts.context_then_targets(batch)
    s_BxK, predicted_BxK = rollouts.no_think_logprobs(graphdef, params, batch, CFG)
    for b in range(B):
        n = int(batch.context_len_B[b])
        seq = np.concatenate([np.asarray(batch.context_BxT[b, :n]), np.asarray(batch.target_BxK[b])])
        np.testing.assert_array_equal(np.asarray(seq_BxS[b, :n + K]), seq)
        np.testing.assert_array_equal(predict_at_BxK[b], [n - 1, n])
        logits = _forward_logits(model, seq)[n - 1:n + 1]
        np.testing.assert_allclose(s_BxK[b], losses.token_logprobs(logits, jnp.asarray(seq[n:])), atol=2e-5)
        np.testing.assert_array_equal(predicted_BxK[b], jnp.argmax(logits, -1))


def test_greedy_thoughts_are_the_argmax_and_the_same_for_every_rollout(model):
    graphdef, params = nnx.split(model)
    batch = small_batch(seed=3)
    roll = rollouts.sample_and_score(graphdef, params, batch, jax.random.key(1), CFG, greedy=True)
    thoughts = np.asarray(roll.thoughts_NxL).reshape(B, G, L)
    assert (thoughts == thoughts[:, :1]).all()
    b = 2
    seq = list(np.asarray(roll.prompt_BxP[b, :roll.prompt_len_B[b]]))
    n = int(roll.thought_mask_NxL[b * G].sum())
    for u in range(n):  # with `min_thought_len` 1, </think> cannot come first
        logits = _forward_logits(model, np.asarray(seq))[-1]
        if u == 0:
            logits = logits.at[CLOSE].set(-jnp.inf)
        seq.append(int(jnp.argmax(logits)))
    np.testing.assert_array_equal(thoughts[b, 0, :n], seq[-n:])


def test_rpt_action_is_thought_then_prediction_and_its_logprobs_are_a_fresh_forwards(model):
    """RPT: after the thought (a forced </think> where it hit L: in the sequence, not an action)
    the policy samples M prediction tokens; the whole action sits in the thought arrays and its
    behaviour log-probs equal a teacher-forced forward over [prompt, thought, </think>, prediction]."""
    M = 2
    cfg = dataclasses.replace(CFG, prediction_len=M)
    graphdef, params = nnx.split(model)
    batch = small_batch(seed=2)
    roll = jax.jit(lambda p, b: rollouts.sample_and_score(graphdef, p, b, jax.random.key(7), cfg))(params, batch)
    assert roll.thoughts_NxL.shape == (B * G, L + 1 + M) and roll.prediction_NxM.shape == (B * G, M)
    truncated = np.asarray(roll.truncated_N)
    assert truncated.any() and (~truncated).any()
    seq_NxS, predict_at_NxL = rollouts.thought_sequences(roll, G)
    logp, _ = rollouts.thought_logprobs(graphdef, params, seq_NxS, predict_at_NxL, roll.thoughts_NxL,
                                        cfg.temperature, 0, *cfg.banned_close)
    for n in range(B * G):
        b, P = n // G, int(roll.prompt_len_B[n // G])
        tokens, mask = np.asarray(roll.thoughts_NxL[n]), np.asarray(roll.thought_mask_NxL[n])
        end = int(np.flatnonzero(mask)[-1]) + 1
        thought_len = end - M - int(truncated[n])
        thought = tokens[:thought_len]
        assert (thought[-1] == CLOSE) != truncated[n]
        if truncated[n]:
            assert tokens[thought_len] == CLOSE and not mask[thought_len]  # forced: not an action
        np.testing.assert_array_equal(tokens[end - M:end], roll.prediction_NxM[n])
        assert mask[:thought_len].all() and mask[end - M:end].all() and not mask[end:].any()
        full = np.concatenate([np.asarray(roll.prompt_BxP[b, :P]), tokens[:end]])
        logits = _forward_logits(model, full)[P - 1:-1]
        logits = logits.at[0, CLOSE].set(-jnp.inf)  # min_thought_len 1, as sampled
        want = jax.nn.log_softmax(logits / cfg.temperature)[jnp.arange(end), tokens[:end]]
        np.testing.assert_allclose(np.asarray(roll.behaviour_logprobs_NxL[n, :end])[mask[:end]],
                                   np.asarray(want)[mask[:end]], atol=3e-5)
        np.testing.assert_allclose(np.asarray(logp[n, :end])[mask[:end]], np.asarray(want)[mask[:end]], atol=3e-5)
