"""Tokenizers: one small protocol, three implementations.

- `HFTokenizer`: a Hugging Face `tokenizers` JSON file (Qwen3, Llama 3, GPT-NeoX, ...) by path.
- `CharTokenizer`: a fixed alphabet, one token per character (the demo uses it).
- `ByteTokenizer`: one token per UTF-8 byte; needs no vocabulary file and encodes any text.

All three carry the open/close-thought markers (`<think>`, `</think>` by default) as single tokens.
`decode(encode(text)) == text` holds exactly for the char and byte tokenizers, and for HF tokenizers
without a normalizer (byte-level BPE such as Qwen3 and Llama 3).

Token ids reserved by the char and byte tokenizers: 0 pad, 1 eos, 2 open-thought, 3 close-thought;
the alphabet / bytes follow from id 4.

`hf_tokenizer_files` writes any of the three as a tokenizer the Hugging Face libraries read
(`rlp-jax export` puts it beside the weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "hf_tokenizer_files",
    "THINK_OPEN",
    "THINK_CLOSE",
    "DEMO_ALPHABET",
    "demo_tokenizer",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Offsets = list[tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, sampler and demo need from a tokenizer.

    `encode` never adds BOS/EOS; the pipeline adds them around documents. `encode_with_offsets`
    also returns each token's `(start, end)` character span in the text, which maps character
    positions (e.g. where an answer starts) to token positions.
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    think_open_id: int
    think_close_id: int
    think_open: str
    think_close: str

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash that changes when the tokenizer's vocabulary or special ids change."""
    parts = [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id,
             tokenizer.bos_id, tokenizer.think_open_id, tokenizer.think_close_id,
             getattr(tokenizer, "vocabulary_digest", "")]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class _MarkerSplitter:
    """Splits text into plain segments and think-marker occurrences (markers matched first)."""

    def __init__(self, think_open: str, think_close: str):
        if not think_open or not think_close or think_open == think_close:
            raise ValueError(f"think markers must be two different non-empty strings, got "
                             f"{think_open!r} and {think_close!r}; pass distinct marker strings.")
        self.think_open, self.think_close = think_open, think_close
        ordered = sorted([think_open, think_close], key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(m) for m in ordered))

    def segments(self, text: str):
        """Yields `(start, piece, is_marker)` covering `text` in order."""
        cursor = 0
        for match in self._pattern.finditer(text):
            if match.start() > cursor:
                yield cursor, text[cursor:match.start()], False
            yield match.start(), match.group(), True
            cursor = match.end()
        if cursor < len(text):
            yield cursor, text[cursor:], False


