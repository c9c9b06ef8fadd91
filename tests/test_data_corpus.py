"""Local-corpus builder: formats, splits, counted drops, and an error for each bad input."""

import gzip
import json
import logging
import os

import pytest

from rlp_jax.data.corpus import build_local_corpus, local_corpus_fingerprint, open_corpus, plan_local_corpus
from rlp_jax.data.text_files import expand_paths, iter_source_records


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _jsonl(*objects):
    return "".join(json.dumps(o) + "\n" for o in objects)


def _records(corpus, split):
    source = corpus.source(split)
    return sorted(((int(r["doc_id"]), r["text"].decode(), r["origin"].decode())
                   for r in (source[i] for i in range(len(source)))))


@pytest.fixture
def messy_corpus(tmp_path):
    """Files with 7 usable documents, 2 empty, 2 duplicates, 2 invalid UTF-8, 1 blank line."""
    src = tmp_path / "src"
    _write(src / "a.txt", b"first block\nstill first\n\n\nsecond block\n\n  \n\nfirst block\n"
                          b"still first\n\n\xff\xfe not utf-8\n")
    _write(src / "b.jsonl", _jsonl({"text": "json one"}, {"text": "   "}) + "\n"
           + _jsonl({"text": "json two", "other": 1}, {"text": "second block"}))
    _write(src / "c.jsonl.gz", _jsonl({"text": "gz one"}, {"text": ""}, {"text": "gz two"})
           + '{"text": "bad \\ud800 surrogate"}\n')
    _write(src / "sub" / "d.jsonl", _jsonl({"text": "nested dir"}))
    return src


def test_counts_every_dropped_record_and_keeps_the_rest(messy_corpus, tmp_path):
    corpus = build_local_corpus(messy_corpus, tmp_path / "tfds", name="messy",
                                txt_documents="blank_line_blocks", validation_fraction=0)
    assert corpus.splits == ("train",)
    assert corpus.build_stats == {
        "files": 4, "records_read": 13, "documents_train": 7, "documents_validation": 0,
        "dropped_empty": 2, "dropped_duplicate": 2, "dropped_invalid_utf8": 2, "blank_lines": 1}
    src = str(messy_corpus)
    assert _records(corpus, "train") == [
        (0, "first block\nstill first", f"{src}/a.txt:1"),
        (1, "second block", f"{src}/a.txt:5"),
        (2, "json one", f"{src}/b.jsonl:1"),
        (3, "json two", f"{src}/b.jsonl:4"),
        (4, "gz one", f"{src}/c.jsonl.gz:1"),
        (5, "gz two", f"{src}/c.jsonl.gz:3"),
        (6, "nested dir", f"{src}/sub/d.jsonl:1"),
    ]
    assert corpus.position_kind_names == ("unmarked", "marked")


def test_a_build_logs_one_sentence_and_warns_only_about_what_it_dropped(messy_corpus, tmp_path, caplog):
    _write(tmp_path / "clean.txt", "one\n\ntwo\n\nthree\n")
    with caplog.at_level(logging.INFO, logger="rlp_jax.data.corpus"):
        build_local_corpus(messy_corpus, tmp_path / "tfds", name="messy", txt_documents="paragraphs",
                           validation_fraction=0)
        build_local_corpus(tmp_path / "clean.txt", tmp_path / "tfds", name="clean", txt_documents="paragraphs",
                           validation_fraction=0)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.name == "rlp_jax.data.corpus" and not r.getMessage().startswith("building ")]
    messy_dir = tmp_path / "tfds" / "rlp_local_corpus" / "messy" / "1.0.0"
    clean_dir = tmp_path / "tfds" / "rlp_local_corpus" / "clean" / "1.0.0"
    assert logged == [
        ("INFO", f"built corpus rlp_local_corpus/messy in {messy_dir}: 7 training and 0 validation documents "
                 "from 4 files"),
        ("WARNING", "corpus rlp_local_corpus/messy dropped 6 of 13 records (2 empty, 2 duplicate, 2 not valid UTF-8)"),
        ("INFO", f"built corpus rlp_local_corpus/clean in {clean_dir}: 3 training and 0 validation documents "
                 "from 1 file"),
    ]


def test_a_refused_build_leaves_no_folder_it_created(tmp_path):
    """A PDF renamed to .txt is refused, and the folders made on the way to the dataset go again
    (bad input writes nothing); folders that were there before stay."""
    _write(tmp_path / "paper.txt", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n\x00\xff")
    with pytest.raises(ValueError, match="dropped_invalid_utf8 1"):
        build_local_corpus(tmp_path / "paper.txt", tmp_path / "runs" / "x" / "data", validation_fraction=0)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "data" / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="dropped_invalid_utf8 1"):
        build_local_corpus(tmp_path / "paper.txt", tmp_path / "data", validation_fraction=0)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine"]


