"""grain pipelines from a built corpus to fixed-shape batches, sharded per process, resumable.

    documents of this process's shard ─ shuffled per epoch (seed + epoch) ─ repeated
      ─ tokenized (+BOS/EOS), marked character offsets mapped to token positions
      ─ prompts at the chosen positions (or windows of the document)
      ─ shuffled within a window ─ batched to fixed shapes with masks (`BatchIterator`)

Sharding: process `i` of `P` reads documents `i, i+P, i+2P, …` of the split and nothing else; the
shards are disjoint and together cover the split (with `even_shards`, the last `n mod P`
documents are left out so that every process has the same number, and counted). Each process
makes batches of the per-process batch size, so the global batch is that size × P.

Determinism: the batches are a function of (corpus, split, tokenizer, config, process index and
count); prompt positions depend only on (seed, epoch, doc_id). The iterator's `get_state()` /
`set_state()` resume the stream so that the next batch is the one an uninterrupted run would have
produced, and its counters continue where they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import grain
import numpy as np

from rlp_jax.data import batching
from rlp_jax.data.corpus import Corpus
from rlp_jax.data.positions import PositionConfig, position_rng, sample_positions
from rlp_jax.data.tokenizer import Tokenizer, tokenizer_fingerprint

__all__ = [
    "StreamConfig",
    "PromptBatchConfig",
    "DocumentBatchConfig",
    "prompt_batches",
    "document_batches",
    "shard_indices",
    "per_process_batch_size",
    "tokenized_documents",
]

_UNLIMITED_FAN_OUT = 1 << 30  # grain's flat map asks for a bound; the iterator path ignores it


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Settings shared by prompt and document batches.

    Attributes:
      batch_size: rows per batch on each process (the global batch is this × process count).
      seed: seeds the document shuffle, the window shuffle and the position choice.
      num_epochs: passes over the shard; None repeats forever (training).
      shuffle_documents: reshuffle the shard's documents every epoch.
      shuffle_window: shuffle rows within windows of this many (prompts of one document would
        otherwise sit side by side); 0 or 1 turns it off.
      pad_final_batch: at the end of a finite stream, pad the last partial batch (padding rows
        have `example_mask_B` False) instead of dropping it (the dropped rows are counted).
      even_shards: give every process the same number of documents by leaving out the last
        `n mod process_count` documents of the split (counted).
      add_bos: put BOS first in every document (None: when the tokenizer has one).
      add_eos: put EOS last in every document, so the end of a document is a target too.
      read_threads: threads that read and tokenize ahead (0 reads in the calling thread).
    """

    batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = None
    shuffle_documents: bool = True
    shuffle_window: int = 1024
    pad_final_batch: bool = False
    even_shards: bool = True
    add_bos: bool | None = None
    add_eos: bool = True
    read_threads: int = 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size is {self.batch_size}; use at least 1 row per process.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs is {self.num_epochs}; use None (forever) or >= 1.")
        if self.shuffle_window < 0 or self.read_threads < 0:
            raise ValueError("shuffle_window and read_threads must be >= 0.")


@dataclasses.dataclass(frozen=True)
class PromptBatchConfig(StreamConfig):
    """Prompt batches for RLP: see `StreamConfig`, and

    Attributes:
      max_context: T, the context is the last T tokens before the position (right-padded).
      target_len: K, the number of true next tokens scored after a thought (1 in the paper).
      positions: where prompts are placed (`PositionConfig`).
    """

    max_context: int = 2048
    target_len: int = 1
    positions: PositionConfig = PositionConfig()

    def __post_init__(self):
        super().__post_init__()
        if self.max_context < 1 or self.target_len < 1:
            raise ValueError(f"max_context ({self.max_context}) and target_len "
                             f"({self.target_len}) must both be >= 1.")
        if self.positions.min_context > self.max_context:
            raise ValueError(f"positions.min_context ({self.positions.min_context}) exceeds "
                             f"max_context ({self.max_context}); lower min_context.")


