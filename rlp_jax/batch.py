"""The two kinds of batch a train step takes: the contract between the data pipeline and the step.

Both are registered dataclasses (pytrees): jit, shard and checkpoint them like any other tree.
Rows are right-padded, which is what the model consumes: row b's real tokens sit in columns
`0 … n_b − 1` with positions `0 … n_b − 1`. `example_mask_B` is False only on the padding rows of a
short final batch; those rows train nothing and count in no metric.

The fields after `example_mask_B` say where each row came from (document, position); the data
pipeline fills them, the step never reads them, and hand-built batches may leave them None.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

Array = Any  # a jax.Array on device, a np.ndarray on the host


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """B prompt positions `(x_<t, x_t … x_{t+K−1})` of RLP (and of NTP on `[context, targets]`)."""

    context_BxT: Array  # int32: the ≤ T tokens before the position, right-padded with pad_id
    context_len_B: Array  # int32: real context tokens, ≥ 1 on real rows
    target_BxK: Array  # int32: the true next tokens, right-padded
    target_mask_BxK: Array  # bool: real target tokens (fewer near a document's end)
    example_mask_B: Array  # bool: False on padding rows
    position_B: Array | None = None  # t, the first target's token index in its document
    position_kind_B: Array | None = None  # kind id of the position (the corpus's kind names)
    doc_id_B: Array | None = None
    doc_len_B: Array | None = None  # the document's length in tokens (BOS/EOS included)

    @property
    def size(self) -> int:
        return self.context_BxT.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DocumentBatch:
    """B documents (or windows of long ones) for next-token prediction."""

    tokens_BxT: Array  # int32, right-padded with pad_id
    token_mask_BxT: Array  # bool: real tokens
    example_mask_B: Array  # bool: False on padding rows
    doc_id_B: Array | None = None
    window_B: Array | None = None  # which window of its document

    @property
    def size(self) -> int:
        return self.tokens_BxT.shape[0]


Batch = PromptBatch | DocumentBatch


def prompt_batch(context_BxT, context_len_B, target_BxK, target_mask_BxK=None,
                 example_mask_B=None) -> PromptBatch:
    """A PromptBatch from arrays (numpy or JAX); masks default to all True."""
    B, K = np.shape(target_BxK)
    return PromptBatch(
        context_BxT=context_BxT, context_len_B=context_len_B, target_BxK=target_BxK,
        target_mask_BxK=np.ones((B, K), bool) if target_mask_BxK is None else target_mask_BxK,
        example_mask_B=np.ones((B,), bool) if example_mask_B is None else example_mask_B)


def step_fields(batch: Batch) -> Batch:
    """The batch without its provenance fields (what a train step needs on device)."""
    names = {f.name for f in dataclasses.fields(batch)}
    keep = ("context_BxT", "context_len_B", "target_BxK", "target_mask_BxK", "tokens_BxT",
            "token_mask_BxT", "example_mask_B")
    return dataclasses.replace(batch, **{n: None for n in names - set(keep)})


def as_dict(batch: Batch) -> dict[str, Any]:
    """`{field: array}` of the batch's filled fields (None fields left out)."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
            if getattr(batch, f.name) is not None}
