"""Prompts for benchmark items, as plain text for a base model (no chat template).

Formats
- `think` (the paper's style): an instruction, then the question; the prompt ends inside an open
  `<think>` so the model reasons first, closes the thought with `</think>` and then answers: a
  math answer as `\\boxed{...}`, a multiple-choice answer as the option's letter (`\\boxed{B}`).
- `plain`: "Question: ...\\nAnswer:" with no thinking (a direct answer).

`shots` (0-4) prepends that many worked examples written for this module (never test items) in
the same format. Log-likelihood scoring of options uses `choice_context` + `choice_continuations`.
"""

from __future__ import annotations

from rlp_jax.benchmarks.graders import LETTERS
from rlp_jax.benchmarks.tasks import BenchmarkError, Item

FORMATS = ("think", "plain")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

MATH_INSTRUCTION = ("Solve the following problem. Reason step by step inside <think> and </think>, then state the "
                    "final answer as \\boxed{answer}.")
CHOICE_INSTRUCTION = ("Answer the following multiple-choice question. Reason step by step inside <think> and "
                      "</think>, then state the letter of the correct option as \\boxed{letter}.")

# Worked examples: (question, thought, answer).
MATH_SHOTS = (
    ("A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?",
     "27 pencils are 27 / 3 = 9 groups of 3, and each group costs $1, so they cost 9 dollars.", "9"),
    ("What is the value of $\\frac{2}{3} + \\frac{1}{6}$?",
     "With the common denominator 6: 2/3 = 4/6, and 4/6 + 1/6 = 5/6.", "\\frac{5}{6}"),
    ("Solve for $x$: $3x - 7 = 11$.", "Adding 7 gives 3x = 18, and dividing by 3 gives x = 6.", "6"),
    ("A rectangle has perimeter 20 and length 6. What is its area?",
     "2(6 + w) = 20 gives w = 4, so the area is 6 * 4 = 24.", "24"),
)
CHOICE_SHOTS = (
    ("Which gas do plants take in from the air for photosynthesis?",
     ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium"),
     "Photosynthesis turns carbon dioxide and water into sugar and oxygen, so plants take in carbon dioxide.", 1),
    ("What is the SI unit of electric resistance?", ("Volt", "Ampere", "Ohm", "Watt"),
     "Resistance is voltage over current, measured in ohms.", 2),
    ("Which of these numbers is prime?", ("21", "27", "33", "29"),
     "21 = 3*7, 27 = 3*9, 33 = 3*11; 29 has no divisor but 1 and itself.", 3),
    ("Which planet is closest to the Sun?", ("Mercury", "Venus", "Earth", "Mars"),
     "The order outwards is Mercury, Venus, Earth, Mars.", 0),
)


def _check(fmt: str, shots: int) -> None:
    if fmt not in FORMATS:
        raise BenchmarkError(f"prompt format {fmt!r} is unknown; use one of {', '.join(FORMATS)}.")
    if not 0 <= shots <= len(MATH_SHOTS):
        raise BenchmarkError(f"shots={shots} is out of range; use 0 to {len(MATH_SHOTS)} worked examples.")


def options_block(choices) -> str:
    return "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _question(item_question: str, choices=()) -> str:
    return f"Question: {item_question.strip()}{options_block(choices)}\nAnswer:"


def _math_shot(fmt: str, question: str, thought: str, answer: str) -> str:
    if fmt == "think":
        return f"{_question(question)} {THINK_OPEN}\n{thought}\n{THINK_CLOSE}\nThe answer is \\boxed{{{answer}}}.\n\n"
    return f"{_question(question)} The answer is \\boxed{{{answer}}}.\n\n"


def _choice_shot(fmt: str, question: str, choices, thought: str, index: int) -> str:
    letter = LETTERS[index]
    if fmt == "think":
        return (f"{_question(question, choices)} {THINK_OPEN}\n{thought}\n{THINK_CLOSE}\n"
                f"The answer is \\boxed{{{letter}}}.\n\n")
    return f"{_question(question, choices)} {letter}\n\n"


def generation_prompt(item: Item, fmt: str = "think", shots: int = 0) -> str:
    """The prompt a model continues to answer `item`."""
    _check(fmt, shots)
    if item.is_choice:
        header = CHOICE_INSTRUCTION if fmt == "think" else "Answer with the letter of the correct option."
        examples = "".join(_choice_shot(fmt, *shot) for shot in CHOICE_SHOTS[:shots])
        body = _question(item.question, item.choices)
    else:
        header = MATH_INSTRUCTION if fmt == "think" else "Solve the problem; state the final answer as \\boxed{answer}."
        examples = "".join(_math_shot(fmt, *shot) for shot in MATH_SHOTS[:shots])
        body = _question(item.question)
    opening = f" {THINK_OPEN}\n" if fmt == "think" else ""
    return f"{header}\n\n{examples}{body}{opening}"


def stop_strings(fmt: str = "think") -> tuple[str, ...]:
    """Text that ends a response: the start of a next question (a base model goes on writing
    examples after its answer)."""
    del fmt
    return ("\nQuestion:",)


# ---------------------------------------------------------------- log-likelihood scoring

LOGLIK_STYLES = ("letters", "cloze")


def choice_context(item: Item, style: str = "letters", shots: int = 0) -> str:
    """The context options are scored after: `letters` shows the options and scores " A", " B", ...;
    `cloze` shows only the question and scores each option's text."""
    if style not in LOGLIK_STYLES:
        raise BenchmarkError(f"log-likelihood style {style!r} is unknown; use one of {', '.join(LOGLIK_STYLES)}.")
    _check("plain", shots)
    if style == "letters":
        examples = "".join(f"{_question(q, c)} {LETTERS[i]}\n\n" for q, c, _, i in CHOICE_SHOTS[:shots])
        return examples + _question(item.question, item.choices)
    examples = "".join(f"{_question(q)} {c[i]}\n\n" for q, c, _, i in CHOICE_SHOTS[:shots])
    return examples + _question(item.question)


def choice_continuations(item: Item, style: str = "letters") -> list[str]:
    if style == "letters":
        return [f" {LETTERS[i]}" for i in range(len(item.choices))]
    return [f" {c}" for c in item.choices]