class _SmallVocabTokenizer:
    """Shared code of the char and byte tokenizers: ids 0..3 are pad, eos and the two markers."""

    pad_id = 0
    eos_id = 1
    bos_id = None
    think_open_id = 2
    think_close_id = 3
    _first_regular_id = 4

    def __init__(self, think_open: str, think_close: str):
        self._markers = _MarkerSplitter(think_open, think_close)
        self.think_open, self.think_close = think_open, think_close
        self._marker_ids = {think_open: self.think_open_id, think_close: self.think_close_id}

    def encode(self, text: str) -> list[int]:
        return self._encode(text, with_offsets=False)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        return self._encode(text, with_offsets=True)

    def _encode(self, text: str, with_offsets: bool) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        for start, piece, is_marker in self._markers.segments(text):
            if is_marker:
                ids.append(self._marker_ids[piece])
                offsets.append((start, start + len(piece)))
            else:
                piece_ids_N, char_index_N = self._encode_plain(piece, start)
                ids.extend(piece_ids_N.tolist())
                if with_offsets:
                    char_start_N = (char_index_N + start).tolist()
                    offsets.extend(zip(char_start_N, [c + 1 for c in char_start_N]))
        return ids, (offsets if with_offsets else [])

    def _encode_plain(self, piece: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of marker-free text (found at `start` in the whole text), and the index in
        `piece` of the character each token encodes."""
        raise NotImplementedError


class CharTokenizer(_SmallVocabTokenizer):
    """One token per character of a fixed alphabet, plus pad, eos and the two think markers.

    Characters outside the alphabet are an error (never silently mapped to an unknown token), so
    a corpus and its tokenizer cannot drift apart unnoticed. `pad` and `eos` decode to nothing.
    """

    def __init__(self, alphabet: str, *, think_open: str = THINK_OPEN,
                 think_close: str = THINK_CLOSE):
        if len(set(alphabet)) != len(alphabet):
            repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"the alphabet repeats {repeated!r}; list each character once.")
        if not alphabet:
            raise ValueError("the alphabet is empty; pass the characters the corpus uses.")
        super().__init__(think_open, think_close)
        self.alphabet = alphabet
        self.vocab_size = self._first_regular_id + len(alphabet)
        self.vocabulary_digest = hashlib.sha256(
            (alphabet + "\0" + think_open + "\0" + think_close).encode()).hexdigest()[:16]
        self._char_to_id = {c: i + self._first_regular_id for i, c in enumerate(alphabet)}
        self._id_to_piece = ["", "", think_open, think_close] + list(alphabet)

    def _encode_plain(self, piece: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        lookup = self._char_to_id.get
        ids = [lookup(c, -1) for c in piece]  # a dict beats numpy on the short texts we see
        if -1 in ids:
            bad = ids.index(-1)
            raise ValueError(
                f"character {piece[bad]!r} at offset {start + bad} is not in the tokenizer's "
                "alphabet; add it to the alphabet or use ByteTokenizer / an HF tokenizer.")
        return np.asarray(ids, np.int64), np.arange(len(piece))

    def token_bytes(self) -> list[bytes]:
        """Each id's UTF-8 bytes (pad and eos: none; the markers: their text)."""
        return [piece.encode("utf-8") for piece in self._id_to_piece]

    def decode(self, ids: Sequence[int]) -> str:
        pieces = self._id_to_piece
        try:
            return "".join(pieces[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < len(pieces))
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary of "
                             f"{self.vocab_size}; decode ids produced with the same tokenizer."
                             ) from None


class ByteTokenizer(_SmallVocabTokenizer):
    """One token per UTF-8 byte (ids 4..259), plus pad, eos and the two think markers.

    Any text encodes; `decode` of an id sequence that is not valid UTF-8 (a sampled sequence can
    stop mid-character) replaces the broken bytes with U+FFFD.
    """

    vocab_size = 4 + 256
    vocabulary_digest = "utf-8-bytes"

    def __init__(self, *, think_open: str = THINK_OPEN, think_close: str = THINK_CLOSE):
        super().__init__(think_open, think_close)
        self.vocabulary_digest = hashlib.sha256(
            ("bytes\0" + think_open + "\0" + think_close).encode()).hexdigest()[:16]

    def _encode_plain(self, piece: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        del start  # any text encodes
        bytes_N = np.frombuffer(piece.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        starts_char_N = (bytes_N & 0xC0) != 0x80  # continuation bytes are 10xxxxxx
        return bytes_N.astype(np.int64) + self._first_regular_id, np.cumsum(starts_char_N) - 1

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes: one byte per regular id; the markers their text; pad and eos none."""
        specials = [b"", b"", self.think_open.encode("utf-8"), self.think_close.encode("utf-8")]
        return specials + [bytes([b]) for b in range(256)]

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        for token in ids:
            token = int(token)
            if token >= self._first_regular_id:
                if token >= self.vocab_size:
                    raise ValueError(f"token id {token} is outside this tokenizer's vocabulary of "
                                     f"{self.vocab_size}; decode ids produced with the same "
                                     "tokenizer.")
                pending.append(token - self._first_regular_id)
                continue
            out.append(pending.decode("utf-8", "replace"))
            pending.clear()
            if token == self.think_open_id:
                out.append(self.think_open)
            elif token == self.think_close_id:
                out.append(self.think_close)
            elif token < 0:
                raise ValueError(f"token id {token} is negative; decode ids produced with the "
                                 "same tokenizer.")
        out.append(pending.decode("utf-8", "replace"))
        return "".join(out)


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable characters standing for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_table(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """`(bytes_VxW uint8, length_V int32)`: every token id's bytes, zero-padded to the longest,
    for byte-level comparisons inside a jitted step (the RPT reward)."""
    pieces = tokenizer.token_bytes()
    width = max(1, max(len(p) for p in pieces))
    table = np.zeros((len(pieces), width), np.uint8)
    for i, piece in enumerate(pieces):
        table[i, :len(piece)] = np.frombuffer(piece, np.uint8)
    return table, np.asarray([len(p) for p in pieces], np.int32)


_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json) behind the `Tokenizer` protocol.

    Args:
      path: a tokenizer.json file, or a directory that holds one (an HF model snapshot).
      think_open, think_close: the marker strings; each must be a single token that the tokenizer
        also produces when it meets the string in text (Qwen3 has `<think>` and `</think>`). For a
        tokenizer without them name two of its spare special tokens (e.g. Llama 3's
        `<|reserved_special_token_0|>`), or set `add_missing_markers=True`.
      add_missing_markers: append missing markers to the vocabulary as special tokens. The
        vocabulary then grows, so a pretrained model's embedding must grow with it.
      eos_token, pad_token, bos_token: override the detected special tokens. EOS is looked up
        among common names; PAD falls back to EOS (masks make its value irrelevant); BOS is
        None unless given (Llama 3 wants `<|begin_of_text|>`; Qwen3 uses none).
    """

    def __init__(self, path: str | os.PathLike, *, think_open: str = THINK_OPEN,
                 think_close: str = THINK_CLOSE, add_missing_markers: bool = False,
                 eos_token: str | None = None, pad_token: str | None = None,
                 bos_token: str | None = None):
        import tokenizers  # the HF library; imported here so the char/byte tokenizers need none

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}; pass the path of a "
                                    "tokenizer.json (or of the directory holding it).")
        self.path = path
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self.think_open, self.think_close = think_open, think_close
        _MarkerSplitter(think_open, think_close)  # validates the pair
        missing = [m for m in (think_open, think_close) if self._tokenizer.token_to_id(m) is None]
        if missing and add_missing_markers:
            self._tokenizer.add_special_tokens(
                [tokenizers.AddedToken(m, special=True, normalized=False) for m in missing])
        elif missing:
            raise ValueError(
                f"{missing[0]!r} is not a token of {path}; pass think_open/think_close naming "
                "two of its spare special tokens, or add_missing_markers=True to add them.")
        self.think_open_id = self._single_token_id(think_open, "think_open")
        self.think_close_id = self._single_token_id(think_close, "think_close")
        self.eos_id = self._special_id(eos_token, _EOS_CANDIDATES, "eos_token", required=True)
        self.pad_id = self._special_id(pad_token, _PAD_CANDIDATES, "pad_token",
                                       required=False, default=self.eos_id)
        self.bos_id = None if bos_token is None else self._special_id(
            bos_token, (), "bos_token", required=True)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = sorted(self._tokenizer.get_vocab(with_added_tokens=True).items())
        self.vocabulary_digest = hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]

    def _single_token_id(self, marker: str, argument: str) -> int:
        token_id = self._tokenizer.token_to_id(marker)
        ids = self._tokenizer.encode(marker, add_special_tokens=False).ids
        if ids != [token_id]:
            raise ValueError(
                f"{marker!r} is in the vocabulary of {self.path} but text containing it encodes "
                f"as {ids}, not as the single token {token_id}; pass as {argument} a special "
                "token of this tokenizer, or add_missing_markers=True with a new marker string.")
        return token_id

    def _special_id(self, name: str | None, candidates: Sequence[str], argument: str, *,
                    required: bool, default: int | None = None) -> int:
        names = [name] if name is not None else list(candidates)
        for candidate in names:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return token_id
        if name is None and not required:
            return default
        raise ValueError(f"none of {names} is a token of {self.path}; pass {argument}= naming "
                         "the tokenizer's own token.")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes. A byte-level BPE (GPT-2 / Qwen3 / Llama 3 style) spells bytes as
        printable characters in its vocabulary; those map back exactly. Otherwise each token is
        decoded alone (exact for tokens that are whole UTF-8 characters)."""
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        pieces = [""] * self.vocab_size
        for piece, token_id in vocab.items():
            pieces[token_id] = piece
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        byte_level = type(self._tokenizer.decoder).__name__ == "ByteLevel"
        to_byte = _byte_level_decoder()
        out = []
        for token_id, piece in enumerate(pieces):
            if piece in special:
                out.append(piece.encode("utf-8"))
            elif byte_level and all(c in to_byte for c in piece):
                out.append(bytes(to_byte[c] for c in piece))
            else:
                out.append(self._tokenizer.decode([token_id]).encode("utf-8"))
        return out


def load_tokenizer(spec: str, **kwargs) -> Tokenizer:
    """A tokenizer from a short spec.

    `"demo"`: the demo corpus's char tokenizer; `"bytes"`: `ByteTokenizer`; `"char:<alphabet>"`:
    a `CharTokenizer` over the characters after the colon; anything else: a path to a
    tokenizer.json (or its directory) for `HFTokenizer`, which receives `kwargs`.
    """
    if spec == "demo":
        return demo_tokenizer(**kwargs)
    if spec == "bytes":
        return ByteTokenizer(**kwargs)
    if spec.startswith("char:"):
        return CharTokenizer(spec[len("char:"):], **kwargs)
    return HFTokenizer(spec, **kwargs)


# How the HF files spell pad and eos, which the char and byte tokenizers decode to nothing (a
# `tokenizers` vocabulary needs a string per id; these are the names `HFTokenizer` looks for).
HF_PAD_TOKEN, HF_EOS_TOKEN = "<pad>", "<eos>"


def hf_tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """`{file name: text}` of a Hugging Face tokenizer with `tokenizer`'s ids: `tokenizer.json` (the
    `tokenizers` library's format) and `tokenizer_config.json`, which
    `transformers.AutoTokenizer.from_pretrained` reads from the same folder.

    Char and byte vocabularies become a BPE without merges (the byte tokenizer's bytes spelled in
    the byte-level alphabet, as in GPT-2) that keeps our ids, offset included; text encodes to the
    same ids and decodes back. Pad and eos are the special tokens `<pad>` and `<eos>` (skipped by
    `decode(..., skip_special_tokens=True)`), the think markers added tokens. Differences: text that
    contains `<pad>` or `<eos>` encodes them as those tokens, and characters outside a char
    tokenizer's alphabet, which `CharTokenizer` refuses, are dropped. An `HFTokenizer` gives its own
    tokenizer.json and the tokenizer_config.json beside it (one is made if there is none).
    """
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        beside = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
        if os.path.isfile(beside):
            with open(beside, encoding="utf-8") as f:
                config = f.read()
        else:
            name = tokenizer._tokenizer.id_to_token
            config = _hf_tokenizer_config(name(tokenizer.pad_id), name(tokenizer.eos_id),
                                          None if tokenizer.bos_id is None else name(tokenizer.bos_id))
        return {"tokenizer.json": tokenizer._tokenizer.to_str(), "tokenizer_config.json": config}
    if isinstance(tokenizer, ByteTokenizer):
        pieces = _byte_level_decoder()  # {printable char: the byte it spells}
    elif isinstance(tokenizer, CharTokenizer):
        pieces = {char: i for i, char in enumerate(tokenizer.alphabet)}
    else:
        raise TypeError(f"{type(tokenizer).__name__} has no Hugging Face form; write its tokenizer.json by hand.")
    specials = {HF_PAD_TOKEN: tokenizer.pad_id, HF_EOS_TOKEN: tokenizer.eos_id,
                tokenizer.think_open: tokenizer.think_open_id, tokenizer.think_close: tokenizer.think_close_id}
    vocab = specials | {piece: i + tokenizer._first_regular_id for piece, i in pieces.items()}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if isinstance(tokenizer, ByteTokenizer):
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    else:
        hf.decoder = decoders.Fuse()  # without a decoder, tokens are joined with spaces
    # Already in the vocabulary, so they keep its ids; added tokens are matched in text before the BPE.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (HF_PAD_TOKEN, HF_EOS_TOKEN)])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t in (tokenizer.think_open, tokenizer.think_close)])
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": _hf_tokenizer_config(HF_PAD_TOKEN, HF_EOS_TOKEN)}


def _hf_tokenizer_config(pad: str, eos: str, bos: str | None = None) -> str:
    # Named, because transformers otherwise takes the class of config.json's model type, which brings
    # its own defaults (Qwen2's adds <|endoftext|>, Llama's prepends a BOS); no clean-up, which would
    # turn " ." into "." when decoding.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad, "eos_token": eos,
              "clean_up_tokenization_spaces": False}
    if bos is not None:
        config["bos_token"] = bos
    return json.dumps(config, indent=2) + "\n"


# The demo corpus's alphabet (rlp_jax.data.demo_corpus writes text in it).
DEMO_ALPHABET = "0123456789+=?.,: abcdefghijklmnopqrstuvwxyz\n"


def demo_tokenizer(**marker_kwargs) -> CharTokenizer:
    """The char-level tokenizer of the demo corpus: 4 special ids + 44 characters (48 tokens)."""
    return CharTokenizer(DEMO_ALPHABET, **marker_kwargs)