@dataclasses.dataclass(frozen=True)
class DocumentBatchConfig(StreamConfig):
    """Document batches for next-token training: see `StreamConfig`, and

    Attributes:
      seq_len: T, tokens per row (right-padded).
      long_documents: a document longer than T is cut to its first T tokens (`truncate`, the
        cut tokens are counted) or `split` into windows that overlap by one token, so that each
        token after the first is a next-token target exactly once.
      pack: concatenate the documents (each ends in EOS) and cut the stream into rows of
        exactly T tokens, as continued pretraining does (no padding; a row's `doc_id` is the
        document it starts in; `long_documents` does not apply).
    """

    seq_len: int = 2048
    long_documents: Literal["truncate", "split"] = "split"
    pack: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.seq_len < 2:
            raise ValueError(f"seq_len is {self.seq_len}; next-token rows need at least 2.")
        if self.long_documents not in ("truncate", "split"):
            raise ValueError(f"long_documents is {self.long_documents!r}; use 'truncate' or "
                             "'split'.")


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """The per-process batch size of a global batch; raises unless it divides evenly."""
    process_count = _process_layout(None, process_count)[1]
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                         "processes; use a multiple of the process count.")
    return global_batch_size // process_count


def shard_indices(num_documents: int, process_index: int, process_count: int, *,
                  even_shards: bool = True) -> range:
    """Indices of the split's documents that one process reads (before shuffling)."""
    stop = (num_documents // process_count) * process_count if even_shards else num_documents
    return range(process_index, stop, process_count)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the data layer itself does not need JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}); pass "
                         "the index of this process among process_count processes.")
    return process_index, process_count


class _PrepareDocument:
    """Record → tokens (+BOS/EOS) and marked token positions; knows its epoch from the index."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool, shard_size: int,
                 map_marked: bool = True):
        self._tokenizer = tokenizer
        self._map_marked = map_marked
        self._prefix = [tokenizer.bos_id] if add_bos else []
        self._suffix = [tokenizer.eos_id] if add_eos else []
        self._shard_size = shard_size

    def __call__(self, index: int, record: dict) -> dict:
        text = record["text"]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        offsets_M = np.asarray(record["marked_offsets"] if self._map_marked else (), np.int64)
        kinds_M = np.asarray(record["marked_kinds"] if self._map_marked else (), np.int32)
        shift = len(self._prefix)
        if len(offsets_M):
            ids, spans = self._tokenizer.encode_with_offsets(text)
            ends_N = np.fromiter((end for _, end in spans), np.int64, len(spans))
            order_M = np.argsort(offsets_M, kind="stable")
            # The token that holds the marked character: the first token ending after it.
            positions_M = np.searchsorted(ends_N, offsets_M[order_M], side="right")
            mapped_M = positions_M < len(ids)
            unique_positions, first = np.unique(positions_M[mapped_M], return_index=True)
            marked_positions_M = (unique_positions + shift).astype(np.int32)
            marked_kinds_M = kinds_M[order_M][mapped_M][first]
            unmapped = int((~mapped_M).sum())
        else:
            ids = self._tokenizer.encode(text)
            marked_positions_M = np.zeros(0, np.int32)
            marked_kinds_M = np.zeros(0, np.int32)
            unmapped = 0
        tokens_N = np.asarray(self._prefix + ids + self._suffix, np.int32)
        return {"tokens": tokens_N, "doc_id": int(record["doc_id"]),
                "epoch": index // self._shard_size, "marked_positions": marked_positions_M,
                "marked_kinds": marked_kinds_M, "marked_unmapped": unmapped}


def _kinds_at(positions_P: np.ndarray, marked_M: np.ndarray, kinds_M: np.ndarray) -> np.ndarray:
    """The kind of each position: its marked kind, or 0 (`unmarked`). `marked_M` is sorted."""
    kinds_P = np.zeros(len(positions_P), np.int32)
    if len(marked_M):
        slots_P = np.searchsorted(marked_M, positions_P)
        found_P = slots_P < len(marked_M)
        found_P[found_P] = marked_M[slots_P[found_P]] == positions_P[found_P]
        kinds_P[found_P] = kinds_M[slots_P[found_P]]
    return kinds_P


class _PromptsOfDocument(grain.experimental.FlatMapTransform):
    """Document → `(row, counts)` elements, one per chosen position (a lone counts-only element
    for a document that gives no prompt, so that it is still counted)."""

    max_fan_out = _UNLIMITED_FAN_OUT

    def __init__(self, positions: PositionConfig, seed: int, wanted_kinds: np.ndarray | None, keep_positions=None):
        self._positions = positions
        self._seed = seed
        self._wanted_kinds = wanted_kinds
        self._keep = keep_positions

    def flat_map(self, document: dict) -> list[tuple]:
        tokens_N = document["tokens"]
        marked_M, kinds_M = document["marked_positions"], document["marked_kinds"]
        candidates_M = None
        if self._positions.strategy == "marked":
            keep_M = (np.ones(len(marked_M), bool) if self._wanted_kinds is None
                      else np.isin(kinds_M, self._wanted_kinds))
            candidates_M = marked_M[keep_M]
        rng = (position_rng(self._seed, document["epoch"], document["doc_id"])
               if self._positions.draws_randomly else None)
        keep_K = None if self._keep is None else self._keep.positions(document["doc_id"], len(tokens_N))
        sample = sample_positions(self._positions, len(tokens_N), rng, candidates_M, keep_K)
        positions_P = sample.positions_P
        kinds_P = _kinds_at(positions_P, marked_M, kinds_M)
        counts = {"documents": 1, "documents_without_prompts": int(len(positions_P) == 0),
                  "positions_skipped_short_context": sample.skipped_short_context,
                  "positions_shortfall": sample.shortfall,
                  **({"positions_filtered_out": sample.filtered_out} if self._keep is not None else {}),
                  "marked_offsets_unmapped": document["marked_unmapped"]}
        if not len(positions_P):
            return [(None, counts)]
        return [({"tokens": tokens_N, "position": int(t), "kind": int(k),
                  "doc_id": document["doc_id"]}, counts if i == 0 else None)
                for i, (t, k) in enumerate(zip(positions_P, kinds_P))]


class _PackedIterator(grain.DatasetIterator):
    """Documents → `(row, counts)` elements, each row exactly `seq_len` tokens of the
    concatenated documents (the last row of a finite stream may be shorter). Rows overlap by one
    token, so every token after the first is a next-token target exactly once. Its state holds
    the parent's state and the tokens carried into the next row, so a resume continues exactly."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._carry: list[int] = []
        self._carry_doc = -1
        self._rows = 0

    def __next__(self):
        counts = {"documents": 0}
        while len(self._carry) < self._seq_len:
            try:
                document = next(self._parent)
            except StopIteration:
                if len(self._carry) <= 1:  # nothing left to predict
                    raise
                break
            if not self._carry:
                self._carry_doc = int(document["doc_id"])
            self._carry.extend(int(t) for t in document["tokens"])
            counts["documents"] += 1
        row_tokens = np.asarray(self._carry[:self._seq_len], np.int32)
        row = {"tokens": row_tokens, "doc_id": self._carry_doc, "window": self._rows}
        self._carry = self._carry[self._seq_len - 1:]  # the last token is the next row's first input
        self._rows += 1
        return row, counts

    def get_state(self):
        return {"parent": self._parent.get_state(), "carry": list(self._carry), "carry_doc": self._carry_doc,
                "rows": self._rows}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._carry, self._carry_doc, self._rows = list(state["carry"]), int(state["carry_doc"]), int(state["rows"])


