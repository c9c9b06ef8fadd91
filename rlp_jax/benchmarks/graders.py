"""Answer extraction and grading: math answers (last `\\boxed{...}`, else the final number) judged by
symbolic equivalence through `math-verify`, multiple-choice answers by their letter, the toy tasks'
answers (the number written right after the thought) by exact match.

Grading reads the text after the last `</think>` when the model closed its thought (the answer it
gave), else the whole generation. A response with no extractable answer is wrong.
"""

from __future__ import annotations

import re
import string
import threading

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LETTERS = string.ascii_uppercase

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def answer_region(text: str) -> str:
    """The part of a generation that holds the answer: after the last `</think>`, if any."""
    cut = text.rfind(THINK_CLOSE)
    return text if cut < 0 else text[cut + len(THINK_CLOSE):]


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; also
    the brace-less `\\boxed 5`. None when there is no complete box."""
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start >= 0:
            content = _box_content(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(command, 0, start)
    return None if best is None else best[1].strip()


def _box_content(text: str, i: int) -> str | None:
    """The argument of a box command whose name ends at `i`."""
    if i < len(text) and text[i] == " ":  # `\boxed 5`: the next space-free word
        match = re.match(r" +([^\s$]+)", text[i:])
        return match.group(1) if match else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the box never closed (a truncated generation)


def final_number(text: str) -> str | None:
    """The last number in `text` (thousands separators dropped), or None."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def extract_math_answer(text: str) -> str | None:
    """The model's math answer: the last `\\boxed{}` of the answer region, else its final number."""
    region = answer_region(text)
    boxed = last_boxed(region)
    return boxed if boxed is not None else final_number(region)


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(expression: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Hand math-verify the one answer we extracted, boxed, so that its own extraction cannot pick
    # another expression of the response.
    return parse(f"\\boxed{{{expression}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def math_equal(gold: str, predicted: str | None) -> bool:
    """Whether `predicted` is mathematically equivalent to `gold` (math-verify: sympy equivalence
    of the parsed LaTeX / expressions, numbers compared after rounding to 6 places; units and
    `\\text{}` stripped). A missing or unparsable prediction is wrong; if math-verify parses
    neither side, the two strings must match after whitespace is removed."""
    if predicted is None or not predicted.strip():
        return False
    from math_verify import verify

    gold_parsed, predicted_parsed = _parse(gold), _parse(predicted)
    if not gold_parsed or not predicted_parsed:
        return bool(gold_parsed) == bool(predicted_parsed) and _squash(gold) == _squash(predicted)
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout()))


def grade_math(gold: str, response: str) -> tuple[bool, str | None]:
    """(correct, extracted answer) for one math response."""
    predicted = extract_math_answer(response)
    return math_equal(gold, predicted), predicted


# ---------------------------------------------------------------- toy tasks (the demo corpus)

def extract_toy_answer(text: str) -> str | None:
    """The number a demo model answered: the digits that open the answer region (`843` of
    `<think>76013 58114 43108</think>843`, or of a bare `843`). None when a thought was opened
    and never closed (a truncated thought is no answer) or no digit follows it."""
    opened = text.find(THINK_OPEN)
    if opened >= 0 and text.find(THINK_CLOSE, opened) < 0:
        return None
    match = re.match(r"\s*(\d+)", answer_region(text))
    return match.group(1) if match else None


def grade_toy(gold: str, response: str) -> tuple[bool, str | None, bool]:
    """(the whole number is right, the extracted number, its first digit is right) for one toy
    response: `843` is right for 843, `8431` and `84` are not, though their first digit is."""
    extracted = extract_toy_answer(response)
    return extracted == gold, extracted, bool(extracted) and extracted[0] == gold[:1]


# ---------------------------------------------------------------- multiple choice

def extract_choice(text: str, num_choices: int) -> str | None:
    """The letter a multiple-choice response picked (A… for `num_choices` options), or None.

    In order of trust: the last `\\boxed{X}`; the last "answer is X" / "Answer: X" (parentheses
    or bold allowed); a response that is or starts with the letter ("B", "(B)", "B.", "B: ..."; not
    "A good ..."); the last parenthesised letter "(B)" of the answer region."""
    valid = LETTERS[:num_choices]
    region = answer_region(text)
    letter = f"([{valid}])"
    boxed = last_boxed(region)
    if boxed is not None:
        match = re.fullmatch(rf"\s*(?:\\text(?:bf)?\{{)?\(?{letter}\)?\}}?\s*[.:)]?.*", boxed, re.S)
        if match:
            return match.group(1)
    stated = list(re.finditer(rf"answer(?:\s+is)?\s*[:=]?\s*(?:\$|\*\*)*\s*(?:option\s+)?\(?{letter}\)?(?![A-Za-z])",
                              region, re.I))
    stated = [m for m in stated if m.group(1).isupper()]
    if stated:
        return stated[-1].group(1)
    start = re.match(rf"\s*\(?{letter}(?:\)|\.|:|\s*$|\s*\n)", region)
    if start:
        return start.group(1)
    parenthesised = re.findall(rf"\({letter}\)", region)
    return parenthesised[-1] if parenthesised else None


def grade_choice(answer_index: int, response: str, num_choices: int) -> tuple[bool, str | None]:
    """(correct, extracted letter) for one multiple-choice response."""
    picked = extract_choice(response, num_choices)
    return picked == LETTERS[answer_index], picked
