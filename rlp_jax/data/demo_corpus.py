"""The bundled demo corpus `rlp_demo`: seeded arithmetic documents where a thought pays off.

Two tasks. `addition` (the demo's): each document states one addition of two 3-digit numbers
whose sum has 3 digits, then its answer:

    plain:        457+386=843
    worked:       457+386=<think>76013 58114 43108</think>843
    word problem: mia has 457 shells and finds 386 more. how many shells now? 843

The worked thought goes column by column from the units: both digits, the carry in, and the
two-digit column sum (`7+6+0 = 13` is written `76013`), 17 characters in all. A small model cannot
add in one step at the answer, but it can follow the columns, so a thought before the answer
raises the likelihood of the answer digits: what RLP rewards.

Every document carries marked positions (character offsets) with kinds, so the `marked` position
strategy can place prompts exactly at answers and evaluation can report results per kind:
`answer_start` (first answer digit, where the demo prompts), `answer_rest`, `operand` (digits of
the two numbers), `thought` (inside a worked thought, markers included); all other positions are
`unmarked`.

`carry` (built to need a thought): 6-digit additions whose leading answer digit hangs on a
long carry chain, e.g. `471596+215403=687000`. Below the leading column, a run of columns that
sum to exactly 9 (a chain of 0 to 4 columns, uniformly) passes on whatever carry arrives from the
column under it, which generates a carry or not with equal odds; the columns further down are
uniform. Read at the answer, the leading digit depends on the whole chain: a model that only adds
the leading column guesses the carry and is right half the time. The worked thought is the same
column-by-column sum (35 characters for 6 columns), whose last column holds the leading digit.

A carry chain turned out not to need a thought: finding the first column under the chain that does
not sum to 9 is one attention step, and compute-matched next-token training learns the leading digit
directly (docs/ablations.md). `cups` is a state-tracking task outside that shortcut: a ball starts
under cup 1 of 3 and `num_digits` swaps (10) move it, each `l` (swap cups 1 and 2), `r` (cups 2 and
3) or `o` (the outer cups, 1 and 3), uniformly; the answer is the cup the ball ends under:

    plain:   lrolrrolol=3
    worked:  lrolrrolol=<think>2312322133</think>3

The worked thought is the ball's cup after each move, so each of its characters follows from the
one before and the move at a fixed distance back: a table of 9 entries. Without a thought, the
answer depends on every move at once: changing any one move changes it (every cup is swapped by two
of the three moves and left alone by one), and the same moves in another order end elsewhere (the
moves do not commute). Drawn uniformly, though, how often each move occurs would still say
something (ten `l`s always end under cup 1; the best guess from the counts is right 35.0% of the
time), so problems are drawn from a pool in which it says nothing (`cups_problem_pool`): for every
count vector (how many `l`, `r`, `o`) and every cup, a seeded uniform choice of as many strings as
the count vector's rarest cup has. Each count vector ends under each cup equally often in the pool,
so the best guess from the counts is right exactly 1/3 of the time (tests/test_data_demo.py
enumerates the pool); count vectors that never end under some cup are left out. The pool lists all
3^`num_digits` strings, so `cups` takes 3 to 12 swaps.

Train and validation documents are disjoint: for `addition` a seeded 10% of all pairs is held out;
for `carry` (too many problems to enumerate) validation problems are drawn from their own stream
and any that occurs in train is redrawn; for `cups`, train is a seeded uniform choice from the pool
and validation one from the rest of it. Variants (TFDS configs): `plain` and `worked` (90%
of documents carry a worked thought, for warm-starting a tiny model), `mixed_plain` and
`mixed_worked` (half the documents are word problems), `carry_plain`, `carry_worked`, `cups_plain`
and `cups_worked`. Default size: 20,000 train and 2,000 validation documents (about 1.5 s to
build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from rlp_jax.data import corpus as corpus_lib
from rlp_jax.data.tokenizer import DEMO_ALPHABET, THINK_CLOSE, THINK_OPEN, demo_tokenizer

__all__ = [
    "DEMO_ALPHABET",
    "DEMO_POSITION_KINDS",
    "DEMO_VARIANTS",
    "DemoCorpusSpec",
    "demo_tokenizer",
    "addition_pair_split",
    "carry_chain_pairs",
    "column_thought",
    "cups_problem_pool",
    "cups_thought",
    "render_cups",
    "render_problem",
    "generate_demo_documents",
    "RlpDemo",
    "build_demo_corpus",
]

DEMO_POSITION_KINDS = ("unmarked", "answer_start", "answer_rest", "operand", "thought")
_KIND = {name: i for i, name in enumerate(DEMO_POSITION_KINDS)}
# Bump when the generated text changes, so that stale built corpora are detected.
# 2: cups problems come from `cups_problem_pool` (their swap counts say nothing of the answer).
GENERATOR_VERSION = 2

# The swaps of the cups task: the two cups each one exchanges.
CUP_SWAPS = {"l": (1, 2), "r": (2, 3), "o": (1, 3)}
# The pool of cups problems lists every swap string: 3**12 = 531,441 at most. With 2 swaps no count
# vector ends under all three cups, so the pool would be empty.
MIN_CUPS_SWAPS, MAX_CUPS_SWAPS = 3, 12

_NAMES = ("ana", "ben", "mia", "leo", "eva", "sam", "zoe", "max", "ivy", "tom")
_THINGS = ("apples", "coins", "shells", "stamps", "beads", "cards", "pebbles", "books")
_WORD_TEMPLATES = (
    "{name} has {a} {things} and finds {b} more. how many {things} now? ",
    "a box holds {a} {things}. {name} adds {b}. how many {things} are in the box? ",
    "{name} saw {a} {things} on monday and {b} on tuesday. how many {things} in all? ",
)


@dataclasses.dataclass(frozen=True)
class DemoCorpusSpec:
    """What the demo generator writes.

    Attributes:
      num_train, num_validation: documents per split.
      worked_fraction: share of documents whose answer follows a worked thought.
      word_problem_fraction: share of documents written as word problems.
      held_out_fraction: share of number pairs reserved for validation (`addition` only).
      seed: the generator's seed; the same spec gives the same corpus, byte for byte.
      task: `addition` (3-digit, all pairs), `carry` (long carry chains) or `cups` (a ball under
        swapped cups); see the module doc.
      num_digits: digits of both numbers and of their sum; for `cups`, the number of swaps.
    """

    num_train: int = 20_000
    num_validation: int = 2_000
    worked_fraction: float = 0.0
    word_problem_fraction: float = 0.0
    held_out_fraction: float = 0.1
    seed: int = 0
    task: str = "addition"
    num_digits: int = 3

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task is {self.task!r}; use one of {', '.join(TASKS)}.")
        if self.task == "addition" and self.num_digits != 3:
            raise ValueError("the addition task enumerates 3-digit pairs; use task='carry' for "
                             "longer numbers.")
        if self.task == "cups" and not MIN_CUPS_SWAPS <= self.num_digits <= MAX_CUPS_SWAPS:
            raise ValueError(f"num_digits (the swaps) is {self.num_digits}; use {MIN_CUPS_SWAPS} "
                             f"to {MAX_CUPS_SWAPS}.")
        if self.task == "carry" and not 2 <= self.num_digits <= 9:
            raise ValueError(f"num_digits is {self.num_digits}; use 2 to 9.")
        if self.task != "addition" and self.word_problem_fraction:
            raise ValueError(f"the {self.task} task has no word problems; set word_problem_fraction=0.")
        for field in ("worked_fraction", "word_problem_fraction"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"{field} is {getattr(self, field)}; use a share in [0, 1].")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction is {self.held_out_fraction}; use a share in "
                             "(0, 1).")
        if self.num_train < 1 or self.num_validation < 1:
            raise ValueError("num_train and num_validation must be >= 1.")

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((GENERATOR_VERSION, dataclasses.astuple(self))).encode()
                              ).hexdigest()[:16]


TASKS = ("addition", "carry", "cups")

DEMO_VARIANTS: dict[str, DemoCorpusSpec] = {
    "plain": DemoCorpusSpec(),
    "worked": DemoCorpusSpec(worked_fraction=0.9),
    "mixed_plain": DemoCorpusSpec(word_problem_fraction=0.5),
    "mixed_worked": DemoCorpusSpec(worked_fraction=0.9, word_problem_fraction=0.5),
    "carry_plain": DemoCorpusSpec(task="carry", num_digits=6),
    "carry_worked": DemoCorpusSpec(task="carry", num_digits=6, worked_fraction=0.9),
    "cups_plain": DemoCorpusSpec(task="cups", num_digits=10),
    "cups_worked": DemoCorpusSpec(task="cups", num_digits=10, worked_fraction=0.9),
}


def addition_pair_split(seed: int, held_out_fraction: float = 0.1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs `(a, b)` of numbers >= 100 with `a + b <= 999`, split into train and held out.

    Returns:
      `(train_pairs_Nx2, held_out_pairs_Mx2)`, int32, disjoint, together every pair once.
    """
    a_N, b_N = np.meshgrid(np.arange(100, 1000), np.arange(100, 1000), indexing="ij")
    keep_N = (a_N + b_N) <= 999
    pairs_Px2 = np.stack([a_N[keep_N], b_N[keep_N]], axis=1).astype(np.int32)
    order_P = np.random.default_rng([seed, 0]).permutation(len(pairs_Px2))
    num_held_out = int(round(held_out_fraction * len(pairs_Px2)))
    return pairs_Px2[order_P[num_held_out:]], pairs_Px2[order_P[:num_held_out]]


