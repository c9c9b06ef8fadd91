"""Fixed-shape batches and the checkpointable iterator that makes them.

The iterator yields the step's own batch types (`rlp_jax.batch`), numpy on the host, B = the
per-process batch size:

Prompt batches (`PromptBatch`, RLP): T = `max_context`, K = `target_len`
| field | shape, dtype | meaning |
|---|---|---|
| `context_BxT` | int32 | the last ≤ T tokens before the position, RIGHT-padded with `pad_id` |
| `context_len_B` | int32 | number of real context tokens |
| `target_BxK` | int32 | the true next tokens `x_t … x_{t+K−1}`, right-padded |
| `target_mask_BxK` | bool | True on real target tokens (fewer near a document's end) |
| `example_mask_B` | bool | False only on padding rows of a padded final batch |
| `position_B` | int32 | t, the token index of the first target token in its document |
| `position_kind_B` | int32 | kind id of the position (names: `iterator.position_kind_names`) |
| `doc_id_B` | int32 | the document's id |
| `doc_len_B` | int32 | the document's length in tokens (BOS/EOS included when added) |

Right padding is what the model consumes: row b's context is at positions `0 … n_b − 1` and the
sampler appends the open-thought token at position `n_b`.

Document batches (`DocumentBatch`, next-token warm-up, CPT baseline): T = `seq_len`
| field | shape, dtype | meaning |
|---|---|---|
| `tokens_BxT` | int32 | a document (or one window of a long one), right-padded |
| `token_mask_BxT` | bool | True on real tokens |
| `example_mask_B` | bool | False only on padding rows of a padded final batch |
| `doc_id_B`, `window_B` | int32 | the document and which of its windows |

The iterator counts what it consumes and skips; `iterator.stats` is part of its checkpoint state.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from rlp_jax.batch import Batch, DocumentBatch, PromptBatch

__all__ = ["prompt_batch_spec", "document_batch_spec", "collate_prompts", "collate_documents",
           "BatchIterator", "BatchingDataset"]

STATE_FORMAT = "rlp_jax.data.batches/1"

Row = Mapping[str, Any]
Element = tuple  # (row or None, stats or None): a row to batch and/or counts to add
Collate = Callable[[Sequence[Row], int], tuple[Batch, Mapping[str, int]]]
Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def prompt_batch_spec(batch_size: int, max_context: int, target_len: int) -> Spec:
    """Shape and dtype of every prompt-batch field."""
    b, t, k = batch_size, max_context, target_len
    i32, boolean = np.dtype(np.int32), np.dtype(bool)
    return {"context_BxT": ((b, t), i32), "context_len_B": ((b,), i32),
            "target_BxK": ((b, k), i32), "target_mask_BxK": ((b, k), boolean),
            "example_mask_B": ((b,), boolean), "position_B": ((b,), i32),
            "position_kind_B": ((b,), i32), "doc_id_B": ((b,), i32), "doc_len_B": ((b,), i32)}


def document_batch_spec(batch_size: int, seq_len: int) -> Spec:
    """Shape and dtype of every document-batch field."""
    i32, boolean = np.dtype(np.int32), np.dtype(bool)
    return {"tokens_BxT": ((batch_size, seq_len), i32),
            "token_mask_BxT": ((batch_size, seq_len), boolean),
            "example_mask_B": ((batch_size,), boolean),
            "doc_id_B": ((batch_size,), i32), "window_B": ((batch_size,), i32)}


def _empty(spec: Spec, pad_id: int) -> dict[str, np.ndarray]:
    return {name: (np.full(shape, pad_id, dtype) if name in ("context_BxT", "target_BxK",
                                                             "tokens_BxT")
                   else np.zeros(shape, dtype)) for name, (shape, dtype) in spec.items()}


def collate_prompts(rows: Sequence[Row], batch_size: int, *, max_context: int, target_len: int,
                    pad_id: int) -> tuple[PromptBatch, dict[str, int]]:
    """Packs prompt rows (`tokens`, `position`, `kind`, `doc_id`) into a `PromptBatch`.

    Rows beyond `len(rows)` up to `batch_size` are padding (`example_mask_B` False).

    Returns:
      `(batch, counts)`: counts of prompts, contexts cut to `max_context`, and targets shorter
      than `target_len` because the document ended.
    """
    arrays = _empty(prompt_batch_spec(batch_size, max_context, target_len), pad_id)
    truncated = short = 0
    for r, row in enumerate(rows):
        tokens_N, t = row["tokens"], int(row["position"])
        context_N = tokens_N[max(0, t - max_context):t]
        target_N = tokens_N[t:t + target_len]
        truncated += t > max_context
        short += len(target_N) < target_len
        arrays["context_BxT"][r, :len(context_N)] = context_N
        arrays["context_len_B"][r] = len(context_N)
        arrays["target_BxK"][r, :len(target_N)] = target_N
        arrays["target_mask_BxK"][r, :len(target_N)] = True
        arrays["example_mask_B"][r] = True
        arrays["position_B"][r] = t
        arrays["position_kind_B"][r] = row["kind"]
        arrays["doc_id_B"][r] = row["doc_id"]
        arrays["doc_len_B"][r] = len(tokens_N)
    return PromptBatch(**arrays), {"prompts": len(rows), "contexts_truncated": truncated,
                                   "targets_short": short}


def collate_documents(rows: Sequence[Row], batch_size: int, *, seq_len: int, pad_id: int
                      ) -> tuple[DocumentBatch, dict[str, int]]:
    """Packs document windows (`tokens`, `doc_id`, `window`) into a `DocumentBatch`."""
    arrays = _empty(document_batch_spec(batch_size, seq_len), pad_id)
    for r, row in enumerate(rows):
        tokens_N = row["tokens"]
        arrays["tokens_BxT"][r, :len(tokens_N)] = tokens_N
        arrays["token_mask_BxT"][r, :len(tokens_N)] = True
        arrays["doc_id_B"][r] = row["doc_id"]
        arrays["window_B"][r] = row["window"]
        arrays["example_mask_B"][r] = True
    return DocumentBatch(**arrays), {"windows": len(rows)}


class BatchIterator(grain.DatasetIterator):
    """Yields fixed-shape batches; its state (`get_state`) restores the exact next batch.

    It is a grain `DatasetIterator`, so grain's Orbax checkpoint handler
    (`grain.checkpoint.CheckpointSave(iterator)`) can save it; `get_state()` is also a plain
    JSON-serialisable dict for any other store.

    Attributes:
      stats: counts since the start of the stream (documents, prompts, positions skipped, ...);
        restored with the state, so they stay exact across a resume.
      batch_spec: `{field: (shape, dtype)}` of every batch.
      position_kind_names: names of the `position_kind_B` ids.
    """

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, collate: Collate,
                 pad_final_batch: bool, fingerprint: str,
                 batch_spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 position_kind_names: Sequence[str],
                 initial_stats: Mapping[str, int] | None = None):
        super().__init__(parent)
        self._batch_size = batch_size
        self._collate = collate
        self._pad_final_batch = pad_final_batch
        self._fingerprint = fingerprint
        self._stats: collections.Counter = collections.Counter(initial_stats or {})
        self.batch_spec = dict(batch_spec)
        self.position_kind_names = tuple(position_kind_names)

    @property
    def stats(self) -> dict[str, int]:
        return dict(sorted(self._stats.items()))

    def __next__(self) -> Batch:
        rows = []
        while len(rows) < self._batch_size:
            try:
                row, counts = next(self._parent)
            except StopIteration:
                break
            if counts:
                self._stats.update(counts)
            if row is not None:
                rows.append(row)
        if not rows:
            raise StopIteration
        if len(rows) < self._batch_size and not self._pad_final_batch:
            self._stats["rows_dropped_in_final_partial_batch"] += len(rows)
            raise StopIteration
        batch, counts = self._collate(rows, self._batch_size)
        self._stats.update(counts)
        self._stats["batches"] += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "fingerprint": self._fingerprint,
                "stats": {k: int(v) for k, v in self._stats.items()},
                "pipeline": self._parent.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"this is not an rlp_jax data-iterator state (format "
                             f"{state.get('format')!r}); restore a state saved by get_state().")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(
                "the saved data-iterator state belongs to a different pipeline (corpus, split, "
                "tokenizer, batch or position settings, seed or process layout changed); "
                "restore with the same data settings or start the data stream afresh.")
        self._parent.set_state(state["pipeline"])
        self._stats = collections.Counter(state["stats"])


class BatchingDataset(grain.IterDataset):
    """The last stage of a pipeline: `(row, counts)` elements in, `BatchIterator` out."""

    def __init__(self, parent: grain.IterDataset, **iterator_kwargs):
        super().__init__(parent)
        self._iterator_kwargs = iterator_kwargs

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), **self._iterator_kwargs)
