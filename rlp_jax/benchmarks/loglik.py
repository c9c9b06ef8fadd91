"""Multiple choice by log-likelihood: each option's summed log-probability as the continuation of
the prompt, from the project's teacher-forced forward (rlp_jax.models.transformer), batched.

A row is `context + continuation` tokens, each encoded on its own (the continuation keeps its
leading space, " B" or " Paris"), the context cut from the left if the row exceeds `max_len`. Rows are sorted by length and batched at a few padded shapes (lengths on the grid of
`bucket`), so a run compiles a handful of programs. Only the continuation positions go
through the LM head, so the memory is `[B, C, V]` logits, not `[B, T, V]`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax import sharding


@dataclasses.dataclass
class OptionScores:
    logprob_R: np.ndarray  # summed log-prob of each row's continuation
    num_tokens_R: np.ndarray  # continuation tokens
    greedy_R: np.ndarray  # every continuation token is the argmax (the option is the greedy text)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_batch(graphdef, params, tokens_BxT, starts_B, targets_BxC, mask_BxC):
    """Each row's summed log-prob of its continuation `targets_BxC[mask]` (from `starts_B`) and
    whether every continuation token is the argmax: the program `score_continuations` runs."""
    model = nnx.merge(graphdef, params)
    B, T = tokens_BxT.shape
    C = targets_BxC.shape[1]
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Right padding and causal attention: the pads after a row's tokens never reach them.
    hidden_BxTxD = model.hidden_states(tokens_BxT, positions_BxT)
    # The hidden state at position t predicts token t + 1.
    index_BxC = jnp.clip(starts_B[:, None] - 1 + jnp.arange(C), 0, T - 1)
    hidden_BxCxD = jnp.take_along_axis(hidden_BxTxD, index_BxC[:, :, None], axis=1)
    logp_BxCxV = jax.nn.log_softmax(model.logits(hidden_BxCxD).astype(jnp.float32), axis=-1)
    token_logp_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[:, :, None], axis=-1)[:, :, 0]
    is_argmax_BxC = jnp.argmax(logp_BxCxV, axis=-1) == targets_BxC
    return (jnp.where(mask_BxC, token_logp_BxC, 0.0).sum(-1), jnp.all(is_argmax_BxC | ~mask_BxC, axis=-1))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket(n: int, minimum: int) -> int:
    """The smallest length of the grid `minimum · {1, 1.5} · 2^k` that holds n: at most a third of
    a batch is padding, and lengths up to 8192 compile at most ~14 shapes."""
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def score_continuations(model, contexts: list[list[int]], continuations: list[list[int]], *, batch_size: int = 16,
                        max_len: int | None = None, length_multiple: int = 64, pad_id: int = 0,
                        mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES) -> OptionScores:
    """Summed log-probabilities of `continuations[r]` after `contexts[r]`, for every row r.

    With `mesh` (the model's params placed on it, e.g. `hf.load_hf(..., mesh=mesh)`), each batch
    is split over the mesh's batch axes.
    """
    if len(contexts) != len(continuations):
        raise ValueError("give one continuation per context.")
    if any(len(c) == 0 for c in continuations) or any(len(c) == 0 for c in contexts):
        raise ValueError("every context and continuation needs at least one token.")
    max_len = max_len or model.config.max_position_embeddings
    rows = _cut_rows(contexts, continuations, max_len)
    graphdef, params = nnx.split(model)
    R = len(rows)
    logprob, greedy = np.zeros(R, np.float64), np.zeros(R, bool)
    order = sorted(range(R), key=lambda r: -(len(rows[r][0]) + len(rows[r][1])))
    C = _continuation_width(rows)
    for start in range(0, R, batch_size):
        chosen = order[start:start + batch_size]
        T = _width([rows[r] for r in chosen], length_multiple, max_len)
        tokens = np.full((batch_size, T), pad_id, np.int32)
        targets = np.zeros((batch_size, C), np.int32)
        mask = np.zeros((batch_size, C), bool)
        starts = np.ones(batch_size, np.int32)
        for b, r in enumerate(chosen):
            context, continuation = rows[r]
            row = context + continuation
            tokens[b, :len(row)] = row
            starts[b] = len(context)
            targets[b, :len(continuation)] = continuation
            mask[b, :len(continuation)] = True
        arrays = (tokens, starts, targets, mask)
        if mesh is None:
            out = score_batch(graphdef, params, *map(jnp.asarray, arrays))
        else:
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                out = score_batch(graphdef, params, *(sharding.place_batch(a, mesh, rules) for a in arrays))
        batch_logprob, batch_greedy = to_host(out)
        logprob[chosen] = batch_logprob[:len(chosen)]
        greedy[chosen] = batch_greedy[:len(chosen)]
    return OptionScores(logprob, np.array([len(c) for _, c in rows]), greedy)


def _cut_rows(contexts, continuations, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) rows of at most `max_len` tokens: a continuation keeps its last
    `max_len − 1` tokens, a context its last tokens that still fit."""
    rows = []
    for context, continuation in zip(contexts, continuations):
        continuation = list(continuation)[-max_len + 1:]
        context = list(context)[-(max_len - len(continuation)):]
        rows.append((context, continuation))
    return rows


def _width(rows, length_multiple: int, max_len: int) -> int:
    """The padded length of a batch of rows."""
    return min(bucket(max(len(a) + len(b) for a, b in rows), length_multiple), _round_up(max_len, 8))


def widest_shape(contexts, continuations, max_len: int, length_multiple: int = 64) -> tuple[int, int]:
    """(T, C): the padded row and continuation widths of `score_continuations`' widest batch."""
    rows = _cut_rows(contexts, continuations, max_len)
    return _width(rows, length_multiple, max_len), _continuation_width(rows)


def _continuation_width(rows) -> int:
    return bucket(max(len(c) for _, c in rows), 8)  # one width for the call: fewer programs to compile


def lower_widest(graphdef, abstract_params, contexts, continuations, *, batch_size: int, max_len: int,
                 mesh: jax.sharding.Mesh, rules, length_multiple: int = 64) -> jax.stages.Lowered:
    """`score_batch` lowered over abstract inputs at the widest batch `score_continuations` makes of
    these rows on `mesh` (its largest program; the other batches are narrower)."""
    T, C = widest_shape(contexts, continuations, max_len, length_multiple)
    shapes = [((batch_size, T), jnp.int32), ((batch_size,), jnp.int32), ((batch_size, C), jnp.int32),
              ((batch_size, C), jnp.bool_)]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(shape, mesh, rules))
            for shape, dtype in shapes]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return score_batch.lower(graphdef, abstract_params, *args)