def carry_chain_pairs(rng: np.random.Generator, count: int, num_digits: int
                      ) -> np.ndarray:
    """`count` pairs of `num_digits`-digit numbers with an `num_digits`-digit sum whose leading
    digit hangs on a carry chain (module docstring).

    Per pair: a chain length `c` uniform in `0 … num_digits−2`; the `c` columns under the leading
    one sum to 9; the column under the chain sums to 10–18 or to 0–8 with equal odds; lower columns are uniform digits; the leading column's digits are ≥ 1 and, with
    the carry they receive, sum to at most 9.

    Returns:
      pairs_Nx2, int64.
    """
    n = num_digits
    pairs = np.empty((count, 2), np.int64)
    for i in range(count):
        chain = int(rng.integers(n - 1))
        x, y = rng.integers(10, size=n), rng.integers(10, size=n)  # index 0: units
        for col in range(n - 1 - chain, n - 1):  # the chain: column sums of exactly 9
            x[col] = rng.integers(10)
            y[col] = 9 - x[col]
        below = n - 2 - chain  # the column that decides the carry
        total = int(rng.integers(10, 19)) if rng.random() < 0.5 else int(rng.integers(0, 9))
        x[below] = rng.integers(max(0, total - 9), min(9, total) + 1)
        y[below] = total - x[below]
        carry = int(sum(int(v) * 10**k for k, v in enumerate(x[:n - 1]))
                    + sum(int(v) * 10**k for k, v in enumerate(y[:n - 1])) >= 10**(n - 1))
        x[n - 1] = rng.integers(1, 9 - carry)  # leading digits ≥ 1, sum with carry ≤ 9
        y[n - 1] = rng.integers(1, 10 - carry - x[n - 1])
        pairs[i] = [sum(int(v) * 10**k for k, v in enumerate(digits)) for digits in (x, y)]
    return pairs


