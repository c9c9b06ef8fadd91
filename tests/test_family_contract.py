"""What every model family's sampler must do, one test function run over the registry
(rlp_jax.models.families.FAMILIES) on each family's `test_preset`: a new family passes these
without a line of test code of its own.

- The sampler against the simplest correct one: a fresh full forward at every step with the same
  draw — the same tokens, behaviour log-probs within float32 rounding.
- `prefill` and `decode_loop` jitted apart sample what `sample` samples.
- RLP scoring after the thought on the rollout's own decode state equals a fresh forward over
  `[prompt, thought, </think>, targets]`, and every action's behaviour log-prob equals the update's
  teacher-forced one and a fresh forward (RPT's prediction included).

Reference forwards run on right-padded rows of one width (a causal model: padding after a row's
tokens changes none of its logits), so each reference compiles once.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlp_jax import losses, rollouts, sampling
from rlp_jax.models import families
from rlp_jax.rollouts import RolloutConfig
from test_rollouts import B, K, small_batch

VOCAB, OPEN, CLOSE = 32, 1, 2


@pytest.fixture(scope="module", params=families.FAMILIES, ids=lambda f: f.name)
def model(request):
    """The family's test preset with large weights (std 0.3): peaked, row-dependent logits."""
    family = request.param
    with nnx.use_eager_sharding(False):
        return family.build(family.preset(family.test_preset, vocab_size=VOCAB), nnx.Rngs(1), init_std=0.3)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, seq_NxW):
    positions = jnp.broadcast_to(jnp.arange(seq_NxW.shape[1]), seq_NxW.shape)
    return nnx.merge(graphdef, params)(seq_NxW, positions)


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
    """Each step of the family's sampler against a fresh full forward over `[prompt, tokens so
    far]` drawn by `sampling.next_token` with the same key (`fold_in(key, step)`): the same tokens,
    log-probs within float32 rounding, across 3 cache blocks; top-k/top-p, `min_new_tokens` and the
    stop token applied as the draw applies them. Greedy: every rollout of a prompt the same."""
    G, steps, key = 2, 7, jax.random.key(3)
    cfg = sampling.SamplingConfig(max_new_tokens=steps, temperature=temperature, top_k=12, top_p=0.95,
                                  stop_tokens=(CLOSE,), min_new_tokens=2, block_len=3)
    out = sampling.generate(model, PROMPTS, LENGTHS, key, cfg, num_samples=G, extra_slots=2)
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
    if temperature == 0:
        tokens = np.asarray(out.tokens_NxL).reshape(len(PROMPTS), G, steps)
        assert (tokens == tokens[:, :1]).all()
    else:
        assert finished.any() and (~finished).any()


def test_prefill_then_decode_loop_jitted_apart_equal_sample(model):
    """The sampler's two halves, each jitted alone (as `rlp-jax bench` times them): `prefill` holds
    each prompt's last logits on its G rows, and `decode_loop` from it samples what `sample`
    samples, over several cache blocks and early stops."""
    G, key = 2, jax.random.key(4)
    cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=0.8, stop_tokens=(CLOSE,), block_len=3)
    weights = sampling.weights_of(model)
    start = sampling.prefill_jit(weights, PROMPTS, LENGTHS, cfg, num_samples=G, extra_slots=2)
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

G, L = 3, 6  # with B = 4 contexts and K = 2 targets: test_rollouts.small_batch, the Transformer's batch
ROLLOUT = RolloutConfig(think_open_id=OPEN, think_close_id=CLOSE, num_rollouts=G, max_thought_len=L,
                        temperature=3.0, prompt_suffix_ids=(5, 6),  # hot: closed and truncated rows
                        cache_block_len=4)  # scoring straddles a block boundary


@pytest.mark.parametrize("prediction_len", [0, 2])
def test_scoring_after_thoughts_and_behaviour_logprobs_equal_fresh_forwards(model, prediction_len):
    """`S_pred` of `[</think>, x_t, x_t+1]` fed into the rollout's decode state equals a fresh
    forward over `[prompt, thought, </think>, targets]`, for sampled and forced closes (RPT: with
    the think markers masked out of the scored distributions); the behaviour log-probs of every
    action (RPT: thought and prediction) equal the teacher-forced `thought_logprobs` (the update's
    forward) and a fresh forward."""
    M = prediction_len
    cfg = dataclasses.replace(ROLLOUT, prediction_len=M, mask_markers_in_scoring=M > 0)
    graphdef, params = nnx.split(model)
    batch = small_batch(seed=1)
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