class _PackedDocuments(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self._parent.__iter__(), self._seq_len)


class _WindowsOfDocument(grain.experimental.FlatMapTransform):
    """Document → `(row, counts)` elements, one per window of at most `seq_len` tokens."""

    max_fan_out = _UNLIMITED_FAN_OUT

    def __init__(self, seq_len: int, long_documents: str):
        self._seq_len = seq_len
        self._split = long_documents == "split"

    def flat_map(self, document: dict) -> list[tuple]:
        tokens_N, doc_id, seq_len = document["tokens"], document["doc_id"], self._seq_len
        counts = {"documents": 1, "documents_truncated": 0, "tokens_truncated": 0,
                  "documents_split": 0}
        if len(tokens_N) <= seq_len:
            starts = [0]
        elif self._split:
            # Windows overlap by one token: window j predicts tokens j(T−1)+1 … (j+1)(T−1).
            starts = list(range(0, len(tokens_N) - 1, seq_len - 1))
            counts["documents_split"] = 1
        else:
            starts = [0]
            counts["documents_truncated"] = 1
            counts["tokens_truncated"] = len(tokens_N) - seq_len
        return [({"tokens": tokens_N[s:s + seq_len], "doc_id": doc_id, "window": j},
                 counts if j == 0 else None) for j, s in enumerate(starts)]