def column_thought(a: int, b: int, num_digits: int = 3) -> str:
    """The worked addition, units column first: per column `x y carry_in sum(2 digits)`."""
    columns = []
    carry = 0
    for place in range(num_digits):
        x, y = (a // 10**place) % 10, (b // 10**place) % 10
        total = x + y + carry
        columns.append(f"{x}{y}{carry}{total:02d}")
        carry = total // 10
    return " ".join(columns)


def cups_thought(moves: str) -> str:
    """The ball's cup after each swap, from cup 1: `lro` is `231`."""
    cup, cups = 1, []
    for move in moves:
        x, y = CUP_SWAPS[move]
        cup = y if cup == x else x if cup == y else cup
        cups.append(str(cup))
    return "".join(cups)


def render_cups(moves: str, *, worked: bool) -> tuple[str, list[int], list[int]]:
    """One `cups` document (`lrolrrolol=3`, or with the worked thought) and its marked positions,
    as `render_problem`."""
    if not moves or set(moves) - set(CUP_SWAPS):
        raise ValueError(f"{moves!r} is not a string of swaps; use the letters {''.join(CUP_SWAPS)}.")
    n = len(moves)
    kinds = [_KIND["operand"]] * n
    text = moves + "="
    if worked:
        thought = f"{THINK_OPEN}{cups_thought(moves)}{THINK_CLOSE}"
        kinds += [_KIND["thought"]] * len(thought)
        text += thought
    offsets = list(range(n)) + list(range(n + 1, len(text))) + [len(text)]
    return text + cups_thought(moves)[-1], offsets, kinds + [_KIND["answer_start"]]


def plain_document_chars(spec: DemoCorpusSpec) -> int:
    """Characters of one plain document of `spec`'s task: `457+386=843` is 11."""
    return spec.num_digits + 2 if spec.task == "cups" else 3 * spec.num_digits + 2


def render_problem(a: int, b: int, *, worked: bool, template: str | None = None,
                   num_digits: int = 3) -> tuple[str, list[int], list[int]]:
    """One document and its marked positions.

    Args:
      a, b: the numbers (each and their sum must have `num_digits` digits).
      worked: put a worked thought between the question and the answer.
      template: a word-problem template from `_WORD_TEMPLATES` (None: the bare `a+b=` form),
        already filled with names; `{a}` and `{b}` are left to this function.

    Returns:
      `(text, marked_offsets, marked_kinds)`: character offsets in `text` and their kind ids.
    """
    n = num_digits
    answer = a + b
    if not (10**(n - 1) <= min(a, b) and answer < 10**n):
        raise ValueError(f"{a}+{b}={answer} is not a {n}-digit sum of {n}-digit numbers; use the "
                         "pairs from addition_pair_split or carry_chain_pairs.")
    offsets: list[int] = []
    kinds: list[int] = []

    def mark(start: int, length: int, kind: str):
        offsets.extend(range(start, start + length))
        kinds.extend([_KIND[kind]] * length)

    if template is None:
        question = f"{a}+{b}="
        mark(0, n, "operand")
        mark(n + 1, n, "operand")
    else:
        head, rest = template.split("{a}")
        middle, tail = rest.split("{b}")
        question = f"{head}{a}{middle}{b}{tail}"
        mark(len(head), n, "operand")
        mark(len(head) + n + len(middle), n, "operand")
    text = question
    if worked:
        thought = f"{THINK_OPEN}{column_thought(a, b, n)}{THINK_CLOSE}"
        mark(len(text), len(thought), "thought")
        text += thought
    mark(len(text), 1, "answer_start")
    mark(len(text) + 1, n - 1, "answer_rest")
    return text + str(answer), offsets, kinds


def _fill_names(template: str, rng: np.random.Generator) -> str:
    return (template.replace("{name}", _NAMES[rng.integers(len(_NAMES))])
            .replace("{things}", _THINGS[rng.integers(len(_THINGS))]))


def generate_demo_documents(spec: DemoCorpusSpec, split: str) -> Iterator[dict]:
    """The records of one split, in order: `text`, `doc_id`, `origin`, `marked_offsets`,
    `marked_kinds`. A pure function of `(spec, split)`.

    Doc ids run `0 … num_train−1` for train and continue from `num_train` for validation.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"the demo corpus has splits 'train' and 'validation', not {split!r}.")
    count, first_id, split_code = ((spec.num_train, 0, 1) if split == "train"
                                   else (spec.num_validation, spec.num_train, 2))
    rng = np.random.default_rng([spec.seed, split_code])
    if spec.task in ("carry", "cups"):
        pairs, chosen = _drawn_split(spec, split), np.arange(count)
    else:
        train_pairs, held_out_pairs = addition_pair_split(spec.seed, spec.held_out_fraction)
        pairs = train_pairs if split == "train" else held_out_pairs
        if count > len(pairs):
            raise ValueError(f"{count} {split} documents asked for but only {len(pairs)} distinct "
                             f"{split} number pairs exist; ask for fewer documents.")
        chosen = rng.choice(len(pairs), size=count, replace=False)
    worked_N = rng.random(count) < spec.worked_fraction
    word_N = rng.random(count) < spec.word_problem_fraction
    template_N = rng.integers(len(_WORD_TEMPLATES), size=count)
    for i in range(count):
        if spec.task == "cups":
            text, offsets, kinds = render_cups(pairs[chosen[i]], worked=bool(worked_N[i]))
        else:
            a, b = (int(v) for v in pairs[chosen[i]])
            template = (_fill_names(_WORD_TEMPLATES[template_N[i]], rng) if word_N[i] else None)
            text, offsets, kinds = render_problem(a, b, worked=bool(worked_N[i]), template=template,
                                                  num_digits=spec.num_digits)
        yield {"text": text, "doc_id": first_id + i, "origin": f"rlp_demo/{split}/{i}",
               "marked_offsets": np.asarray(offsets, np.int32),
               "marked_kinds": np.asarray(kinds, np.int32)}


def all_swap_strings(num_moves: int) -> np.ndarray:
    """Every string of `num_moves` swaps, in lexicographic order of `CUP_SWAPS` (`lll…`, `llr…`),
    as indices into it: moves_PxM, int8, P = 3**num_moves."""
    return np.indices((len(CUP_SWAPS),) * num_moves, np.int8).reshape(num_moves, -1).T


def swap_counts(moves_PxM: np.ndarray) -> np.ndarray:
    """How often each swap occurs in each string: counts_Px3 (`l`, `r`, `o`)."""
    return np.stack([(moves_PxM == k).sum(axis=1) for k in range(len(CUP_SWAPS))], axis=1)


def final_cups(moves_PxM: np.ndarray) -> np.ndarray:
    """The cup (1 to 3) the ball ends under after each string of swaps, from cup 1: cups_P."""
    next_cup_3x4 = np.array([[0] + [y if c == x else x if c == y else c for c in (1, 2, 3)]
                             for x, y in CUP_SWAPS.values()])  # [swap, cup] -> cup
    cup_P = np.ones(len(moves_PxM), np.int64)
    for moves_P in moves_PxM.T:
        cup_P = next_cup_3x4[moves_P, cup_P]
    return cup_P


def cups_problem_pool(num_moves: int, seed: int) -> list[str]:
    """The swap strings the `cups` task draws from, in lexicographic order: for every count vector
    (how many `l`, `r`, `o`) and every cup, a uniform choice (seeded) of as many strings ending
    under that cup as the count vector's rarest cup has (none if some cup is never reached, as for
    `lll…`). Every count vector ends under each cup equally often in the pool, so a problem drawn
    from it uniformly has an answer independent of its counts."""
    moves_PxM = all_swap_strings(num_moves)
    width = num_moves + 1
    counts_Px3 = swap_counts(moves_PxM)
    vector_P = counts_Px3[:, 0] * width + counts_Px3[:, 1]  # the count vector, as one number
    group_P = vector_P * 3 + final_cups(moves_PxM) - 1  # (count vector, cup)
    strings_per_group = np.bincount(group_P, minlength=3 * width**2)
    keep_per_group = np.repeat(strings_per_group.reshape(-1, 3).min(axis=1), 3)
    rng = np.random.default_rng([seed, 0, 7])
    order_P = np.lexsort((rng.random(len(group_P)), group_P))  # by group, shuffled within
    group_start = np.concatenate([[0], np.cumsum(strings_per_group)[:-1]])
    rank_in_group_P = np.empty(len(group_P), np.int64)
    rank_in_group_P[order_P] = np.arange(len(group_P)) - group_start[group_P[order_P]]
    kept_P = rank_in_group_P < keep_per_group[group_P]
    letters = np.array(list(CUP_SWAPS))
    return ["".join(row) for row in letters[moves_PxM[kept_P]]]


def _drawn_cups(spec: DemoCorpusSpec, split: str) -> list[str]:
    """The swap strings of one split: train a seeded uniform choice from the pool, validation one
    from the pool less train; distinct."""
    pool = cups_problem_pool(spec.num_digits, spec.seed)
    if len(pool) < 2 * (spec.num_train + spec.num_validation):
        raise ValueError(f"{spec.num_digits} swaps give a pool of only {len(pool)} distinct "
                         "problems, fewer than twice the documents asked for; ask for fewer "
                         "documents or more swaps.")
    train_P = np.random.default_rng([spec.seed, 1, 7]).choice(len(pool), spec.num_train,
                                                              replace=False)
    if split == "train":
        return [pool[i] for i in train_P]
    rest_P = np.setdiff1d(np.arange(len(pool)), train_P)
    validation_P = np.random.default_rng([spec.seed, 2, 7]).choice(rest_P, spec.num_validation,
                                                                   replace=False)
    return [pool[i] for i in validation_P]


def _drawn_split(spec: DemoCorpusSpec, split: str) -> list:
    """The drawn problems of one split (`carry`: number pairs, `cups`: swap strings): distinct
    within the split, and validation problems never in train (`carry`: drawn again until they
    are not)."""
    if spec.task == "cups":
        return _drawn_cups(spec, split)

    def distinct(stream: int, count: int, exclude: set) -> list:
        rng = np.random.default_rng([spec.seed, stream, 7])
        out: list = []
        seen = set(exclude)
        while len(out) < count:
            for problem in map(tuple, carry_chain_pairs(rng, count - len(out), spec.num_digits)):
                if problem not in seen:
                    seen.add(problem)
                    out.append(problem)
        return out

    train = distinct(1, spec.num_train, set())
    return train if split == "train" else distinct(2, spec.num_validation, set(train))


@dataclasses.dataclass
class DemoConfig(tfds.core.BuilderConfig):
    """A TFDS config of `rlp_demo`: a name and the generator's spec."""

    spec: DemoCorpusSpec = DemoCorpusSpec()


