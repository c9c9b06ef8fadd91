"""Where in a document RLP asks the model to think: prompt-position strategies.

A prompt at position `t` of a tokenized document `x` is the context `x_<t` and the target
`x_t` (or `x_t … x_{t+K−1}`). Positions run over `1 … n−1`: position 0 has no context at all. A
strategy picks positions from these; those with fewer than `min_context` context tokens are
skipped and counted.

Strategies:
- `uniform`: `positions_per_document` positions drawn without replacement from the valid ones;
  a document with fewer valid positions gives all it has and the missing ones are counted
  (`shortfall`).
- `all`: every valid position (evaluation, per-position-type analysis).
- `stride`: every `stride`-th position, starting at `stride_offset` (a random phase per document
  and epoch when None).
- `marked`: the positions stored with the record (e.g. where the demo generator's answers start),
  optionally only those of some kinds, optionally subsampled to `positions_per_document`.

A `keep` array (RPT's hard positions, rlp_jax.data.hard_positions) restricts any strategy to
those positions before it chooses; the candidates it removed are counted (`filtered_out`).

Every random choice comes from `position_rng(seed, epoch, doc_id)`: the same document in the same
epoch gets the same positions whatever process, step or shard layout reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

__all__ = ["STRATEGIES", "PositionConfig", "PositionSample", "position_rng", "sample_positions"]

Strategy = Literal["uniform", "all", "stride", "marked"]
STRATEGIES: tuple[str, ...] = ("uniform", "all", "stride", "marked")


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """How prompt positions are chosen in each document (see the module docstring).

    Attributes:
      strategy: `uniform`, `all`, `stride` or `marked`.
      positions_per_document: k for `uniform` (required); for `marked`, None keeps every marked
        position and an int subsamples that many.
      stride: spacing of `stride` positions.
      stride_offset: first `stride` position; None draws a phase in `[0, stride)` per document and
        epoch so that repeated epochs cover every position.
      min_context: positions with fewer context tokens are skipped (and counted).
      marked_kinds: for `marked`, the position-kind names to keep (None keeps all kinds).
    """

    strategy: Strategy = "uniform"
    positions_per_document: int | None = 1
    stride: int = 64
    stride_offset: int | None = None
    min_context: int = 1
    marked_kinds: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown position strategy {self.strategy!r}; use one of "
                             f"{', '.join(STRATEGIES)}.")
        if self.strategy == "uniform" and (self.positions_per_document is None
                                           or self.positions_per_document < 1):
            raise ValueError("the uniform strategy needs positions_per_document >= 1; set how "
                             "many positions to draw from each document.")
        if self.positions_per_document is not None and self.positions_per_document < 1:
            raise ValueError(f"positions_per_document is {self.positions_per_document}; use None "
                             "(all marked positions) or a count >= 1.")
        if self.stride < 1:
            raise ValueError(f"stride is {self.stride}; use a stride >= 1.")
        if self.stride_offset is not None and self.stride_offset < 0:
            raise ValueError(f"stride_offset is {self.stride_offset}; use None or an offset >= 0.")
        if self.min_context < 1:
            raise ValueError(f"min_context is {self.min_context}; a prompt needs at least one "
                             "context token, so use min_context >= 1.")
        if self.marked_kinds is not None and self.strategy != "marked":
            raise ValueError("marked_kinds only applies to strategy='marked'; drop it or switch "
                             "the strategy.")
        if isinstance(self.marked_kinds, str):
            raise ValueError(f"marked_kinds must be a tuple of kind names, got the string "
                             f"{self.marked_kinds!r}; write ({self.marked_kinds!r},).")

    @property
    def draws_randomly(self) -> bool:
        """Whether positions depend on the random stream (else `rng` may be None)."""
        return (self.strategy == "uniform"
                or (self.strategy == "stride" and self.stride_offset is None)
                or (self.strategy == "marked" and self.positions_per_document is not None))


@dataclasses.dataclass(frozen=True)
class PositionSample:
    """The positions chosen in one document and what was left out.

    Attributes:
      positions_P: int32, sorted ascending, unique, each in `[min_context, num_tokens)`.
      skipped_short_context: candidate positions (all / stride / marked) dropped because they had
        fewer than `min_context` context tokens.
      shortfall: positions a strategy asked for but the document could not give (uniform and
        subsampled marked: `k − len(positions_P)` when fewer were available).
      filtered_out: candidate positions removed because `keep_K` left them out.
    """

    positions_P: np.ndarray
    skipped_short_context: int
    shortfall: int
    filtered_out: int = 0


def position_rng(seed: int, epoch: int, doc_id: int) -> np.random.Generator:
    """The random stream of one document in one epoch (independent of process and step)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(doc_id)])