def test_txt_file_mode_keeps_a_file_as_one_document(tmp_path):
    _write(tmp_path / "src" / "one.txt", "para one\n\npara two\n")
    _write(tmp_path / "src" / "empty.txt", "\n \n")
    corpus = build_local_corpus(tmp_path / "src", tmp_path / "tfds", validation_fraction=0)
    assert [t for _, t, _ in _records(corpus, "train")] == ["para one\n\npara two\n"]
    assert corpus.build_stats["dropped_empty"] == 1


def test_hash_split_is_deterministic_and_order_free(tmp_path):
    texts = [f"document number {i}" for i in range(300)]
    _write(tmp_path / "forward.jsonl", _jsonl(*({"text": t} for t in texts)))
    _write(tmp_path / "backward.jsonl", _jsonl(*({"text": t} for t in reversed(texts))))
    forward = plan_local_corpus([str(tmp_path / "forward.jsonl")], validation_fraction=0.2)
    backward = plan_local_corpus([str(tmp_path / "backward.jsonl")], validation_fraction=0.2)
    assert list(forward.assignment) == list(reversed(backward.assignment))
    assert forward.stats["documents_validation"] == backward.stats["documents_validation"]
    assert 40 <= forward.stats["documents_validation"] <= 80  # about 20% of 300
    assert forward.stats["documents_train"] + forward.stats["documents_validation"] == 300


def test_build_is_reproducible_and_reopens_without_rebuilding(tmp_path):
    _write(tmp_path / "c.jsonl", _jsonl(*({"text": f"doc {i}"} for i in range(50))))
    first = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "one", validation_fraction=0.2)
    second = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "two", validation_fraction=0.2)
    for split in ("train", "validation"):
        assert _records(first, split) == _records(second, split)
    info = os.path.join(first.directory, "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    again = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "one", validation_fraction=0.2)
    assert os.stat(info).st_mtime_ns == stamp and _records(again, "train") == _records(
        first, "train")
    reopened = open_corpus(first.directory)
    assert reopened.build_stats == first.build_stats and reopened.splits == first.splits


def test_changed_contents_rebuild_and_a_touched_file_does_not(tmp_path):
    _write(tmp_path / "c.jsonl", _jsonl({"text": "old"}))
    first = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "tfds", validation_fraction=0)
    info = os.path.join(first.directory, "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    os.utime(tmp_path / "c.jsonl", ns=(stamp + 10**9, stamp + 10**9))  # same contents, newer time
    again = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "tfds", validation_fraction=0)
    assert os.stat(info).st_mtime_ns == stamp and again.fingerprint == first.fingerprint
    _write(tmp_path / "c.jsonl", _jsonl({"text": "new"}, {"text": "newer"}))
    rebuilt = build_local_corpus(tmp_path / "c.jsonl", tmp_path / "tfds", validation_fraction=0)
    assert [t for _, t, _ in _records(rebuilt, "train")] == ["new", "newer"]
    assert rebuilt.fingerprint != first.fingerprint
    assert rebuilt.fingerprint == local_corpus_fingerprint(tmp_path / "c.jsonl", validation_fraction=0)


def test_txt_documents_paragraphs_lines_and_file(tmp_path):
    _write(tmp_path / "t.txt", "one line\nsecond line\n\nnext paragraph\n\n\nlast\r\n")
    cut = lambda mode: [(r.origin.rsplit("/", 1)[1], r.text) for r in
                        iter_source_records(str(tmp_path / "t.txt"), txt_documents=mode)]
    assert cut("paragraphs") == cut("blank_line_blocks") == [
        ("t.txt:1", "one line\nsecond line"), ("t.txt:4", "next paragraph"), ("t.txt:7", "last")]
    assert cut("lines") == [("t.txt:1", "one line"), ("t.txt:2", "second line"), ("t.txt:4", "next paragraph"),
                            ("t.txt:7", "last")]
    assert cut("file") == [("t.txt", "one line\nsecond line\n\nnext paragraph\n\n\nlast\r\n")]


def test_a_small_corpus_always_gets_a_validation_document(tmp_path):
    texts = [f"paragraph number {i}" for i in range(5)]
    _write(tmp_path / "small.jsonl", _jsonl(*({"text": t} for t in texts)))
    plan = plan_local_corpus([str(tmp_path / "small.jsonl")], validation_fraction=0.01)
    assert plan.stats["documents_validation"] == 1 and plan.stats["documents_train"] == 4
    _write(tmp_path / "reversed.jsonl", _jsonl(*({"text": t} for t in reversed(texts))))
    again = plan_local_corpus([str(tmp_path / "reversed.jsonl")], validation_fraction=0.01)
    # the same document moves whatever the file order (the one of the lowest text hash)
    assert texts[plan.assignment.index("validation")] == texts[::-1][again.assignment.index("validation")]


