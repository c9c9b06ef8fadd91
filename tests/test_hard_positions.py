"""RPT's hard positions, chosen before sampling: the proxy's scoring pass (windows, exact
entropies, resume, identity) and the prompt pipeline restricted to them."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlp_jax import losses, rpt_positions
from rlp_jax.data import Corpus, PositionConfig, PromptBatchConfig, prompt_batches
from rlp_jax.data import hard_positions as hp
from rlp_jax.data.tokenizer import CharTokenizer
from rlp_jax.models import Transformer, preset

ALPHABET = "abcdefghij "
TOKENIZER = CharTokenizer(ALPHABET)
MARKERS = (TOKENIZER.think_open_id, TOKENIZER.think_close_id)
WINDOW = 8


def _corpus(num_documents=30, seed=0):
    rng = np.random.default_rng(seed)
    records = [{"text": "".join(rng.choice(list(ALPHABET), size=int(rng.integers(1, 31)))), "doc_id": 500 + 3 * i}
               for i in range(num_documents)]
    return Corpus.in_memory({"train": records}, name="tiny-hard")


CORPUS = _corpus()
SCORING = hp.ScoringConfig(window=WINDOW, add_bos=False, add_eos=True, batch_rows=8, chunk_documents=8)


@pytest.fixture(scope="module")
def proxy():
    """A small random model of other shapes than the `tiny` preset, on the char vocabulary."""
    config = preset("tiny", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    intermediate_size=64)
    with nnx.use_eager_sharding(False):
        return Transformer(config, nnx.Rngs(7))


def _tokens(record):
    return np.asarray(TOKENIZER.encode(record["text"]) + [TOKENIZER.eos_id], np.int32)


def _score(directory, proxy, **kwargs):
    source = CORPUS.source("train")
    return hp.score_split(source, range(len(source)), TOKENIZER, kwargs.pop("scoring", SCORING), directory,
                          kwargs.pop("identity", {"proxy": "tiny-random-7"}),
                          kwargs.pop("fn", None) or rpt_positions.proxy_entropies(proxy, MARKERS), **kwargs)


@pytest.mark.parametrize("window", [2, 3, 4, 8])
def test_windows_own_every_position_once_with_at_least_half_a_window_of_context(window):
    for n in range(0, 40):
        owned = []
        for start, first, last in hp.window_plan(n, window):
            assert start <= first - 1 and last - 1 < start + window  # the logits of t−1 are in the window
            assert first - start >= (window if start == 0 else window - window // 2) or start == 0
            owned += list(range(first, last + 1))
        assert owned == list(range(1, n)), (n, window)
        if n - 1 <= window:  # a document the pipeline's context covers whole: one window from its start
            assert len(hp.window_plan(n, window)) <= 1


def test_stored_entropy_is_the_proxys_top16_text_entropy_after_its_windows_context(tmp_path, proxy):
    """Each position's entropy equals a fresh forward of the proxy over exactly the context of its
    window; at positions t <= W that is the pipeline's prompt context x_<t."""
    table = _score(tmp_path / "e", proxy)
    graphdef, params = nnx.split(proxy)

    @jax.jit  # compiled once per context length (1 … W)
    def last_entropy(context_1xT):
        logits = nnx.merge(graphdef, params)(context_1xT, jnp.arange(context_1xT.shape[1])[None])[:, -1]
        return losses.text_token_entropy(logits, MARKERS)[0]

    checked = 0
    for record in CORPUS.source("train"):
        tokens = _tokens(record)
        got = table.entropies(record["doc_id"])
        assert got.shape == (len(tokens) - 1,)
        for start, first, last in hp.window_plan(len(tokens), WINDOW):
            for t in range(first, last + 1):
                want = float(last_entropy(jnp.asarray(tokens[start:t])[None]))
                np.testing.assert_allclose(got[t - 1], want, rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked == sum(len(_tokens(r)) - 1 for r in CORPUS.source("train"))


def test_an_interrupted_pass_resumes_at_its_first_missing_chunk_and_gives_the_same_table(tmp_path, proxy,
                                                                                         monkeypatch):
    real = rpt_positions.proxy_entropies(proxy, MARKERS)
    calls = {"n": 0}
    counted = lambda t: (calls.update(n=calls["n"] + 1), real(t))[1]
    calls_after_chunk = []  # the proxy calls made when each chunk was saved
    save = hp._atomic_save
    monkeypatch.setattr(hp, "_atomic_save", lambda *a, **k: (calls_after_chunk.append(calls["n"]), save(*a, **k)))
    whole = _score(tmp_path / "whole", proxy, fn=counted)
    per_chunk = list(calls_after_chunk)
    assert len(per_chunk) == 4 and per_chunk[-1] == calls["n"]
    calls["n"] = 0

    def failing(tokens):
        calls["n"] += 1
        if calls["n"] == per_chunk[1] + 1:  # in the third chunk
            raise RuntimeError("preempted")
        return real(tokens)

    with pytest.raises(RuntimeError, match="preempted"):
        _score(tmp_path / "cut", proxy, fn=failing)
    done = sorted(p.name for p in (tmp_path / "cut").glob("chunk-*"))
    assert done and all(name.endswith(".npz") for name in done) and len(done) == 2  # whole chunks only
    assert not hp.EntropyTable.complete(tmp_path / "cut")
    calls["n"] = 0
    resumed = _score(tmp_path / "cut", proxy, fn=counted)
    assert calls["n"] == per_chunk[-1] - per_chunk[len(done) - 1]  # saved chunks are not scored again
    for record in CORPUS.source("train"):
        np.testing.assert_array_equal(resumed.entropies(record["doc_id"]), whole.entropies(record["doc_id"]))
    assert not list((tmp_path / "cut").glob("chunk-*"))


def test_a_folder_scored_for_another_proxy_is_refused_not_mixed(tmp_path, proxy):
    _score(tmp_path / "e", proxy)
    with pytest.raises(ValueError, match="another proxy, corpus or setting"):
        _score(tmp_path / "e", proxy, identity={"proxy": "another"})


def test_prompts_are_placed_only_at_hard_positions_and_the_rest_are_counted(tmp_path, proxy):
    table = _score(tmp_path / "e", proxy)
    all_entropies = np.concatenate([table.entropies(r["doc_id"]) for r in CORPUS.source("train")])
    threshold = float(np.median(all_entropies))
    keep = table.at_least(threshold)
    config = PromptBatchConfig(batch_size=4, max_context=WINDOW, target_len=1, seed=0, read_threads=0, num_epochs=1,
                               pad_final_batch=True, positions=PositionConfig("all"), add_eos=True)
    everything = list(prompt_batches(CORPUS, "train", TOKENIZER, config, process_index=0, process_count=1))
    filtered_iter = prompt_batches(CORPUS, "train", TOKENIZER, config, process_index=0, process_count=1,
                                   keep_positions=keep)
    filtered = list(filtered_iter)
    rows = lambda batches: {(int(d), int(t)) for b in batches for d, t, m in
                            zip(b.doc_id_B, b.position_B, b.example_mask_B) if m}
    want = {(d, t) for d, t in rows(everything) if table.entropies(d)[t - 1] >= threshold}
    assert rows(filtered) == want and 0 < len(want) < len(rows(everything))
    assert filtered_iter.stats["positions_filtered_out"] == len(rows(everything)) - len(want)
    # A threshold of 0 keeps every position: the same prompts as without the filter.
    assert rows(prompt_batches(CORPUS, "train", TOKENIZER, config, process_index=0, process_count=1,
                               keep_positions=table.at_least(0.0))) == rows(everything)
    assert table.fraction_at_least(threshold) == pytest.approx(len(want) / len(rows(everything)), abs=1e-12)


def test_a_table_of_another_tokenization_is_named_not_silently_misread(tmp_path, proxy):
    table = _score(tmp_path / "e", proxy)
    record = CORPUS.source("train")[0]
    with pytest.raises(ValueError, match="another tokenization"):
        table.at_least(0.5).positions(record["doc_id"], len(_tokens(record)) + 1)


def test_an_rpt_run_trains_only_where_a_smaller_proxy_of_other_shapes_finds_the_next_token_hard(tmp_path):
    """The tiny RPT run (8 devices) with a proxy of other shapes (1 layer, width 32) saved as a
    params folder: the train split is scored once into WORKDIR/rpt_entropy/, every prompt it
    trains on is a position where a fresh forward of the proxy gives an entropy at or above the
    threshold, and the positions left out are counted in its metrics."""
    from pathlib import Path

    from rlp_jax import build, rollouts, trainer
    from rlp_jax import config as config_lib
    from rlp_jax.metrics_io import read_jsonl
    from rlp_jax.models import convert

    overrides = [f"data.data_dir={tmp_path / 'data'}", "rlp.objective=rpt", "train.steps=2",
                 "checkpoint.every_steps=2", f"rlp.rpt_proxy={tmp_path / 'proxy'}", "rlp.rpt_entropy_threshold=1e-9"]
    config = config_lib.load_config(str(Path(__file__).parent / "configs" / "tiny_rlp.py"), overrides)
    tokenizer = build.tokenizer(config)
    vocab = build.model_config(config, tokenizer).vocab_size
    with nnx.use_eager_sharding(False):
        small = Transformer(preset("tiny", vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, intermediate_size=64), nnx.Rngs(3))
    convert.save_params(small, tmp_path / "proxy")
    workdir = tmp_path / "run"
    corpus = build.corpus(config, workdir)
    lines = []
    table = rpt_positions.hard_positions_for_run(config, workdir, corpus, tokenizer, None, None, lines.append).table
    assert any(f"{sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param))):,} parameters" in line for line in lines)
    # The threshold: the median proxy entropy at the positions the run places prompts at (answer starts).
    first = list(zip(range(20), build.batches(config, corpus, tokenizer, "train", 8)))
    answers = [table.entropies(int(d))[int(t) - 1] for _, b in first for d, t in zip(b.doc_id_B, b.position_B)]
    threshold = float(np.median(answers))
    config_lib.apply_override(config, f"rlp.rpt_entropy_threshold={threshold!r}")

    lines.clear()
    trainer.train(config, workdir, echo=lines.append)
    assert not any("scoring" in line for line in lines)  # the table scored above is read, not scored again
    assert any(line.startswith("rpt: ") and "prompts are placed only there" in line for line in lines)
    logged = read_jsonl(workdir / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2] and logged[-1]["data_positions_filtered_out"] > 0

    # The trainer's batches, rebuilt: the same data counters, and every real row hard by a fresh forward.
    again = build.batches(config, corpus, tokenizer, "train", 8, keep_positions=table.at_least(threshold))
    batches = [next(again) for _ in range(2)]
    assert {k: v for k, v in again.stats.items()} == {k[5:]: v for k, v in logged[-1].items() if k.startswith("data_")}
    graphdef, params = nnx.split(small)
    markers = (tokenizer.think_open_id, tokenizer.think_close_id)
    for batch in batches:
        entropy_B = losses.text_token_entropy(rollouts.no_think_logits(graphdef, params, batch), markers)
        real_B = np.asarray(batch.example_mask_B, bool)
        assert real_B.all() and (np.asarray(entropy_B)[real_B] >= threshold - 1e-5).all()


def test_a_proxy_path_that_holds_no_model_is_refused_before_the_workdir_is_touched(tmp_path):
    from pathlib import Path

    from rlp_jax import config as config_lib
    from rlp_jax import trainer

    (tmp_path / "not-a-model").mkdir()
    config = config_lib.load_config(str(Path(__file__).parent / "configs" / "tiny_rlp.py"),
                                    [f"data.data_dir={tmp_path / 'data'}", "rlp.objective=rpt",
                                     f"rlp.rpt_proxy={tmp_path / 'not-a-model'}"])
    with pytest.raises(config_lib.ConfigError, match="is not a run workdir, an rlp-jax params folder or an HF folder"):
        trainer.train(config, tmp_path / "run", echo=lambda _: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
