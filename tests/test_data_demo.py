"""The generated demo corpus: seeded, correct thoughts and answers, held-out pairs, marks."""

import collections
import dataclasses
import itertools
import math
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from rlp_jax.data.demo_corpus import DEMO_POSITION_KINDS, DEMO_VARIANTS, DemoCorpusSpec, \
    addition_pair_split, build_demo_corpus, carry_chain_pairs, column_thought, cups_problem_pool, \
    cups_thought, demo_tokenizer, generate_demo_documents, render_cups, render_problem

SMALL = DemoCorpusSpec(num_train=400, num_validation=100, worked_fraction=0.5,
                       word_problem_fraction=0.5)
_PROBLEM = re.compile(r"^(?:(\d{3})\+(\d{3})=|\D*(\d{3})\D+(\d{3})\D*\? )"
                      r"(?:<think>(.*)</think>)?(\d{3})$")


def _parse(text):
    match = _PROBLEM.match(text)
    assert match, text
    a, b = (int(match.group(1) or match.group(3)), int(match.group(2) or match.group(4)))
    return a, b, match.group(5), int(match.group(6))


def test_generation_is_a_pure_function_of_the_spec():
    first = [d["text"] for d in generate_demo_documents(SMALL, "train")]
    second = [d["text"] for d in generate_demo_documents(SMALL, "train")]
    other_seed = [d["text"] for d in generate_demo_documents(
        dataclasses.replace(SMALL, seed=1), "train")]
    assert first == second and len(first) == 400 and len(set(first)) == 400
    assert first != other_seed


def test_answers_and_worked_thoughts_are_correct():
    counts = {"worked": 0, "word": 0}
    for split in ("train", "validation"):
        for doc in generate_demo_documents(SMALL, split):
            a, b, thought, answer = _parse(doc["text"])
            assert answer == a + b and 100 <= a and 100 <= b and a + b <= 999
            if thought is not None:
                counts["worked"] += 1
                assert thought == column_thought(a, b)
                columns = thought.split(" ")
                digits = "".join(c[-1] for c in reversed(columns))
                assert int(digits) == answer  # the thought's column sums spell the answer
            counts["word"] += not doc["text"][0].isdigit()
    assert 200 <= counts["worked"] <= 300 and 200 <= counts["word"] <= 300  # about half of 500


def test_column_thought_format():
    assert column_thought(457, 386) == "76013 58114 43108"
    assert column_thought(100, 100) == "00000 00000 11002"
    assert len(column_thought(123, 456)) == 17


def test_train_and_validation_pairs_are_disjoint():
    train_pairs, held_out = addition_pair_split(seed=0)
    assert len(train_pairs) + len(held_out) == 320_400
    assert len(held_out) == 32_040
    train_keys = set((train_pairs[:, 0] * 1000 + train_pairs[:, 1]).tolist())
    held_keys = set((held_out[:, 0] * 1000 + held_out[:, 1]).tolist())
    assert not train_keys & held_keys
    seen = {split: {_parse(d["text"])[:2] for d in generate_demo_documents(SMALL, split)}
            for split in ("train", "validation")}
    assert not seen["train"] & seen["validation"]
    assert {a * 1000 + b for a, b in seen["validation"]} <= held_keys


def test_marked_offsets_point_at_the_right_characters():
    kind = {name: i for i, name in enumerate(DEMO_POSITION_KINDS)}
    text, offsets, kinds = render_problem(457, 386, worked=True)
    assert text == "457+386=<think>76013 58114 43108</think>843"
    marks = dict(zip(offsets, kinds))
    assert [o for o, k in marks.items() if k == kind["answer_start"]] == [len(text) - 3]
    assert [o for o, k in marks.items() if k == kind["answer_rest"]] == [len(text) - 2,
                                                                       len(text) - 1]
    assert [text[o] for o, k in marks.items() if k == kind["operand"]] == list("457386")
    thought = [o for o, k in marks.items() if k == kind["thought"]]
    assert thought == list(range(8, len(text) - 3))
    word, offsets, kinds = render_problem(
        123, 456, worked=False, template="ana has {a} coins and finds {b} more. how many? ")
    operands = [word[o] for o, k in zip(offsets, kinds) if k == kind["operand"]]
    assert operands == list("123456")
    assert word[offsets[kinds.index(kind["answer_start"])]:] == "579"