def to_host(tree):
    """Host copies of (global) arrays; arrays split over several processes (a multi-host training
    run's mesh) are gathered whole on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


@dataclasses.dataclass
class ChoiceResult:
    logprobs: list[np.ndarray]  # per item: each option's summed log-prob
    correct: np.ndarray  # argmax of the summed log-prob is the answer
    correct_norm: np.ndarray  # argmax of log-prob per byte of the option's text (length-normalised)


def choice_accuracy(logprobs: list[np.ndarray], option_bytes: list[np.ndarray], answers: np.ndarray) -> ChoiceResult:
    """Accuracy from per-option log-likelihoods: `correct` picks the option with the largest summed
    log-prob, `correct_norm` the largest log-prob per UTF-8 byte of the option (which does not
    favour short options). Ties go to the first option."""
    picked = np.array([int(np.argmax(lp)) for lp in logprobs])
    picked_norm = np.array([int(np.argmax(lp / np.maximum(nb, 1))) for lp, nb in zip(logprobs, option_bytes)])
    answers = np.asarray(answers)
    return ChoiceResult(logprobs, picked == answers, picked_norm == answers)


def score_items(model, tokenizer, items, *, style: str = "letters", shots: int = 0, batch_size: int = 16,
                max_len: int | None = None, mesh=None, rules=sharding.DEFAULT_RULES) -> ChoiceResult:
    """Log-likelihood multiple choice for `items` (rlp_jax.benchmarks.tasks.Item with choices):
    contexts from `prompts.choice_context`, options from `prompts.choice_continuations`."""
    contexts, continuations, owners, option_bytes = choice_rows(tokenizer, items, style, shots)
    scores = score_continuations(model, contexts, continuations, batch_size=batch_size, max_len=max_len,
                                 pad_id=tokenizer.pad_id, mesh=mesh, rules=rules)
    owners = np.array(owners)
    logprobs = [scores.logprob_R[owners == i] for i in range(len(items))]
    return choice_accuracy(logprobs, option_bytes, np.array([item.answer_index for item in items]))


def choice_rows(tokenizer, items, style: str = "letters", shots: int = 0):
    """(contexts, continuations, owning item, option bytes per item): one row per option of every
    item, contexts from `prompts.choice_context`, options from `prompts.choice_continuations`."""
    from rlp_jax.benchmarks import prompts

    contexts, continuations, owners, option_bytes = [], [], [], []
    for i, item in enumerate(items):
        context = tokenizer.encode_prompt(prompts.choice_context(item, style, shots))
        options = prompts.choice_continuations(item, style)
        option_bytes.append(np.array([len(o.encode("utf-8")) for o in options]))
        for option in options:
            contexts.append(context)
            continuations.append(tokenizer.encode(option))
            owners.append(i)
    return contexts, continuations, owners, option_bytes
