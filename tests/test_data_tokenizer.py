"""Tokenizers: exact round trips, single-token think markers, offsets, and clear errors."""

import json

import pytest
from tokenizers import Tokenizer as RawHFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlp_jax.data.demo_corpus import DEMO_ALPHABET, DemoCorpusSpec, demo_tokenizer, \
    generate_demo_documents
from rlp_jax.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, \
    load_tokenizer, tokenizer_fingerprint

TEXTS = [
    "457+386=843",
    "457+386=<think>76013 58114 43108</think>843",
    "naïve café: ü€ and 😀 emoji, tabs\tand\nnew lines  ",
    "<think></think><think>nested?</think> text </think>",
    "",
]


def _train_bpe(path, special_tokens):
    """A tiny byte-level BPE tokenizer.json, trained offline on a few lines (Qwen3 style)."""
    tok = RawHFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 10 + ["what is 457+386? 843 the answer"] * 10, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def qwen_like_path(tmp_path_factory):
    return _train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                      ["<|endoftext|>", "<think>", "</think>"])


@pytest.fixture(scope="module")
def llama_like_path(tmp_path_factory):
    """No think markers; spare reserved tokens as Llama 3 has."""
    return _train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                      ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                       "<|reserved_special_token_1|>"])


def test_char_tokenizer_round_trips_every_demo_document_one_token_per_character():
    tok = demo_tokenizer()
    assert tok.vocab_size == 4 + len(DEMO_ALPHABET) == 48
    spec = DemoCorpusSpec(num_train=300, num_validation=30, worked_fraction=0.5,
                          word_problem_fraction=0.5)
    for doc in generate_demo_documents(spec, "train"):
        text = doc["text"]
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # "<think>" (7 characters) and "</think>" (8) are one token each.
        assert len(ids) == len(text) - 6 * text.count("<think>") - 7 * text.count("</think>")
        assert all(4 <= i < 48 for i in ids if i not in (2, 3))


def test_char_tokenizer_markers_are_single_tokens_and_offsets_cover_the_text():
    tok = CharTokenizer("0123456789+= ")
    ids, offsets = tok.encode_with_offsets("1+2=<think>3 </think>3")
    assert ids[:4] == [4 + 1, 4 + 10, 4 + 2, 4 + 11]
    assert ids[4] == tok.think_open_id == 2 and ids[7] == tok.think_close_id == 3
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 11), (11, 12), (12, 13), (13, 21),
                       (21, 22)]
    assert tok.decode([tok.pad_id, *ids, tok.eos_id]) == "1+2=<think>3 </think>3"


