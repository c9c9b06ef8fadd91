"""grain pipelines: exact rows, counted skips, determinism, resume, and per-process shards."""

import collections
import json

import grain
import numpy as np
import pytest
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlp_jax.batch import DocumentBatch, PromptBatch, as_dict
from rlp_jax.data import (
    Corpus,
    DocumentBatchConfig,
    HFTokenizer,
    PositionConfig,
    PromptBatchConfig,
    build_demo_corpus,
    demo_tokenizer,
    document_batches,
    per_process_batch_size,
    prompt_batches,
    shard_indices,
    tokenized_documents,
)
from rlp_jax.data.tokenizer import CharTokenizer

ALPHABET = "abcdefghij "
TOKENIZER = CharTokenizer(ALPHABET)


def _tiny_corpus(num_documents=50, seed=0):
    """Documents of 1..30 characters; every third one marks two offsets (kinds 1 and 2)."""
    rng = np.random.default_rng(seed)
    records = []
    for doc_id in range(num_documents):
        length = int(rng.integers(1, 31))
        text = "".join(rng.choice(list(ALPHABET), size=length))
        record = {"text": text, "doc_id": 1000 + doc_id}
        if doc_id % 3 == 0 and length >= 4:
            record["marked_offsets"] = [length - 1, 2]
            record["marked_kinds"] = [1, 2]
        records.append(record)
    return Corpus.in_memory({"train": records}, name="tiny",
                            position_kind_names=("unmarked", "end", "early"))


CORPUS = _tiny_corpus()
TOKENS = {r["doc_id"]: np.asarray(TOKENIZER.encode(r["text"]) + [TOKENIZER.eos_id])
          for r in CORPUS.source("train")}


def _config(**kwargs):
    defaults = dict(batch_size=4, max_context=8, target_len=2, seed=0, read_threads=0,
                    positions=PositionConfig("uniform", 3, min_context=2))
    defaults.update(kwargs)
    return PromptBatchConfig(**defaults)


def _iterate(config, corpus=CORPUS, tokenizer=TOKENIZER, index=0, count=1, limit=None):
    iterator = prompt_batches(corpus, "train", tokenizer, config, process_index=index,
                              process_count=count)
    batches = []
    for batch in iterator:
        assert isinstance(batch, PromptBatch)
        batches.append(as_dict(batch))
        if limit is not None and len(batches) == limit:
            break
    return batches, iterator