def test_validation_files_and_cross_split_duplicates(tmp_path):
    _write(tmp_path / "train.jsonl", _jsonl({"body": {"text": "shared"}},
                                            {"body": {"text": "train only"}}))
    _write(tmp_path / "val.jsonl", _jsonl({"body": {"text": "shared"}},
                                          {"body": {"text": "val only"}}))
    corpus = build_local_corpus(tmp_path / "train.jsonl", tmp_path / "tfds", text_field="body.text",
                                validation_paths=[str(tmp_path / "val.jsonl")])
    assert [t for _, t, _ in _records(corpus, "train")] == ["shared", "train only"]
    assert _records(corpus, "validation") == [(2, "val only", f"{tmp_path}/val.jsonl:2")]
    assert corpus.build_stats["dropped_duplicate"] == 1


def test_marked_offsets_field(tmp_path):
    _write(tmp_path / "m.jsonl", _jsonl({"text": "2+2=4", "answer_at": [4]}, {"text": "no marks"}))
    corpus = build_local_corpus(tmp_path / "m.jsonl", tmp_path / "tfds", validation_fraction=0,
                                marked_offsets_field="answer_at")
    source = corpus.source("train")
    by_text = {source[i]["text"].decode(): source[i] for i in range(len(source))}
    assert by_text["2+2=4"]["marked_offsets"].tolist() == [4]
    assert by_text["2+2=4"]["marked_kinds"].tolist() == [1]
    assert by_text["no marks"]["marked_offsets"].tolist() == []
    _write(tmp_path / "bad.jsonl", _jsonl({"text": "abc", "answer_at": [3]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: marked offset 3 lies outside the text's 3"):
        plan_local_corpus([str(tmp_path / "bad.jsonl")], marked_offsets_field="answer_at")
    _write(tmp_path / "bad2.jsonl", _jsonl({"text": "abc", "answer_at": "1"}))
    with pytest.raises(ValueError, match="must be a list of integer character offsets"):
        plan_local_corpus([str(tmp_path / "bad2.jsonl")], marked_offsets_field="answer_at")


@pytest.mark.parametrize("content,message", [
    ('{"text": "fine"}\n{"text": "broken"\n', r"bad.jsonl:2: malformed JSON \(Expecting ',' "
                                              r"delimiter at column 18\); fix or remove"),
    ('{"text": "fine"}\n["a list"]\n', r"bad.jsonl:2: expected a JSON object per line"),
    ('{"text": "fine"}\n{"body": "x"}\n', r"bad.jsonl:2: no 'text' field \(keys: \['body'\]\); "
                                          r"set text_field"),
    ('{"text": 7}\n', r"bad.jsonl:1: field 'text' holds int, not text"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(ValueError, match=message):
        build_local_corpus(tmp_path / "bad.jsonl", tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "rlp_local_corpus" / "corpus" / "1.0.0").exists()


def test_bad_paths_and_options(tmp_path):
    _write(tmp_path / "notes.md", "x")
    _write(tmp_path / "empty_dir" / "readme.md", "x")
    _write(tmp_path / "broken.jsonl.gz", b"")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    _write(tmp_path / "ok.jsonl", _jsonl({"text": "a"}))
    cases = [
        (lambda: expand_paths([str(tmp_path / "notes.md")]), ValueError, "is not a .txt, .jsonl"),
        (lambda: expand_paths([str(tmp_path / "empty_dir")]), ValueError, "holds no .txt"),
        (lambda: expand_paths([str(tmp_path / "nothing*.jsonl")]), ValueError,
         "no corpus file matches"),
        (lambda: list(iter_source_records(str(tmp_path / "broken.jsonl.gz"))), ValueError,
         "is not a readable gzip file"),
        (lambda: build_local_corpus(tmp_path / "ok.jsonl", tmp_path / "t", name="Bad Name"),
         ValueError, "corpus name 'Bad Name' is not allowed"),
        (lambda: build_local_corpus(tmp_path / "ok.jsonl", tmp_path / "t",
                                    validation_fraction=1.5), ValueError,
         r"use a value in \[0, 1\)"),
        (lambda: build_local_corpus(tmp_path / "ok.jsonl", tmp_path / "t"), ValueError,
         "the corpus is a single document, so no validation split can be cut from it"),
        (lambda: build_local_corpus(tmp_path / "ok.jsonl", tmp_path / "t", validation_fraction=0,
                                    txt_documents="pages"), ValueError, "txt_documents is 'pages'"),
        (lambda: open_corpus(tmp_path / "nowhere"), FileNotFoundError, "holds no built dataset"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    _write(tmp_path / "blank.jsonl", "\n\n" + _jsonl({"text": " "}))
    with pytest.raises(ValueError, match=r"no usable training documents .*dropped_empty 1"):
        build_local_corpus(tmp_path / "blank.jsonl", tmp_path / "t", validation_fraction=0)
