"""Held-out evaluation: every number recomputed by hand from the same rollouts, padding rows left
out, standard errors, the samples, and the sharded (2,2,2) evaluation equal to the unsharded one."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlp_jax import evaluate, rollouts, sharding
from rlp_jax.batch import prompt_batch
from rlp_jax.models import init_model, preset
from rlp_jax.rollouts import RolloutConfig

VOCAB, B, T, G, K = 24, 8, 6, 2, 2
CFG = RolloutConfig(think_open_id=1, think_close_id=2, num_rollouts=G, max_thought_len=4, temperature=1.0)


def _batches():
    out = []
    for seed, real in ((0, B), (1, 5)):  # the second batch ends in 3 padding rows
        rng = np.random.RandomState(seed)
        out.append(prompt_batch(rng.randint(3, VOCAB, (B, T)).astype(np.int32),
                                rng.randint(1, T + 1, B).astype(np.int32),
                                rng.randint(3, VOCAB, (B, K)).astype(np.int32),
                                np.arange(K) < rng.randint(1, K + 1, (B, 1)), np.arange(B) < real))
    return out


@pytest.fixture(scope="module")
def setup():
    model = init_model(preset("tiny", vocab_size=VOCAB), seed=0)
    other = init_model(preset("tiny", vocab_size=VOCAB), seed=7)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, nnx.state(other, nnx.Param)


def test_numbers_equal_their_definitions_over_real_rows(setup):
    graphdef, params, other = setup
    batches, key = _batches(), jax.random.key(3)
    result = evaluate.evaluate(graphdef, params, {"other": other}, batches, CFG, key,
                               decode=lambda ids: ",".join(map(str, ids)), show_thoughts=3)
    gains, nll_think, acc_think, lengths = [], [], [], []
    for i, batch in enumerate(batches):
        roll = rollouts.sample_and_score(graphdef, params, batch, jax.random.fold_in(key, i), CFG)
        s_other, _ = rollouts.no_think_logprobs(graphdef, other, batch, CFG)
        mask, real = np.asarray(batch.target_mask_BxK), np.asarray(batch.example_mask_B)
        s_pred_B = np.where(mask[:, None], np.asarray(roll.s_pred_NxK).reshape(B, G, K), 0).sum(-1).mean(-1)
        gains += list((s_pred_B - np.where(mask, s_other, 0).sum(-1))[real])
        nll_think += list((-s_pred_B / mask.sum(-1))[real])
        hit = (np.asarray(roll.predicted_NxK).reshape(B, G, K) == np.asarray(batch.target_BxK)[:, None]) | ~mask[:, None]
        acc_think += list(hit.all(-1).mean(-1)[real])
        lengths += list(np.asarray(roll.thought_mask_NxL.sum(-1))[np.repeat(real, G)])
    assert result["num_positions"] == B + 5
    for name, values in (("gain_other", gains), ("nll_think", nll_think), ("acc_think", acc_think)):
        values = np.asarray(values, np.float64)
        np.testing.assert_allclose(result[name], values.mean(), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(result[name + "_se"], values.std(ddof=1) / np.sqrt(len(values)), rtol=1e-4)
    assert result["thought_len_mean"] == pytest.approx(np.mean(lengths))
    assert result["thought_len_max"] == max(lengths)
    assert 0 <= result["acc_no_think"] <= 1 and 0 <= result["acc_greedy_think"] <= 1
    assert len(result["samples"]) == 3
    first = batches[0]
    n = int(first.context_len_B[0])
    assert result["samples"][0]["context"] == ",".join(map(str, first.context_BxT[0, :n]))


def test_a_2x2x2_mesh_gives_the_unsharded_numbers(setup):
    graphdef, params, other = setup
    mesh = sharding.make_mesh((2, 2, 2))
    place = lambda tree: jax.device_put(tree, sharding.param_shardings(tree, mesh))
    with jax.set_mesh(mesh):
        sharded = evaluate.evaluate(graphdef, place(params), {"other": place(other)}, _batches(), CFG,
                                    jax.random.key(3), mesh=mesh)
    plain = evaluate.evaluate(graphdef, params, {"other": other}, _batches(), CFG, jax.random.key(3))
    assert sharded.keys() == plain.keys()
    for name in plain:
        np.testing.assert_allclose(sharded[name], plain[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("validation_documents, warned", [(1, True), (3, True), (4, False)])
def test_a_validation_split_of_few_documents_is_noted(validation_documents, warned):
    """The `text` config's 64 held-out positions drawn from 1-3 paragraphs say little beyond them:
    the run and `rlp-jax eval` say so in one sentence (build.MIN_EVAL_DOCUMENTS = 4)."""
    from rlp_jax import build
    from rlp_jax import config as config_lib
    from rlp_jax.data import ByteTokenizer, Corpus

    config = config_lib.load_config("text", [])
    paragraph = lambda i: f"Paragraph {i} of a small corpus, long enough for many prompt positions. " * 3
    corpus = Corpus.in_memory({
        "train": [{"text": paragraph(i), "doc_id": i} for i in range(8)],
        "validation": [{"text": paragraph(100 + i), "doc_id": 100 + i} for i in range(validation_documents)]})
    held_out = build.eval_batches(config, corpus, ByteTokenizer())
    assert sum(int(np.asarray(b.example_mask_B).sum()) for b in held_out) == 64
    note = build.eval_note(config, corpus, held_out)
    if warned:
        s = "s" if validation_documents > 1 else ""
        assert note.startswith(f"the validation split has only {validation_documents} document{s}, so the held-out "
                               "evaluation's 64 positions all come from ")
        assert "give it 4 or more documents" in note and note.count(";") == 1
    else:
        assert note is None