def test_variant_fractions_and_doc_ids():
    worked = list(generate_demo_documents(dataclasses.replace(
        DEMO_VARIANTS["worked"], num_train=1000, num_validation=10), "train"))
    share = np.mean(["<think>" in d["text"] for d in worked])
    assert 0.87 <= share <= 0.93
    validation = list(generate_demo_documents(SMALL, "validation"))
    assert [d["doc_id"] for d in validation] == list(range(400, 500))


def test_build_writes_exactly_the_generated_records(tmp_path):
    start = time.perf_counter()
    corpus = build_demo_corpus(tmp_path, "mixed_worked", num_train=300, num_validation=50, seed=2)
    elapsed = time.perf_counter() - start
    assert corpus.name == "rlp_demo/mixed_worked-seed2-train300-val50"
    assert corpus.position_kind_names == DEMO_POSITION_KINDS
    assert corpus.build_stats == {"documents_train": 300, "documents_validation": 50}
    spec = dataclasses.replace(DEMO_VARIANTS["mixed_worked"], num_train=300, num_validation=50,
                               seed=2)
    for split in ("train", "validation"):
        source = corpus.source(split)
        stored = sorted((int(r["doc_id"]), r["text"].decode(), r["marked_offsets"].tolist(),
                         r["marked_kinds"].tolist()) for r in (source[i]
                                                                for i in range(len(source))))
        expected = [(d["doc_id"], d["text"], d["marked_offsets"].tolist(),
                     d["marked_kinds"].tolist()) for d in generate_demo_documents(spec, split)]
        assert stored == expected
    tok = demo_tokenizer()
    assert all(tok.decode(tok.encode(text)) == text for _, text, _, _ in stored)
    assert elapsed < 10


def test_bad_demo_requests():
    with pytest.raises(ValueError, match="unknown demo variant 'huge'"):
        build_demo_corpus("/nonexistent", "huge")
    with pytest.raises(ValueError, match="only 32040 distinct validation number pairs"):
        next(generate_demo_documents(DemoCorpusSpec(num_validation=40_000), "validation"))
    with pytest.raises(ValueError, match="worked_fraction is 1.5"):
        DemoCorpusSpec(worked_fraction=1.5)
    with pytest.raises(ValueError, match="not a 3-digit sum of 3-digit numbers"):
        render_problem(600, 500, worked=False)


def _carry_into_leading_column(a: int, b: int, n: int) -> int:
    return int(a % 10 ** (n - 1) + b % 10 ** (n - 1) >= 10 ** (n - 1))


def test_carry_task_chains_are_long_and_the_leading_digit_hangs_on_them():
    """Chain lengths 0–4 equally often; under the chain, carry and no carry equally often; so a
    rule that reads only the leading column and the one under it is right about the leading digit
    in 60% of the documents (always at chain 0, half the time otherwise)."""
    n, count = 6, 6000
    pairs = carry_chain_pairs(np.random.default_rng(0), count, n)
    a_N, b_N = pairs[:, 0], pairs[:, 1]
    assert ((a_N >= 10**5) & (b_N >= 10**5) & (a_N + b_N < 10**6)).all()
    digit = lambda x, k: (x // 10**k) % 10
    chains, carries, shortcut_right = [], [], 0
    for a, b in zip(a_N.tolist(), b_N.tolist()):
        chain = 0
        while chain < n - 1 and digit(a, n - 2 - chain) + digit(b, n - 2 - chain) == 9:
            chain += 1
        chains.append(chain)
        carry = _carry_into_leading_column(a, b, n)
        carries.append(carry)
        # the shortcut: carry iff the column under the leading one sums to 10 or more
        guess = int(digit(a, n - 2) + digit(b, n - 2) >= 10)
        shortcut_right += (digit(a, n - 1) + digit(b, n - 1) + guess) % 10 == (a + b) // 10 ** (n - 1)
    counts = np.bincount(chains, minlength=n)  # the deciding column never sums to 9
    assert counts[n - 1] == 0 and np.all(np.abs(counts[:n - 1] / count - 1 / (n - 1)) < 0.03), counts
    assert abs(np.mean(carries) - 0.5) < 0.03
    assert shortcut_right / count == pytest.approx(0.6, abs=0.03)


def test_carry_documents_are_right_and_held_out_pairs_never_in_train():
    spec = dataclasses.replace(DEMO_VARIANTS["carry_worked"], num_train=3000, num_validation=300)
    docs = {split: list(generate_demo_documents(spec, split)) for split in ("train", "validation")}
    problem = re.compile(r"^(\d{6})\+(\d{6})=(?:<think>(.*)</think>)?(\d{6})$")
    seen = {}
    for split, records in docs.items():
        seen[split] = set()
        for record in records:
            a, b, thought, answer = problem.match(record["text"]).groups()
            a, b = int(a), int(b)
            assert int(answer) == a + b
            if thought is not None:
                assert thought == column_thought(a, b, 6) and len(thought) == 35
                assert thought[-2:] == answer[0].rjust(2, "0")  # the last column holds the leading digit
            kinds = dict(zip(record["marked_offsets"].tolist(), record["marked_kinds"].tolist()))
            first = len(record["text"]) - 6
            assert DEMO_POSITION_KINDS[kinds[first]] == "answer_start"
            assert all(DEMO_POSITION_KINDS[kinds[first + k]] == "answer_rest" for k in range(1, 6))
            assert all(DEMO_POSITION_KINDS[kinds[k]] == "operand" for k in (*range(6), *range(7, 13)))
            seen[split].add((a, b))
        assert len(seen[split]) == len(records)
    assert not seen["train"] & seen["validation"]
    assert sum(r["text"].count("<think>") for r in docs["train"]) / 3000 == pytest.approx(0.9, abs=0.03)
    again = [d["text"] for d in generate_demo_documents(spec, "validation")]
    assert again == [d["text"] for d in docs["validation"]]


def test_carry_spec_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="task is 'mul'"):
        DemoCorpusSpec(task="mul")
    with pytest.raises(ValueError, match="use task='carry' for longer numbers"):
        DemoCorpusSpec(num_digits=6)
    with pytest.raises(ValueError, match="no word problems"):
        DemoCorpusSpec(task="carry", num_digits=6, word_problem_fraction=0.5)


