"""The text side of a model for benchmarks: encode prompts (with the tokenizer's own start token,
e.g. Llama 3's `<|begin_of_text|>`), encode continuations, decode, and the tokens that end a
response.

Benchmark prompts contain `<think>` as text, so unlike training (rlp_jax.data.HFTokenizer) a
tokenizer.json need not have the markers as single tokens: a Llama or GPT-NeoX tokenizer works.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rlp_jax.benchmarks.tasks import BenchmarkError

_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<|eos|>")


class BenchmarkTokenizer:
    """`encode_prompt`, `encode`, `decode`, `stop_ids` (end-of-text tokens) and `pad_id`."""

    def __init__(self, encode_prompt, encode, decode, stop_ids: tuple[int, ...], pad_id: int, vocab_size: int,
                 name: str):
        self.encode_prompt, self.encode, self.decode = encode_prompt, encode, decode
        self.stop_ids, self.pad_id, self.vocab_size, self.name = tuple(stop_ids), pad_id, vocab_size, name


def load(spec: str | os.PathLike) -> BenchmarkTokenizer:
    """`bytes`, `demo` or `char:<alphabet>` (rlp_jax.data tokenizers), or a tokenizer.json (or the
    folder holding it)."""
    spec = os.fspath(spec)
    if spec in ("bytes", "demo") or spec.startswith("char:"):
        from rlp_jax.data import load_tokenizer

        tok = load_tokenizer(spec)
        return BenchmarkTokenizer(tok.encode, tok.encode, lambda ids: tok.decode(list(ids)), (tok.eos_id,),
                                  tok.pad_id, tok.vocab_size, spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise BenchmarkError(f"no tokenizer at {path}; pass --tokenizer with a tokenizer.json (or its folder), or "
                             "'bytes'.")
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(path))
    stop = tuple(i for i in (hf.token_to_id(t) for t in _END_TOKENS) if i is not None)
    if not stop:
        raise BenchmarkError(f"{path} has none of the end-of-text tokens {', '.join(_END_TOKENS)}; use a tokenizer "
                             "with one.")

    def decode(ids: Sequence[int]) -> str:
        return hf.decode([int(i) for i in ids], skip_special_tokens=False)

    return BenchmarkTokenizer(lambda text: hf.encode(text, add_special_tokens=True).ids,
                              lambda text: hf.encode(text, add_special_tokens=False).ids, decode, stop, stop[0],
                              hf.get_vocab_size(with_added_tokens=True), str(path))