def _fingerprint(kind: str, corpus: Corpus, split: str, tokenizer: Tokenizer,
                 config: StreamConfig, process_index: int, process_count: int, keep: str = "") -> str:
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.name != "read_threads"}  # threads change speed, not batches
    parts = (kind, corpus.name, corpus.fingerprint, split, corpus.num_documents(split),
             tokenizer_fingerprint(tokenizer), repr(sorted(settings.items())), process_index,
             process_count) + ((keep,) if keep else ())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _resolve_add_bos(tokenizer: Tokenizer, add_bos: bool | None) -> bool:
    if add_bos is None:
        return tokenizer.bos_id is not None
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("add_bos is set but the tokenizer has no BOS token; pass bos_token to "
                         "the tokenizer or set add_bos=False.")
    return add_bos


def _document_stream(corpus: Corpus, split: str, tokenizer: Tokenizer, config: StreamConfig,
                     process_index: int, process_count: int, map_marked: bool
                     ) -> tuple[grain.IterDataset, dict[str, int]]:
    """This process's documents, shuffled per epoch, repeated, tokenized; and shard counts."""
    source = corpus.source(split)
    num_documents = len(source)
    shard = shard_indices(num_documents, process_index, process_count,
                          even_shards=config.even_shards)
    if len(shard) == 0:
        raise ValueError(f"split {split!r} of {corpus.name} has {num_documents} documents, too "
                         f"few for {process_count} processes; use a larger corpus or fewer "
                         "processes.")
    add_bos = _resolve_add_bos(tokenizer, config.add_bos)
    documents = grain.MapDataset.source(source)[shard.start:shard.stop:shard.step]
    if config.shuffle_documents:
        documents = documents.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        documents = documents.repeat(config.num_epochs)
    documents = documents.map_with_index(
        _PrepareDocument(tokenizer, add_bos, config.add_eos, shard_size=len(shard),
                         map_marked=map_marked))
    stream = documents.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=64 if config.read_threads else 0))
    left_out = len(range(process_index, num_documents, process_count)) - len(shard)
    return stream, {"documents_left_out_for_even_shards": left_out}


def _shuffled(stream: grain.IterDataset, config: StreamConfig) -> grain.IterDataset:
    if config.shuffle_window <= 1:
        return stream
    return grain.experimental.WindowShuffleIterDataset(
        stream, window_size=config.shuffle_window, seed=config.seed)


def _wanted_kind_ids(corpus: Corpus, positions: PositionConfig) -> np.ndarray | None:
    if positions.marked_kinds is None:
        return None
    names = corpus.position_kind_names
    unknown = [k for k in positions.marked_kinds if k not in names]
    if unknown:
        raise ValueError(f"position kind {unknown[0]!r} is not one of {corpus.name}'s kinds "
                         f"{list(names)}; choose marked_kinds among them.")
    return np.asarray([names.index(k) for k in positions.marked_kinds], np.int32)