class RlpDemo(corpus_lib.OfflineBuilder):
    """TFDS builder of the demo corpus; everything is generated from the config's seed."""

    VERSION = tfds.core.Version(f"1.0.{GENERATOR_VERSION - 1}")
    RELEASE_NOTES = {"1.0.0": "3-digit addition and word problems with column-wise thoughts; "
                              "6-digit long-carry additions (carry_* configs); a ball under "
                              "swapped cups (cups_* configs).",
                     "1.0.1": "cups problems drawn from a pool in which the swap counts say "
                              "nothing of the answer."}
    BUILDER_CONFIGS = [DemoConfig(name=name, spec=spec) for name, spec in DEMO_VARIANTS.items()]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=corpus_lib.record_features(),
                                     metadata=tfds.core.MetadataDict(),
                                     description="Generated arithmetic documents for the "
                                                 "rlp-jax demo.")

    def _split_generators(self, dl_manager):
        del dl_manager
        spec: DemoCorpusSpec = self.builder_config.spec
        self.info.metadata.update({
            "position_kinds": list(DEMO_POSITION_KINDS),
            "build_stats": {"documents_train": spec.num_train,
                            "documents_validation": spec.num_validation},
            "fingerprint": spec.fingerprint(),
            "spec": dataclasses.asdict(spec),
        })
        return {split: self._generate_examples(spec, split) for split in ("train", "validation")}

    def _generate_examples(self, spec: DemoCorpusSpec, split: str):
        for record in generate_demo_documents(spec, split):
            yield record["doc_id"], record