def _rows(batches):
    for batch in batches:
        batch = batch if isinstance(batch, dict) else as_dict(batch)
        for r in np.flatnonzero(batch["example_mask_B"]):
            yield {name: value[r] for name, value in batch.items()}


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        a, b = (x if isinstance(x, dict) else as_dict(x) for x in (a, b))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_rows_are_exact_slices_of_their_documents():
    config = _config(num_epochs=1, pad_final_batch=True)
    batches, iterator = _iterate(config)
    spec = iterator.batch_spec
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    rows = list(_rows(batches))
    for row in rows:
        tokens, t = TOKENS[int(row["doc_id_B"])], int(row["position_B"])
        context = tokens[max(0, t - 8):t]
        n = len(context)
        assert row["context_len_B"] == n
        np.testing.assert_array_equal(row["context_BxT"][:n], context)  # right-padded
        assert np.all(row["context_BxT"][n:] == TOKENIZER.pad_id)
        target = tokens[t:t + 2]
        np.testing.assert_array_equal(row["target_BxK"][:len(target)], target)
        np.testing.assert_array_equal(row["target_mask_BxK"], np.arange(2) < len(target))
        assert row["doc_len_B"] == len(tokens) and 2 <= t < len(tokens)
    expected = {d: min(3, max(len(tokens) - 2, 0)) for d, tokens in TOKENS.items()}
    per_doc = collections.Counter(int(r["doc_id_B"]) for r in rows)
    assert per_doc == +collections.Counter(expected)
    total = sum(expected.values())
    stats = iterator.stats
    assert stats["prompts"] == len(rows) == total
    assert stats["documents"] == 50
    assert stats["documents_without_prompts"] == sum(len(t) <= 2 for t in TOKENS.values())
    assert stats["positions_shortfall"] == sum(3 - v for v in expected.values())
    assert stats["batches"] == len(batches) == -(-total // 4)
    assert stats["contexts_truncated"] == sum(int(r["position_B"]) > 8 for r in rows)
    assert stats["targets_short"] == sum(int(r["position_B"]) + 2 > r["doc_len_B"] for r in rows)
    padding = batches[-1]["example_mask_B"]
    assert padding.sum() == total - 4 * (len(batches) - 1)


def test_all_strategy_counts_skips_and_the_dropped_partial_batch():
    config = _config(num_epochs=1, batch_size=16, positions=PositionConfig("all", min_context=3))
    batches, iterator = _iterate(config)
    lengths = [len(t) for t in TOKENS.values()]
    total = sum(max(n - 3, 0) for n in lengths)
    stats = iterator.stats
    assert stats["positions_skipped_short_context"] == sum(min(2, n - 1) for n in lengths)
    assert stats["documents_without_prompts"] == sum(n <= 3 for n in lengths)
    assert stats["prompts"] == 16 * len(batches) == total - total % 16
    assert stats["rows_dropped_in_final_partial_batch"] == total % 16
    assert all(batch["example_mask_B"].all() for batch in batches)


def test_marked_kinds_label_positions_under_every_strategy():
    marked = _config(num_epochs=1, pad_final_batch=True,
                     positions=PositionConfig("marked", None, marked_kinds=("end",)))
    rows = list(_rows(_iterate(marked)[0]))
    expected = {r["doc_id"]: len(r["text"]) - 1 for r in CORPUS.source("train")
                if len(r["marked_offsets"])}
    assert {int(r["doc_id_B"]): int(r["position_B"]) for r in rows} == expected
    assert all(r["position_kind_B"] == 1 for r in rows)
    every = list(_rows(_iterate(_config(num_epochs=1, pad_final_batch=True,
                                        positions=PositionConfig("all")))[0]))
    kinds = collections.Counter(int(r["position_kind_B"]) for r in every)
    assert kinds[1] == len(expected) and kinds[2] == len(expected)
    assert kinds[0] == len(every) - 2 * len(expected)
    with pytest.raises(ValueError, match=r"kind 'answer' is not one of tiny's kinds"):
        _iterate(_config(positions=PositionConfig("marked", None, marked_kinds=("answer",))))


def test_same_settings_give_the_same_batches_and_the_seed_changes_them():
    config = _config(shuffle_window=64)
    first, _ = _iterate(config, limit=12)
    again, _ = _iterate(config, limit=12)
    threaded, _ = _iterate(_config(shuffle_window=64, read_threads=3), limit=12)
    _assert_same(first, again)
    _assert_same(first, threaded)
    reseeded, _ = _iterate(_config(shuffle_window=64, seed=1), limit=12)
    assert not np.array_equal(first[0]["doc_id_B"], reseeded[0]["doc_id_B"])


RESUMABLE = {
    "uniform": (prompt_batches, _config(shuffle_window=64, read_threads=2)),
    "all": (prompt_batches, _config(shuffle_window=96, positions=PositionConfig("all"))),
    "stride": (prompt_batches, _config(shuffle_window=0, positions=PositionConfig("stride",
                                                                                  stride=3))),
    "documents": (document_batches, DocumentBatchConfig(batch_size=3, seq_len=6, shuffle_window=40,
                                                        read_threads=2)),
    "packed": (document_batches, DocumentBatchConfig(batch_size=3, seq_len=7, shuffle_window=40,
                                                     read_threads=2, pack=True)),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_restored_iterator_continues_exactly(name):
    make, config = RESUMABLE[name]
    reference = make(CORPUS, "train", TOKENIZER, config, process_index=1, process_count=2)
    saved = {}
    uninterrupted = []
    for step in range(40):  # several epochs of this 25-document shard
        if step in (0, 1, 6, 17, 33):
            saved[step] = (json.dumps(reference.get_state()), reference.stats)
        uninterrupted.append(next(reference))
    assert isinstance(reference, grain.DatasetIterator)
    for step, (state, stats) in saved.items():
        resumed = make(CORPUS, "train", TOKENIZER, config, process_index=1, process_count=2)
        resumed.set_state(json.loads(state))
        assert resumed.stats == stats
        _assert_same([next(resumed) for _ in range(40 - step)], uninterrupted[step:])
        assert resumed.stats == reference.stats


def test_restore_refuses_another_pipeline():
    state = prompt_batches(CORPUS, "train", TOKENIZER, _config(), process_index=0,
                           process_count=1).get_state()
    other = prompt_batches(CORPUS, "train", TOKENIZER, _config(seed=5), process_index=0,
                           process_count=1)
    with pytest.raises(ValueError, match="belongs to a different pipeline"):
        other.set_state(state)
    elsewhere = prompt_batches(CORPUS, "train", TOKENIZER, _config(), process_index=0,
                               process_count=2)
    with pytest.raises(ValueError, match="belongs to a different pipeline"):
        elsewhere.set_state(state)
    with pytest.raises(ValueError, match="not an rlp_jax data-iterator state"):
        other.set_state({"next_index": 3})


@pytest.mark.parametrize("even_shards", [False, True])
def test_process_shards_are_disjoint_and_cover_the_split(even_shards):
    config = _config(num_epochs=1, pad_final_batch=True, even_shards=even_shards,
                     positions=PositionConfig("uniform", 1, min_context=1))
    seen = []
    left_out = 0
    for index in range(3):
        batches, iterator = _iterate(config, index=index, count=3)
        ids = [int(r["doc_id_B"]) for r in _rows(batches)]
        assert len(ids) == len(set(ids)) == len(shard_indices(50, index, 3,
                                                              even_shards=even_shards))
        assert iterator.stats["documents"] == len(ids)
        left_out += iterator.stats["documents_left_out_for_even_shards"]
        source = CORPUS.source("train")
        assert set(ids) == {source[i]["doc_id"] for i in shard_indices(50, index, 3,
                                                                      even_shards=even_shards)}
        seen.append(set(ids))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    union = seen[0] | seen[1] | seen[2]
    assert len(union) == (48 if even_shards else 50) and left_out == 50 - len(union)
    assert [len(s) for s in seen] == ([16, 16, 16] if even_shards else [17, 17, 16])


def test_epochs_reshuffle_documents_and_redraw_positions():
    config = _config(num_epochs=2, batch_size=1, shuffle_window=0,
                     positions=PositionConfig("uniform", 1, min_context=1))
    rows = list(_rows(_iterate(config)[0]))
    assert len(rows) == 100
    first = [(int(r["doc_id_B"]), int(r["position_B"])) for r in rows[:50]]
    second = [(int(r["doc_id_B"]), int(r["position_B"])) for r in rows[50:]]
    assert sorted(d for d, _ in first) == sorted(d for d, _ in second) == sorted(TOKENS)
    assert [d for d, _ in first] != [d for d, _ in second]
    assert dict(first) != dict(second)


def test_packed_rows_are_the_concatenated_documents_cut_into_full_rows():
    """Packing: every row but the last has exactly seq_len tokens, rows overlap by one token, and
    chained together they are the documents in stream order, end to end (each a target once)."""
    common = dict(batch_size=4, num_epochs=1, pad_final_batch=True, shuffle_documents=False, shuffle_window=0,
                  read_threads=0)
    one = lambda config: [row for row in _rows(list(document_batches(
        CORPUS, "train", TOKENIZER, config, process_index=0, process_count=1)))]
    whole = one(DocumentBatchConfig(seq_len=64, long_documents="truncate", **common))
    packed = one(DocumentBatchConfig(seq_len=7, pack=True, **common))
    lengths = [int(r["token_mask_BxT"].sum()) for r in packed]
    assert set(lengths[:-1]) == {7} and 2 <= lengths[-1] <= 7
    stream = np.concatenate([r["tokens_BxT"][r["token_mask_BxT"]] for r in whole])
    assert sum(lengths) - (len(packed) - 1) == len(stream)  # one token shared by neighbouring rows
    chained = np.concatenate([packed[0]["tokens_BxT"]] + [r["tokens_BxT"][1:n] for r, n in zip(packed[1:], lengths[1:])])
    np.testing.assert_array_equal(chained, stream)


def test_document_windows_cover_every_target_exactly_once():
    config = DocumentBatchConfig(batch_size=4, seq_len=6, num_epochs=1, pad_final_batch=True,
                                 read_threads=0)
    iterator = document_batches(CORPUS, "train", TOKENIZER, config, process_index=0,
                                process_count=1)
    targets = collections.defaultdict(list)
    windows = list(iterator)
    assert all(isinstance(b, DocumentBatch) for b in windows)
    for row in _rows(windows):
        doc, window = int(row["doc_id_B"]), int(row["window_B"])
        length = int(row["token_mask_BxT"].sum())
        assert np.all(row["token_mask_BxT"][:length]) and not row["token_mask_BxT"][length:].any()
        start = window * 5
        np.testing.assert_array_equal(row["tokens_BxT"][:length], TOKENS[doc][start:start + length])
        targets[doc].extend(range(start + 1, start + length))
    assert {d: sorted(t) for d, t in targets.items()} == {
        d: list(range(1, len(t))) for d, t in TOKENS.items()}
    assert iterator.stats["documents_split"] == sum(len(t) > 6 for t in TOKENS.values())
    truncating = document_batches(
        CORPUS, "train", TOKENIZER, DocumentBatchConfig(
            batch_size=4, seq_len=6, num_epochs=1, pad_final_batch=True, read_threads=0,
            long_documents="truncate"), process_index=0, process_count=1)
    rows = list(_rows(list(truncating)))
    assert len(rows) == 50
    assert truncating.stats["tokens_truncated"] == sum(max(len(t) - 6, 0)
                                                       for t in TOKENS.values())


def test_demo_corpus_prompts_sit_at_answers(tmp_path):
    corpus = build_demo_corpus(tmp_path, "plain", num_train=64, num_validation=16, seed=1)
    tok = demo_tokenizer()
    config = PromptBatchConfig(batch_size=16, max_context=16, target_len=3, num_epochs=1,
                               read_threads=2, positions=PositionConfig(
                                   "marked", None, marked_kinds=("answer_start",)))
    batches = list(prompt_batches(corpus, "validation", tok, config, process_index=0,
                                  process_count=1))
    assert len(batches) == 1
    for r in range(16):
        n = batches[0].context_len_B[r]
        question = tok.decode(batches[0].context_BxT[r, :n])
        a, b = question.rstrip("=").split("+")
        assert tok.decode(batches[0].target_BxK[r]) == f"{int(a) + int(b):03d}"
    assert set(batches[0].position_kind_B.tolist()) == {
        corpus.position_kind_names.index("answer_start")}
    every = prompt_batches(corpus, "validation", tok, PromptBatchConfig(
        batch_size=12, max_context=16, num_epochs=1, shuffle_window=0, shuffle_documents=False,
        read_threads=0, positions=PositionConfig("all")), process_index=0, process_count=1)
    first = next(every)  # one document "abc+def=ghi" + EOS: positions 1..11
    names = [corpus.position_kind_names[k] for k in first.position_kind_B[:11]]
    assert names == ["operand"] * 2 + ["unmarked"] + ["operand"] * 3 + ["unmarked"] + [
        "answer_start", "answer_rest", "answer_rest", "unmarked"]


def test_marked_offsets_map_to_the_bpe_token_holding_them(tmp_path):
    raw = RawHFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["what is 457+386? 843 and 12+34? 46"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|endoftext|>", "<think>",
                                        "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json", bos_token="<|begin_of_text|>")
    text = "what is 457+386? 843"
    offset = text.index("843") + 1  # mid-token on purpose: the '4'
    corpus = Corpus.in_memory({"train": [{"text": text, "doc_id": 0, "marked_offsets": [offset],
                                          "marked_kinds": [1]}]})
    row = next(_rows(_iterate(_config(
        batch_size=1, max_context=32, target_len=1, positions=PositionConfig("marked", None)),
        corpus=corpus, tokenizer=tok, limit=1)[0]))
    ids, spans = tok.encode_with_offsets(text)
    holder = next(i for i, (start, end) in enumerate(spans) if start <= offset < end)
    assert int(row["position_B"]) == holder + 1  # BOS comes first
    context = row["context_BxT"][:row["context_len_B"]]
    assert context[0] == tok.bos_id
    assert tok.decode(context[1:]) == text[:spans[holder][0]]
    assert row["target_BxK"][0] == ids[holder]


def test_layout_errors_and_batch_sizes():
    assert per_process_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        per_process_batch_size(32, 3)
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        _iterate(_config(), index=2, count=2)
    small = Corpus.in_memory({"train": [{"text": "ab", "doc_id": 0}]})
    with pytest.raises(ValueError, match="too few for 2 processes"):
        _iterate(_config(), corpus=small, index=0, count=2)
    with pytest.raises(KeyError, match="has no split 'test'"):
        prompt_batches(CORPUS, "test", TOKENIZER, _config(), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="min_context .* exceeds max_context"):
        _config(positions=PositionConfig("all", min_context=9))
    with pytest.raises(ValueError, match="the tokenizer has no BOS token"):
        _iterate(_config(add_bos=True))
    import jax
    assert per_process_batch_size(8) == 8 // jax.process_count()


def test_tokenized_documents_holds_every_document_in_source_order():
    arrays, counts = tokenized_documents(CORPUS, "train", TOKENIZER, seq_len=12)
    source = CORPUS.source("train")
    assert arrays["tokens_NxT"].shape == (50, 12) and arrays["tokens_NxT"].dtype == np.int32
    assert arrays["doc_id_N"].tolist() == [r["doc_id"] for r in source]
    for tokens, mask, doc_id in zip(arrays["tokens_NxT"], arrays["token_mask_NxT"],
                                    arrays["doc_id_N"]):
        expected = TOKENS[int(doc_id)][:12]
        np.testing.assert_array_equal(tokens[mask], expected)
        assert mask.sum() == len(expected) and np.all(tokens[~mask] == TOKENIZER.pad_id)
    lengths = [len(t) for t in TOKENS.values()]
    assert counts == {"documents": 50, "documents_truncated": sum(n > 12 for n in lengths),
                      "tokens_truncated": sum(max(n - 12, 0) for n in lengths)}


def test_orbax_saves_and_restores_the_iterator_through_grains_handler(tmp_path):
    import orbax.checkpoint as ocp

    def make():
        return prompt_batches(CORPUS, "train", TOKENIZER, _config(shuffle_window=64),
                              process_index=0, process_count=1)

    batches = make()
    for _ in range(5):
        next(batches)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path, item_names=("data",), item_handlers=handlers) as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(batches)))
        manager.wait_until_finished()
        expected = [next(batches) for _ in range(3)]
        resumed = make()
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(
            resumed)))
    _assert_same([next(resumed) for _ in range(3)], expected)
    assert resumed.stats == batches.stats


_DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, "tests")
import test_data_pipeline as t
batches, _ = t._iterate(t._config(shuffle_window=64, read_threads=2), limit=6)
digest = hashlib.sha256()
for batch in batches:
    for name in sorted(batch):
        digest.update(name.encode() + batch[name].tobytes())
print(digest.hexdigest())
"""


def test_batches_are_identical_in_a_fresh_interpreter():
    import hashlib
    import os
    import subprocess
    import sys

    batches, _ = _iterate(_config(shuffle_window=64, read_threads=2), limit=6)
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode() + batch[name].tobytes())
    env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == digest.hexdigest()