def test_char_tokenizer_errors_name_the_problem():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"character 'x' at offset 2 is not in the tokenizer's"):
        tok.encode("abx")
    with pytest.raises(ValueError, match="repeats"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary of 7"):
        tok.decode([4, 7])
    with pytest.raises(ValueError, match="two different non-empty strings"):
        CharTokenizer("abc", think_open="<t>", think_close="<t>")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids, offsets = tok.encode_with_offsets(text)
    assert tok.decode(ids) == text
    assert len(ids) == len(offsets)
    assert all(0 <= i < tok.vocab_size == 260 for i in ids)
    plain = text.replace("<think>", "").replace("</think>", "")
    assert len(ids) == len(plain.encode("utf-8")) + text.count("<think>") + text.count("</think>")


def test_byte_tokenizer_offsets_of_multibyte_characters():
    tok = ByteTokenizer()
    ids, offsets = tok.encode_with_offsets("a€")
    assert ids == [4 + ord("a"), 4 + 0xE2, 4 + 0x82, 4 + 0xAC]
    assert offsets == [(0, 1), (1, 2), (1, 2), (1, 2)]
    assert tok.decode(ids[:2]) == "a\ufffd"  # a sample cut mid-character decodes, marked


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trips_and_keeps_markers_single(qwen_like_path, text):
    tok = HFTokenizer(qwen_like_path)
    ids, offsets = tok.encode_with_offsets(text)
    assert tok.decode(ids) == text
    assert tok.encode(text) == ids and len(offsets) == len(ids)
    assert ids.count(tok.think_open_id) == text.count("<think>")
    assert ids.count(tok.think_close_id) == text.count("</think>")
    for (start, end), token in zip(offsets, ids):
        if token == tok.think_open_id:
            assert text[start:end] == "<think>"


def test_hf_tokenizer_special_ids(qwen_like_path):
    tok = HFTokenizer(qwen_like_path)
    assert (tok.eos_id, tok.think_open_id, tok.think_close_id) == (0, 1, 2)
    assert tok.pad_id == tok.eos_id and tok.bos_id is None
    assert tok.vocab_size == len(json.load(open(qwen_like_path))["model"]["vocab"])
    assert isinstance(tok, Tokenizer)


def test_hf_tokenizer_without_markers(llama_like_path):
    with pytest.raises(ValueError, match=r"'<think>' is not a token of .*add_missing_markers"):
        HFTokenizer(llama_like_path)
    spare = HFTokenizer(llama_like_path, think_open="<|reserved_special_token_0|>",
                        think_close="<|reserved_special_token_1|>",
                        bos_token="<|begin_of_text|>")
    assert (spare.bos_id, spare.eos_id, spare.think_open_id, spare.think_close_id) == (0, 1, 2, 3)
    text = "x<|reserved_special_token_0|>y<|reserved_special_token_1|>z"
    assert spare.decode(spare.encode(text)) == text
    grown = HFTokenizer(llama_like_path, add_missing_markers=True)
    assert grown.vocab_size == spare.vocab_size + 2
    assert grown.encode("<think>") == [grown.think_open_id] == [spare.vocab_size]
    assert grown.decode(grown.encode(TEXTS[1])) == TEXTS[1]
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(spare)


def test_hf_tokenizer_errors(tmp_path, qwen_like_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        HFTokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"none of \['<bos>'\] is a token"):
        HFTokenizer(qwen_like_path, bos_token="<bos>")


def test_load_tokenizer_specs(qwen_like_path, tmp_path):
    assert load_tokenizer("demo").vocab_size == 48
    assert load_tokenizer("bytes").vocab_size == 260
    assert load_tokenizer("char:ab").decode([4, 5]) == "ab"
    assert load_tokenizer(qwen_like_path).think_open_id == 1
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text(open(qwen_like_path).read())
    assert load_tokenizer(str(tmp_path / "model")).eos_id == 0
    assert tokenizer_fingerprint(load_tokenizer("demo")) == tokenizer_fingerprint(
        demo_tokenizer())
    assert tokenizer_fingerprint(load_tokenizer("char:ab")) != tokenizer_fingerprint(
        load_tokenizer("char:ba"))


def test_token_bytes_spell_every_text_back_exactly(qwen_like_path):
    """The byte table RPT's reward compares: the bytes of a text's tokens, end to end, are the
    text's UTF-8 bytes, for the byte-level BPE, the byte and the char tokenizers."""
    from rlp_jax.data.tokenizer import token_byte_table

    text = "what is 457+386? 843 — naïve <think>carry</think> the answer"
    for tok in (load_tokenizer(qwen_like_path), load_tokenizer("bytes")):
        table, lengths = token_byte_table(tok)
        ids = tok.encode(text)
        assert b"".join(bytes(table[i, :lengths[i]]) for i in ids) == text.encode("utf-8")
    demo = demo_tokenizer()
    table, lengths = token_byte_table(demo)
    ids = demo.encode("457+386=843")
    assert b"".join(bytes(table[i, :lengths[i]]) for i in ids) == b"457+386=843"


def _write_hf_files(tok, folder):
    from rlp_jax.data.tokenizer import hf_tokenizer_files

    folder.mkdir()
    for name, text in hf_tokenizer_files(tok).items():
        (folder / name).write_text(text)
    return folder


HF_FORM_CASES = {
    "bytes": (ByteTokenizer(), TEXTS + ["Ελληνικά, 中文, עברית; a\u00a0b\r\n\x00 \ufeff", "  two  spaces  "]),
    "demo chars": (demo_tokenizer(), [TEXTS[0], TEXTS[1], TEXTS[4], "what is 457+386? 843.\n<think>carry</think>"]),
}


@pytest.mark.parametrize("case", list(HF_FORM_CASES))
def test_hf_form_of_the_char_and_byte_tokenizers_gives_our_ids(case, tmp_path):
    """What `rlp-jax export` writes beside the weights: `transformers.AutoTokenizer` and
    `tokenizers.Tokenizer` read it and encode text to exactly our ids (the byte offset of 4 and the
    marker ids included), and decode them back; rlp-jax's own HFTokenizer reads it too."""
    import transformers

    tok, texts = HF_FORM_CASES[case]
    folder = _write_hf_files(tok, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    raw = RawHFTokenizer.from_file(str(folder / "tokenizer.json"))
    ours_again = HFTokenizer(folder)
    assert len(auto) == raw.get_vocab_size() == ours_again.vocab_size == tok.vocab_size
    for text in texts:
        ids = tok.encode(text)
        assert auto.encode(text) == ids, text
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        assert ours_again.encode(text) == ids, text
        assert auto.decode(ids) == raw.decode(ids, skip_special_tokens=False) == text
    assert (auto.pad_token_id, auto.eos_token_id) == (tok.pad_id, tok.eos_id) == (0, 1)
    assert (ours_again.pad_id, ours_again.eos_id, ours_again.think_open_id, ours_again.think_close_id) == (0, 1, 2, 3)
    assert auto.decode([tok.eos_id, 2, 3, tok.pad_id], skip_special_tokens=True) == tok.decode([1, 2, 3, 0])


def test_hf_form_of_an_hf_tokenizer_is_itself(qwen_like_path, tmp_path):
    import transformers

    tok = HFTokenizer(qwen_like_path)
    auto = transformers.AutoTokenizer.from_pretrained(_write_hf_files(tok, tmp_path / "hf"))
    for text in TEXTS:
        assert auto.encode(text) == tok.encode(text) and auto.decode(tok.encode(text)) == text
    assert auto.eos_token_id == tok.eos_id