def _subsample(candidates_N: np.ndarray, k: int | None, rng: np.random.Generator
               ) -> tuple[np.ndarray, int]:
    if k is None or k >= len(candidates_N):
        return candidates_N, (0 if k is None else k - len(candidates_N))
    chosen_K = rng.choice(len(candidates_N), size=k, replace=False)
    return candidates_N[np.sort(chosen_K)], 0


def sample_positions(config: PositionConfig, num_tokens: int, rng: np.random.Generator | None,
                     marked_positions_M: np.ndarray | None = None, keep_K: np.ndarray | None = None
                     ) -> PositionSample:
    """Chooses prompt positions in a document of `num_tokens` tokens.

    Args:
      config: the strategy and its parameters.
      num_tokens: document length in tokens (BOS/EOS included if the pipeline adds them).
      rng: the document's stream, from `position_rng` (None when `config.draws_randomly` is
        False).
      marked_positions_M: token positions stored with the record, already filtered to the wanted
        kinds (`marked` only); need not be sorted or unique.
      keep_K: if given, only these positions may be chosen; the strategy's candidates outside it
        are counted in `filtered_out`.

    Returns:
      A `PositionSample`; positions are int32, sorted and unique.
    """
    lo = config.min_context
    if config.strategy == "uniform":
        valid_N, filtered_out = _kept(np.arange(lo, num_tokens, dtype=np.int32), keep_K)
        chosen, shortfall = _subsample(valid_N, config.positions_per_document, rng)
        return PositionSample(chosen.astype(np.int32), 0, shortfall, filtered_out)

    if config.strategy == "all":
        candidates_N = np.arange(1, num_tokens, dtype=np.int32)
    elif config.strategy == "stride":
        offset = (int(rng.integers(config.stride)) if config.stride_offset is None
                  else config.stride_offset)
        candidates_N = np.arange(offset, num_tokens, config.stride, dtype=np.int32)
        candidates_N = candidates_N[candidates_N >= 1]
    else:
        if marked_positions_M is None:
            raise ValueError("strategy 'marked' needs the record's marked positions; use a corpus "
                             "whose records store them (e.g. rlp_demo) or another strategy.")
        marked_M = np.unique(np.asarray(marked_positions_M, dtype=np.int32))
        if len(marked_M) and (marked_M[0] < 0 or marked_M[-1] >= num_tokens):
            raise ValueError(f"marked positions {marked_M.tolist()} fall outside the document's "
                             f"0..{num_tokens - 1} token positions; rebuild the corpus so its "
                             "marked offsets lie inside the text.")
        candidates_N = marked_M

    keep_N = candidates_N >= lo
    skipped = int((~keep_N).sum())
    candidates_N, filtered_out = _kept(candidates_N[keep_N], keep_K)
    shortfall = 0
    if config.strategy == "marked":
        candidates_N, shortfall = _subsample(candidates_N, config.positions_per_document, rng)
    return PositionSample(candidates_N.astype(np.int32), skipped, shortfall, filtered_out)


def _kept(candidates_N: np.ndarray, keep_K: np.ndarray | None) -> tuple[np.ndarray, int]:
    if keep_K is None:
        return candidates_N, 0
    kept_N = candidates_N[np.isin(candidates_N, keep_K)]
    return kept_N, len(candidates_N) - len(kept_N)