def build_demo_corpus(data_dir: str | os.PathLike, variant: str = "plain", *,
                      num_train: int | None = None, num_validation: int | None = None,
                      seed: int = 0, overwrite: bool = False) -> corpus_lib.Corpus:
    """Generates (or reopens) the demo corpus under `<data_dir>/rlp_demo/<config>/` and opens it.

    Args:
      data_dir: the TFDS data directory.
      variant: `plain`, `worked`, `mixed_plain`, `mixed_worked`, `carry_plain`, `carry_worked`,
        `cups_plain` or `cups_worked` (see the module docstring).
      num_train, num_validation, seed: override the variant's size and seed; the config name
        then records them (e.g. `worked-seed3-train500-val100`).
      overwrite: regenerate even if an identical corpus exists.
    """
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; use one of "
                         f"{', '.join(DEMO_VARIANTS)}.")
    base = DEMO_VARIANTS[variant]
    spec = dataclasses.replace(
        base, seed=seed,
        num_train=base.num_train if num_train is None else num_train,
        num_validation=base.num_validation if num_validation is None else num_validation)
    name = variant if spec == base else (
        f"{variant}-seed{spec.seed}-train{spec.num_train}-val{spec.num_validation}")
    config = name if spec == base else DemoConfig(name=name, spec=spec)
    builder = RlpDemo(config=config, data_dir=os.fspath(data_dir),
                      file_format="array_record")
    return corpus_lib.prepare_and_open(builder, spec.fingerprint(), overwrite)