def test_cups_documents_are_right_and_held_out_problems_never_in_train():
    spec = dataclasses.replace(DEMO_VARIANTS["cups_worked"], num_train=3000, num_validation=300)
    docs = {split: list(generate_demo_documents(spec, split)) for split in ("train", "validation")}
    problem = re.compile(r"^([lro]{10})=(?:<think>([123]{10})</think>)?([123])$")
    seen = {}
    for split, records in docs.items():
        seen[split] = set()
        for record in records:
            moves, thought, answer = problem.match(record["text"]).groups()
            cup = 1  # the ball, followed by hand
            for move in moves:
                pair = {"l": (1, 2), "r": (2, 3), "o": (1, 3)}[move]
                cup = sum(pair) - cup if cup in pair else cup
            assert answer == str(cup)
            if thought is not None:
                assert thought == cups_thought(moves) and thought[-1] == answer
            kinds = [DEMO_POSITION_KINDS[k] for k in record["marked_kinds"].tolist()]
            by_offset = dict(zip(record["marked_offsets"].tolist(), kinds))
            assert [by_offset[k] for k in range(10)] == ["operand"] * 10 and 10 not in by_offset
            assert by_offset[len(record["text"]) - 1] == "answer_start" and kinds.count("answer_start") == 1
            assert kinds.count("thought") == (0 if thought is None else len(record["text"]) - 12)
            seen[split].add(moves)
        assert len(seen[split]) == len(records)
    assert not seen["train"] & seen["validation"]
    assert sum(r["text"].count("<think>") for r in docs["train"]) / 3000 == pytest.approx(0.9, abs=0.03)
    assert render_cups("lrolrrolol", worked=True)[0] == "lrolrrolol=<think>2312322133</think>3"


def test_cups_answer_needs_every_swap_in_order():
    """Why the cups answer needs the ball followed: changing any one swap changes the answer, and
    problems with the same number of each swap, reordered, end under different cups; the answers
    of uniformly drawn swaps are balanced."""
    rng = np.random.default_rng(0)
    problems = ["".join(rng.choice(list("lro"), size=10)) for _ in range(300)]
    answers = [cups_thought(p)[-1] for p in problems]
    for moves, answer in zip(problems[:100], answers):
        for i in range(10):
            others = {cups_thought(moves[:i] + m + moves[i + 1:])[-1] for m in "lro" if m != moves[i]}
            assert len(others) == 2 and answer not in others
    reordered = {cups_thought("".join(rng.permutation(list(problems[0]))))[-1] for _ in range(50)}
    assert len(reordered) == 3
    assert np.allclose(np.bincount([int(a) for a in answers], minlength=4)[1:] / 300, 1 / 3, atol=0.06)