def prompt_batches(corpus: Corpus, split: str, tokenizer: Tokenizer,
                   config: PromptBatchConfig = PromptBatchConfig(), *,
                   process_index: int | None = None, process_count: int | None = None,
                   keep_positions=None) -> batching.BatchIterator:
    """An iterator of RLP `PromptBatch`es (fields: see `rlp_jax.data.batching`).

    Args:
      corpus: a built corpus (`open_corpus`, `build_local_corpus`, `build_demo_corpus`).
      split: which split to read (`train`, `validation`).
      tokenizer: any `Tokenizer`.
      config: batch, position and stream settings.
      process_index, process_count: this process and how many read the corpus together
        (default: `jax.process_index()`, `jax.process_count()`); pass them to simulate hosts.
      keep_positions: an optional filter with `positions(doc_id, num_tokens)` (sorted int32
        positions that may be chosen) and a `fingerprint`, e.g. RPT's hard positions
        (`hard_positions.EntropyTable.at_least`); the candidates it leaves out are counted in
        `stats["positions_filtered_out"]`.

    Returns:
      A `BatchIterator`: iterate for batches; `stats`, `get_state()`, `set_state()`.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    wanted_kinds = _wanted_kind_ids(corpus, config.positions)
    stream, initial_counts = _document_stream(corpus, split, tokenizer, config, process_index,
                                              process_count, map_marked=True)
    prompts = grain.experimental.FlatMapIterDataset(
        stream, _PromptsOfDocument(config.positions, config.seed, wanted_kinds, keep_positions))
    prompts = _shuffled(prompts, config)

    def collate(rows, batch_size):
        return batching.collate_prompts(rows, batch_size, max_context=config.max_context,
                                        target_len=config.target_len, pad_id=tokenizer.pad_id)

    iterator = iter(batching.BatchingDataset(
        prompts, batch_size=config.batch_size, collate=collate,
        pad_final_batch=config.pad_final_batch,
        fingerprint=_fingerprint("prompts", corpus, split, tokenizer, config, process_index,
                                 process_count, keep_positions.fingerprint if keep_positions else ""),
        batch_spec=batching.prompt_batch_spec(config.batch_size, config.max_context,
                                              config.target_len),
        position_kind_names=corpus.position_kind_names, initial_stats=initial_counts))
    return iterator


def document_batches(corpus: Corpus, split: str, tokenizer: Tokenizer,
                     config: DocumentBatchConfig = DocumentBatchConfig(), *,
                     process_index: int | None = None, process_count: int | None = None
                     ) -> batching.BatchIterator:
    """An iterator of next-token `DocumentBatch`es (`tokens_BxT`, `token_mask_BxT`, ...).

    Same arguments and guarantees as `prompt_batches`; each row is one document, or one window
    of a long one (`config.long_documents`), or (`config.pack`) `seq_len` tokens of the
    concatenated documents.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    stream, initial_counts = _document_stream(corpus, split, tokenizer, config, process_index,
                                              process_count, map_marked=False)
    if config.pack:
        windows = _PackedDocuments(stream, config.seq_len)
    else:
        windows = grain.experimental.FlatMapIterDataset(
            stream, _WindowsOfDocument(config.seq_len, config.long_documents))
    windows = _shuffled(windows, config)

    def collate(rows, batch_size):
        return batching.collate_documents(rows, batch_size, seq_len=config.seq_len,
                                          pad_id=tokenizer.pad_id)

    iterator = iter(batching.BatchingDataset(
        windows, batch_size=config.batch_size, collate=collate,
        pad_final_batch=config.pad_final_batch,
        fingerprint=_fingerprint("documents", corpus, split, tokenizer, config, process_index,
                                 process_count),
        batch_spec=batching.document_batch_spec(config.batch_size, config.seq_len),
        position_kind_names=corpus.position_kind_names, initial_stats=initial_counts))
    return iterator


def tokenized_documents(corpus: Corpus, split: str, tokenizer: Tokenizer, *, seq_len: int,
                        add_bos: bool | None = None, add_eos: bool = True
                        ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every document of a small split, tokenized into one right-padded array, in source order.

    For corpora that fit in memory many times over (the demo's 20,000 documents are 4 MB of
    tokens): a training loop can then draw rows on device with no per-step input pipeline. Larger
    corpora should stream through `document_batches`.

    Returns:
      `(arrays, counts)`: `tokens_NxT` int32 (padded with `pad_id`), `token_mask_NxT` bool,
      `doc_id_N` int32; counts of documents and of documents / tokens cut at `seq_len`.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len is {seq_len}; next-token rows need at least 2.")
    source = corpus.source(split)
    prefix = [tokenizer.bos_id] if _resolve_add_bos(tokenizer, add_bos) else []
    suffix = [tokenizer.eos_id] if add_eos else []
    getitems = getattr(source, "__getitems__", None)
    records = getitems(range(len(source))) if getitems else [source[i] for i in range(len(source))]
    tokens_NxT = np.full((len(records), seq_len), tokenizer.pad_id, np.int32)
    token_mask_NxT = np.zeros((len(records), seq_len), bool)
    doc_id_N = np.zeros(len(records), np.int32)
    counts = {"documents": len(records), "documents_truncated": 0, "tokens_truncated": 0}
    for n, record in enumerate(records):
        text = record["text"]
        ids = prefix + tokenizer.encode(text.decode("utf-8") if isinstance(text, bytes)
                                        else text) + suffix
        if len(ids) > seq_len:
            counts["documents_truncated"] += 1
            counts["tokens_truncated"] += len(ids) - seq_len
            ids = ids[:seq_len]
        tokens_NxT[n, :len(ids)] = ids
        token_mask_NxT[n, :len(ids)] = True
        doc_id_N[n] = record["doc_id"]
    return {"tokens_NxT": tokens_NxT, "token_mask_NxT": token_mask_NxT,
            "doc_id_N": doc_id_N}, counts
