"""RPT's hard positions, chosen on the data side before any rollout is sampled.

RPT (arXiv 2506.08007) prepares its data by scoring every token position of the corpus with a
small proxy model and keeping only the positions whose next token the proxy finds hard: the
entropy of its top-16 next-token distribution at least a threshold. Choosing them before training
means every prompt of a batch is one that trains (a filter inside the step would sample rollouts
at easy positions and then throw them away).

`score_split` runs the proxy once over one process's shard of a split and stores the entropy of
every position in a folder (`EntropyTable`), resumably: documents are scored in chunks, each
written atomically, and an interrupted pass continues from the first missing chunk. The prompt
pipeline then reads `EntropyTable.at_least(threshold)` and places prompts only at those
positions (`data.pipeline.prompt_batches(keep_positions=...)`), counting the candidate positions
it left out. The threshold is applied when reading, so one scored table serves any threshold.

What a position's entropy is: position `t` of a tokenized document `x` (BOS/EOS added as the
pipeline adds them) is scored from the proxy's logits after `x_<t`, with the think markers masked
out (`losses.text_token_entropy`). A document longer than the window W (the run's
`data.max_context`) is scored in windows of W tokens that start every W/2 tokens: the first
window scores positions 1…W, each later one the positions of its second half, so every position
sees at least W/2 tokens of context (the pipeline gives a prompt the last W). Documents of at
most W + 1 tokens are scored with exactly the pipeline's context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["EntropyTable", "HardPositions", "ScoringConfig", "ScoringError", "open_scored", "score_split", "window_plan"]

_META = "meta.json"
_IDENTITY = "identity.json"


class ScoringError(ValueError):
    """A folder or corpus that cannot be scored as asked (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """How a split is scored.

    Attributes:
      window: W, the most tokens of context a position is scored with (the run's max_context).
      add_bos, add_eos: tokenize documents as the prompt pipeline does.
      batch_rows: windows per proxy forward (a multiple of the devices that run it).
      chunk_documents: documents per resumable chunk.
    """

    window: int
    add_bos: bool
    add_eos: bool
    batch_rows: int = 16
    chunk_documents: int = 256

    def __post_init__(self):
        if self.window < 2 or self.batch_rows < 1 or self.chunk_documents < 1:
            raise ValueError(f"window ({self.window}) must be >= 2, batch_rows ({self.batch_rows}) and "
                             f"chunk_documents ({self.chunk_documents}) >= 1.")


def window_plan(num_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """The windows that score a document of `num_tokens` tokens: `(start, first, last)` per window,
    which feeds tokens `[start, start + window)` and owns positions `first … last` (inclusive;
    position t is predicted by the logits at index t − 1). Together they own 1 … num_tokens − 1
    once each."""
    last_position = num_tokens - 1
    if last_position < 1:
        return []
    plan = [(0, 1, min(window, last_position))]
    hop = max(window // 2, 1)
    start = hop
    while plan[-1][2] < last_position:
        first = plan[-1][2] + 1
        start = max(start, first - window)  # the window must reach `first`
        last = min(start + window, last_position)
        plan.append((start, first, last))
        start += hop
    return plan


@dataclasses.dataclass(frozen=True)
class HardPositions:
    """The positions of each document at or above an entropy threshold: a position filter for
    `data.pipeline.prompt_batches(keep_positions=...)`."""

    table: "EntropyTable"
    threshold: float

    @property
    def fingerprint(self) -> str:
        return f"{self.table.fingerprint}@{self.threshold!r}"

    def positions(self, doc_id: int, num_tokens: int) -> np.ndarray:
        """Sorted int32 positions of document `doc_id` (of `num_tokens` tokens) kept by the filter."""
        entropy = self.table.entropies(doc_id)
        if len(entropy) != max(num_tokens - 1, 0):
            raise ValueError(f"document {doc_id} has {num_tokens} tokens but its entropy table in "
                             f"{self.table.directory} scored {len(entropy) + 1}; the table belongs to another "
                             "tokenization: delete the folder so that it is scored again.")
        return (np.flatnonzero(entropy >= self.threshold) + 1).astype(np.int32)


class EntropyTable:
    """The scored entropies of one process's shard of a split, memory-mapped from its folder."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / _META).read_text())
        self.fingerprint: str = self.meta["fingerprint"]
        self._doc_ids = np.load(self.directory / "doc_ids.npy")
        self._starts = np.load(self.directory / "starts.npy")
        self._entropy = np.load(self.directory / "entropy.npy", mmap_mode="r")

    @staticmethod
    def complete(directory: str | Path) -> bool:
        return (Path(directory) / _META).exists()

    def entropies(self, doc_id: int) -> np.ndarray:
        """float32 `[n − 1]`: the entropy at positions 1 … n − 1 of document `doc_id`."""
        slot = int(np.searchsorted(self._doc_ids, doc_id))
        if slot >= len(self._doc_ids) or self._doc_ids[slot] != doc_id:
            raise KeyError(f"document {doc_id} was not scored in {self.directory}; the table covers another "
                           "shard of the split: delete the folder so that it is scored again.")
        return np.asarray(self._entropy[self._starts[slot]:self._starts[slot + 1]])

    def at_least(self, threshold: float) -> HardPositions:
        return HardPositions(self, float(threshold))

    def fraction_at_least(self, threshold: float) -> float:
        """The fraction of the shard's positions at or above `threshold` (read in slices)."""
        kept, step = 0, 1 << 24
        for lo in range(0, len(self._entropy), step):
            kept += int((np.asarray(self._entropy[lo:lo + step]) >= threshold).sum())
        return kept / max(len(self._entropy), 1)


def _tokenize(record: dict, tokenizer, config: ScoringConfig) -> np.ndarray:
    text = record["text"]
    ids = tokenizer.encode(text.decode("utf-8") if isinstance(text, bytes) else text)
    prefix = [tokenizer.bos_id] if config.add_bos else []
    suffix = [tokenizer.eos_id] if config.add_eos else []
    return np.asarray(prefix + list(ids) + suffix, np.int32)


def _atomic_save(path: Path, **arrays) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


def _score_chunk(records: list[dict], tokenizer, config: ScoringConfig, pad_id: int,
                 entropies_fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Every position of `records`, scored in windows of one shape (`batch_rows × W'`, W' the
    chunk's longest window rounded up to a power of two, at most W)."""
    documents = [_tokenize(r, tokenizer, config) for r in records]
    plans = [window_plan(len(tokens), config.window) for tokens in documents]
    longest = max((min(len(t), config.window) for t in documents), default=2)
    width = min(config.window, 1 << max(int(np.ceil(np.log2(max(longest, 2)))), 1))
    rows = [(d, start, first, last) for d, plan in enumerate(plans) for start, first, last in plan]
    out = [np.zeros(max(len(t) - 1, 0), np.float32) for t in documents]
    for lo in range(0, len(rows), config.batch_rows):
        batch = rows[lo:lo + config.batch_rows]
        tokens_BxW = np.full((config.batch_rows, width), pad_id, np.int32)
        for b, (d, start, _, _) in enumerate(batch):
            piece = documents[d][start:start + width]
            tokens_BxW[b, :len(piece)] = piece
        entropy_BxW = np.asarray(entropies_fn(tokens_BxW))
        for b, (d, start, first, last) in enumerate(batch):
            # position t is predicted at index t − 1 of the document, t − 1 − start of the window
            out[d][first - 1:last] = entropy_BxW[b, first - 1 - start:last - start]
    return {"doc_ids": np.asarray([r["doc_id"] for r in records], np.int64),
            "lengths": np.asarray([len(e) for e in out], np.int64),
            "entropy": np.concatenate(out) if out else np.zeros(0, np.float32)}


def _bound(directory: Path, identity: dict[str, Any]) -> str:
    """The fingerprint of `identity`, recorded in `directory` (created) or checked against what a
    previous pass recorded there: a folder scored for another identity is refused, not mixed."""
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    identity_file = directory / _IDENTITY
    if identity_file.exists():
        stored = json.loads(identity_file.read_text())
        if stored.get("fingerprint") != fingerprint:
            raise ScoringError(f"{directory} holds entropies scored for another proxy, corpus or setting "
                             f"({stored.get('identity')}); delete that folder or use another workdir.")
    else:
        identity_file.write_text(json.dumps({"fingerprint": fingerprint, "identity": identity}, indent=2,
                                            default=str))
    return fingerprint


def open_scored(directory: str | Path, identity: dict[str, Any]) -> EntropyTable | None:
    """The finished table in `directory` scored for `identity`, or None when no pass has finished
    there yet (raises if the folder belongs to another identity)."""
    directory = Path(directory)
    _bound(directory, identity)
    return EntropyTable(directory) if EntropyTable.complete(directory) else None


def score_split(source, indices: Iterable[int], tokenizer, config: ScoringConfig, directory: str | Path,
                identity: dict[str, Any], entropies_fn: Callable[[np.ndarray], np.ndarray],
                echo: Callable[[str], None] = lambda _: None) -> EntropyTable:
    """Scores the documents `source[i]` for `i` in `indices` (this process's shard) into
    `directory`, or continues an interrupted pass there; returns the finished table.

    `entropies_fn(tokens_BxW) -> entropy_BxW` is the proxy: entry `[b, i]` is the entropy of the
    next token after `tokens_BxW[b, :i + 1]`. `identity` says what is scored (corpus, split,
    tokenizer, proxy, window …): a folder scored for another identity is refused, not mixed."""
    directory = Path(directory)
    fingerprint = _bound(directory, identity)
    if EntropyTable.complete(directory):
        return EntropyTable(directory)

    indices = list(indices)
    chunks = [indices[lo:lo + config.chunk_documents] for lo in range(0, len(indices), config.chunk_documents)]
    started = reported = time.perf_counter()
    for c, chunk in enumerate(chunks):
        path = directory / f"chunk-{c:06d}.npz"
        if path.exists():
            continue
        getitems = getattr(source, "__getitems__", None)
        records = getitems(chunk) if getitems else [source[i] for i in chunk]
        _atomic_save(path, **_score_chunk(list(records), tokenizer, config, tokenizer.pad_id, entropies_fn))
        if time.perf_counter() - reported > 30 or c == len(chunks) - 1:
            reported = time.perf_counter()
            echo(f"rpt: scored {min((c + 1) * config.chunk_documents, len(indices)):,} of {len(indices):,} documents "
                 f"with the proxy ({reported - started:.0f} s)")

    parts = [np.load(directory / f"chunk-{c:06d}.npz") for c in range(len(chunks))]
    doc_ids = np.concatenate([p["doc_ids"] for p in parts]) if parts else np.zeros(0, np.int64)
    lengths = np.concatenate([p["lengths"] for p in parts]) if parts else np.zeros(0, np.int64)
    entropy = np.concatenate([p["entropy"] for p in parts]) if parts else np.zeros(0, np.float32)
    order = np.argsort(doc_ids, kind="stable")
    if len(np.unique(doc_ids)) != len(doc_ids):
        raise ScoringError(f"the split's records repeat a doc_id, so {directory} cannot key entropies by it; "
                         "rebuild the corpus.")
    starts_in_file = np.concatenate([[0], np.cumsum(lengths)])
    entropy_sorted = np.concatenate([entropy[starts_in_file[i]:starts_in_file[i + 1]] for i in order]) \
        if len(order) else entropy
    np.save(directory / "doc_ids.npy", doc_ids[order])
    np.save(directory / "starts.npy", np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64))
    np.save(directory / "entropy.npy", entropy_sorted.astype(np.float32))
    meta = {"fingerprint": fingerprint, "documents": int(len(doc_ids)), "positions": int(len(entropy)),
            "entropy_quantiles": {str(q): float(np.quantile(entropy, q)) if len(entropy) else None
                                  for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}
    partial = directory / (_META + ".partial")
    partial.write_text(json.dumps(meta, indent=2))
    os.replace(partial, directory / _META)  # written last: marks the table complete
    for c in range(len(chunks)):
        (directory / f"chunk-{c:06d}.npz").unlink()
    return EntropyTable(directory)