def test_cups_spec_refuses_what_it_cannot_write():
    with pytest.raises(ValueError, match="the cups task has no word problems"):
        DemoCorpusSpec(task="cups", num_digits=10, word_problem_fraction=0.5)
    with pytest.raises(ValueError, match="use 3 to 12"):
        DemoCorpusSpec(task="cups", num_digits=40)
    with pytest.raises(ValueError, match="use 3 to 12"):
        DemoCorpusSpec(task="cups", num_digits=2)
    assert cups_problem_pool(2, 0) == []  # no count vector of 2 swaps reaches all three cups
    with pytest.raises(ValueError, match="fewer than twice the documents asked for"):
        next(generate_demo_documents(DemoCorpusSpec(task="cups", num_digits=4), "train"))
    with pytest.raises(ValueError, match="not a string of swaps"):
        render_cups("lrx", worked=False)


def _ball_followed_by_hand(moves: str) -> int:
    cup = 1
    for move in moves:
        pair = {"l": (1, 2), "r": (2, 3), "o": (1, 3)}[move]
        cup = sum(pair) - cup if cup in pair else cup
    return cup


def _answers_by_swap_counts(problems) -> dict:
    """{(number of l, r, o): Counter of answers} over `problems`, each counted once."""
    table = collections.defaultdict(collections.Counter)
    for moves in problems:
        table[tuple(moves.count(m) for m in "lro")][_ball_followed_by_hand(moves)] += 1
    return table


def _best_guess_from_counts(table) -> Fraction:
    """How often the best predictor that sees only the swap counts is right."""
    return Fraction(sum(max(answers.values()) for answers in table.values()),
                    sum(sum(answers.values()) for answers in table.values()))


def _mutual_information_nats(table) -> float:
    """I(counts; answer), each term's ratio computed exactly."""
    total = sum(sum(answers.values()) for answers in table.values())
    per_answer = sum(table.values(), collections.Counter())
    return sum(n / total * math.log(Fraction(n * total, sum(answers.values()) * per_answer[cup]))
               for answers in table.values() for cup, n in answers.items())


def test_uniform_swaps_let_their_counts_guess_the_cup_35_percent_of_the_time():
    """What the cups generator drew before the pool (every swap uniform), enumerated exactly over
    all 3^10 strings: the counts alone are right 35.0% of the time, not 1/3."""
    uniform = ["".join(moves) for moves in itertools.product("lro", repeat=10)]
    table = _answers_by_swap_counts(uniform)
    assert len(uniform) == 59_049 and len(table) == 66
    assert _best_guess_from_counts(table) == Fraction(20_676, 59_049)  # 0.3501
    assert math.log(3) - _mutual_information_nats(table) == pytest.approx(1.0944, abs=5e-5)  # H(cup | counts)
    assert dict(table[(10, 0, 0)]) == {1: 1}  # ten identical swaps always end under cup 1


@pytest.mark.parametrize("num_moves, seed, pool_size", [(10, 0, 56_070), (10, 1, 56_070), (3, 0, 6),
                                                      (5, 0, 153)])
def test_cups_pool_counts_say_nothing_of_the_answer(num_moves, seed, pool_size):
    """The cups problems are drawn uniformly from the pool; enumerated exactly, every count vector
    in it ends under each cup equally often, so the best guess from the counts is right exactly
    1/3 of the time and the counts carry zero information. The pool keeps every count vector that
    reaches all three cups (10 swaps: the real task; the pool depends on the seed, its size not)."""
    pool = cups_problem_pool(num_moves, seed)
    table = _answers_by_swap_counts(pool)
    assert len(pool) == len(set(pool)) == pool_size
    assert pool == sorted(pool, key=lambda moves: ["lro".index(m) for m in moves])
    assert all(len(answers) == 3 and len(set(answers.values())) == 1 for answers in table.values())
    assert _best_guess_from_counts(table) == Fraction(1, 3)
    assert _mutual_information_nats(table) == 0.0
    uniform = _answers_by_swap_counts("".join(m) for m in itertools.product("lro", repeat=num_moves))
    assert set(table) == {counts for counts, answers in uniform.items() if len(answers) == 3}
    assert all(table[counts][1] == min(uniform[counts].values()) for counts in table)
    assert "l" * num_moves not in pool


def test_cups_documents_come_from_the_pool_and_the_seed_picks_the_pool():
    spec = dataclasses.replace(DEMO_VARIANTS["cups_plain"], num_train=3000, num_validation=300)
    pool = set(cups_problem_pool(10, spec.seed))
    for split in ("train", "validation"):
        assert {d["text"][:10] for d in generate_demo_documents(spec, split)} <= pool
    assert cups_problem_pool(10, 1) != cups_problem_pool(10, 0)
