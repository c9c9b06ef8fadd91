"""Benchmarks during training and the toy tasks (rlp_jax.benchmarks.training, tasks.demo_task):
the toy loaders give the demo corpus's validation problems, toy grading on a hand-written table,
a tiny run logs bench scores at its cadence that equal `runner.evaluate_run_dir` on the saved
checkpoints, a resumed run logs no step twice, and a benchmark without its data is refused before
the first step."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from rlp_jax import config as config_lib
from rlp_jax import trainer
from rlp_jax.benchmarks import graders, runner, tasks, training
from rlp_jax.data.demo_corpus import cups_thought
from rlp_jax.metrics_io import read_jsonl

TINY = str(Path(__file__).parent / "configs" / "tiny_rlp.py")


# ---------------------------------------------------------------- toy tasks

def test_toy_tasks_are_the_demo_corpus_validation_split(tmp_path):
    """Read back from the built TFDS corpus (the trainer's own path to the data): the same problems
    (by document id, in the generator's order), prompt up to and including `=`, the sum as the answer."""
    from rlp_jax.data.demo_corpus import build_demo_corpus

    def documents(corpus) -> dict[int, str]:
        source = corpus.source("validation")
        text = lambda t: t.decode() if isinstance(t, bytes) else t  # noqa: E731
        return {int(source[i]["doc_id"]): text(source[i]["text"]) for i in range(len(source))}

    texts = documents(build_demo_corpus(tmp_path, "plain"))
    items = tasks.TASKS["demo_addition"].load()
    assert len(items) == len(texts) == 2000
    assert {int(i.id.split("/")[1]): i.question + i.answer for i in items} == texts
    assert [int(i.id.split("/")[1]) for i in items] == list(range(20000, 22000))
    for item in items:
        a, b = map(int, item.question.removesuffix("=").split("+"))
        assert item.question.endswith("=") and item.answer == str(a + b) and len(item.answer) == 3
    assert items[0].id == "demo_addition/20000" and items[0].question == "710+242=" and items[0].answer == "952"
    # The carry task: 6-digit problems, a 6-digit answer.
    carry = tasks.TASKS["demo_carry"].load(limit=3)
    assert [(i.question, i.answer) for i in carry] == [("225819+274189=", "500008"), ("164579+332009=", "496588"),
                                                       ("135830+664910=", "800740")]
    # The cups task: 10 swaps, the cup the ball ends under.
    cups = tasks.TASKS["demo_cups"].load(limit=50)
    assert all(re.fullmatch(r"[lro]{10}=", i.question) and i.answer == cups_thought(i.question[:10])[-1] for i in cups)
    # A run seeded 3 reads its own corpus's held-out problems: those of build_demo_corpus(seed=3).
    seeded = {t.name: t for t in tasks.resolve(["demo"], demo_seed=3)}
    texts3 = documents(build_demo_corpus(tmp_path, "plain", seed=3))
    assert {int(i.id.split("/")[1]): i.question + i.answer for i in seeded["demo_addition"].load()} == texts3
    assert seeded["demo_addition"].load(limit=5) != items[:5]


TOY_CASES = [
    # (gold, response, correct, extracted, first digit right)
    ("843", "<think>76013 58114 43108</think>843", True, "843", True),
    ("843", "843", True, "843", True),  # no thought: the bare answer counts
    ("843", " 843", True, "843", True),
    ("843", "<think>7601</think>853", False, "853", True),  # the first digit is right, the sum is not
    ("843", "<think>76013</think>943", False, "943", False),
    ("843", "8431", False, "8431", True),  # a longer number is not the answer
    ("843", "84", False, "84", True),
    ("843", "<think>76013 58114 43108", False, None, False),  # a thought never closed: no answer
    ("843", "<think>x</think>", False, None, False),
    ("843", "", False, None, False),
    ("500008", "<think>98017</think>500008", True, "500008", True),
    ("500008", "<think>a</think><think>b</think>400008", False, "400008", False),  # the last thought counts
]


@pytest.mark.parametrize("gold, response, correct, extracted, first", TOY_CASES)
def test_toy_grading(gold, response, correct, extracted, first):
    assert graders.grade_toy(gold, response) == (correct, extracted, first)
    item = tasks.Item("t/0", "1+1=", gold)
    assert runner._grade(tasks.TASKS["demo_addition"], item, response) == (correct, extracted, {"first_digit": first})


def test_toy_task_numbers_from_a_hand_written_response_table(monkeypatch):
    """evaluate_task on 3 demo_addition items (952, 663, 649) with the responses below in place of
    a model's: 1 greedy + 4 sampled responses each."""
    from rlp_jax.benchmarks import generate as gen

    greedy = [["<think>02013 41015 72109</think>952"], ["653"], ["<think>41005"]]
    sampled = [["952", "<think>x</think>952", "962", "852"],  # 2 right; first digit 3 of 4
               ["<think>y</think>663", "6630", "563", ""],  # 1 right; first digit 2 of 4
               ["649", "649", "649", "<think>z</think>649"]]  # 4 right
    table = {True: greedy, False: sampled}

    def responses(model, tok, prompt_ids, cfg, label, mesh, rules, progress):
        texts = table[cfg.temperature == 0.0]
        assert len(prompt_ids) == 3 and len(texts[0]) == cfg.num_samples
        out = gen.Generations([[[5]] * cfg.num_samples] * 3, np.ones((3, cfg.num_samples), bool), 3, 1.0)
        return texts, out, np.ones((3, cfg.num_samples), int)

    monkeypatch.setattr(runner, "_responses", responses)
    task = tasks.TASKS["demo_addition"]
    items = task.load(limit=3)
    assert [i.answer for i in items] == ["952", "663", "649"]
    settings = runner.Settings(math_samples=4, math_greedy=True, temperature=1.0)
    result, records = runner.evaluate_task(None, runner.text.load("demo"), task, items, settings)
    assert result["greedy"] == pytest.approx(1 / 3)
    assert result["pass@1"] == result["score"] == pytest.approx(7 / 12)
    assert result["pass@4"] == pytest.approx(1.0)
    assert result["first_digit_greedy"] == pytest.approx(2 / 3)
    assert result["first_digit_pass@1"] == pytest.approx(9 / 12)
    assert result["protocol"] == "pass@1 averaged over 4 samples"
    assert [r["extracted"] for r in records[1]["sampled"]] == ["663", "6630", "563", None]
    assert [r["first_digit"] for r in records[1]["sampled"]] == [True, True, False, False]


def test_toy_prompt_and_generation_cap():
    task = tasks.TASKS["demo_addition"]
    item = task.load(limit=1)[0]
    settings = runner.Settings(math_samples=2, max_new_tokens=2048)
    assert runner.prompt_text(task, item, settings) == "710+242="  # not the `think` instruction prompt
    assert runner._generation_config(settings, 2, False, task).max_new_tokens == 40
    assert runner._generation_config(settings, 2, False, tasks.TASKS["demo_carry"]).max_new_tokens == 64
    assert runner._generation_config(runner.Settings(max_new_tokens=16), 1, True, task).max_new_tokens == 16


class _Recorder:
    """A jitted program standing in for itself that records the static arguments and the input
    shapes of every call and of every `.lower`."""

    def __init__(self, program):
        self.program, self.calls, self.lowered = program, [], []

    @staticmethod
    def _signature(args):
        return tuple((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else a for a in args)

    def __call__(self, graphdef, params, *args):
        self.calls.append(self._signature(args))
        return self.program(graphdef, params, *args)

    def lower(self, graphdef, params, *args):
        self.lowered.append(self._signature(args))
        return self.program.lower(graphdef, params, *args)


def test_compiled_benchmark_programs_are_the_widest_programs_the_evaluation_runs(monkeypatch):
    """`rlp-jax compile`'s periodic-benchmark programs (`runner.lowered_programs`) against what
    `runner.evaluate` runs: a tiny model evaluates a toy task and GSM8K (greedy and sampled, prompts
    of several widths) and SciQ by log-likelihood. Every lowered program is one the evaluation
    runs, and every program it runs is covered by a lowered one of the same kind (sampler settings
    and samples; scoring) at least as wide."""
    from rlp_jax import sampling, sharding
    from rlp_jax.benchmarks import loglik, text
    from rlp_jax.models import ModelConfig, init_model

    generate, score = _Recorder(sampling.generate_program), _Recorder(loglik.score_batch)
    monkeypatch.setattr(sampling, "generate_program", generate)
    monkeypatch.setattr(loglik, "score_batch", score)
    model = init_model(ModelConfig("qwen3", 260, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 2048), seed=0)
    tok = text.load("bytes")
    settings = runner.Settings(prompt_format="plain", math_samples=2, math_greedy=True, choice_mode="loglik",
                               max_new_tokens=4, batch_size=8, limit=12)
    task_list = [tasks.TASKS[name] for name in ("demo_addition", "gsm8k", "sciq")]
    runner.evaluate(model, tok, task_list, settings)
    loaded = [(task, task.load(None, settings.limit)) for task in task_list]
    mesh = sharding.make_mesh((8, 1, 1))
    graphdef, params = nnx.split(model)
    programs = runner.lowered_programs(graphdef, params, tok, loaded, settings, max_len=2048, mesh=mesh)
    for _, lower in programs:
        lower()

    def check(recorder, widths):  # a program's kind: its signature but the widths
        kind = lambda sig: tuple(a for i, a in enumerate(sig) if i not in widths)  # noqa: E731
        width = lambda sig: sig[widths[0]][0][1]  # noqa: E731
        assert set(recorder.lowered) <= set(recorder.calls)  # each compiled program is one that runs
        for call in recorder.calls:  # and covers every program of its kind that runs
            assert any(kind(lowered) == kind(call) and width(lowered) >= width(call) for lowered in recorder.lowered)
        return {width(sig) for sig in recorder.calls}

    assert len(check(generate, (0, 1, 2))) >= 3  # prompts, lengths, key; gsm8k's prompts in several widths
    assert len(generate.lowered) == len(set(generate.lowered)) == 4  # two tasks, greedy and sampled
    assert len(check(score, (0, 1, 2, 3))) >= 2 and len(score.lowered) == 1
    assert [name for name, _ in programs] == [
        "benchmark: demo_addition greedy", "benchmark: demo_addition sampled", "benchmark: gsm8k greedy",
        "benchmark: gsm8k sampled", "benchmark: sciq option log-likelihoods"]


# ---------------------------------------------------------------- during training

def tiny_config(data_dir, **eval_overrides):
    """The trainer tests' tiny run (8 devices, mesh (8, 1, 1)), 4 steps, checkpoints every 2, with a
    benchmark of 4 demo_addition items every 2 steps. Next-token steps on the same prompts: the
    trainer loop, state and checkpoints of an RLP run at half its compile time."""
    c = config_lib.load_config(TINY, [f"data.data_dir={data_dir}", "train.steps=4", "checkpoint.every_steps=2",
                                      "rlp.objective=ntp",
                                      "eval.benchmark_tasks=('demo_addition',)", "eval.benchmark_every_steps=2",
                                      "eval.benchmark_limit=4", "eval.benchmark_samples=2",
                                      "eval.benchmark_temperature=1.0", "eval.benchmark_batch_size=8"])
    for key, value in eval_overrides.items():
        config_lib.apply_override(c, f"eval.{key}={value}")
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("bench_run")
    result = trainer.train(tiny_config(data_dir), workdir, echo=lambda *_: None)
    return workdir, result


def test_bench_scores_are_logged_at_the_cadence_and_match_the_checkpoints(bench_run):
    workdir, result = bench_run
    rows = read_jsonl(workdir / "bench.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert [r["step"] for r in result.benchmarks] == [0, 2, 4]
    keys = {"demo_addition", "demo_addition/greedy", "demo_addition/pass@1", "demo_addition/first_digit_greedy",
            "demo_addition/first_digit_pass@1"}
    assert all(keys <= set(r) for r in rows)
    # The per-item records: 4 items a step, 1 greedy + 2 sampled responses each; the logged numbers
    # are their means.
    samples = read_jsonl(workdir / "bench_samples.jsonl")
    assert [(r["step"], r["id"]) for r in samples] == [(s, f"demo_addition/{20000 + i}")
                                                       for s in (0, 2, 4) for i in range(4)]
    for row in rows:
        mine = [r for r in samples if r["step"] == row["step"]]
        assert all(len(r["greedy"]) == 1 and len(r["sampled"]) == 2 for r in mine)
        sampled = np.array([[s["correct"] for s in r["sampled"]] for r in mine])
        assert row["demo_addition"] == row["demo_addition/pass@1"] == pytest.approx(sampled.mean())
        assert row["demo_addition/first_digit_greedy"] == pytest.approx(
            np.mean([r["greedy"][0]["first_digit"] for r in mine]))
        for r in mine:
            for s in r["greedy"] + r["sampled"]:
                assert (s["correct"], s["extracted"], s["first_digit"]) == graders.grade_toy(r["answer"], s["response"])
    # The same numbers (and responses) from the saved checkpoints of steps 2 and 4, evaluated afresh.
    settings = training.settings_from_config(tiny_config("unused"))
    for row in rows[1:]:
        direct = runner.evaluate_run_dir(workdir, ["demo_addition"], settings, step=row["step"], with_records=True)
        assert direct["step"] == row["step"]
        assert training.scores(direct) == {k: v for k, v in row.items() if k != "step"}
        assert [r["sampled"] for r in direct["records"]] == [r["sampled"] for r in samples if r["step"] == row["step"]]
    assert (workdir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((workdir / "summary.json").read_text())["last_bench"] == result.benchmarks[-1]
    logged = tensorboard_scalars(workdir, "bench/demo_addition")  # float32 there
    assert [s for s, _ in logged] == [0, 2, 4]
    assert [v for _, v in logged] == pytest.approx([r["demo_addition"] for r in rows], abs=1e-7)
    assert [s for s, _ in tensorboard_scalars(workdir, "bench/demo_addition/first_digit_greedy")] == [0, 2, 4]


def tensorboard_scalars(workdir, tag) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the run's TensorBoard event files (TFRecord framing read by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4  # length, its crc, the record, its crc
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


def test_a_resumed_run_logs_no_benchmark_twice(tmp_path, data_dir, bench_run):
    """Stopped after step 3 (bench at 0 and 2 logged), resumed to the end, then rerun once finished
    (which redoes only the final evaluation): every step once, the numbers of the uninterrupted run."""
    want = read_jsonl(bench_run[0] / "bench.jsonl")
    config = tiny_config(data_dir)
    first = trainer.train(config, tmp_path, echo=lambda *_: None, stop_after=3)
    assert first.stopped_by_signal and [r["step"] for r in read_jsonl(tmp_path / "bench.jsonl")] == [0, 2]
    with (tmp_path / "bench.jsonl").open("a") as f:  # what a run killed after its step-4 bench left
        f.write(json.dumps({"step": 4, "demo_addition": -1.0}) + "\n")
    trainer.train(config, tmp_path, echo=lambda *_: None)
    trainer.train(config, tmp_path, echo=lambda *_: None)  # finished: resumes at step 4, redoes the final bench
    assert read_jsonl(tmp_path / "bench.jsonl") == want
    assert [r["step"] for r in read_jsonl(tmp_path / "bench_samples.jsonl")] == [s for s in (0, 2, 4) for _ in range(4)]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_benchmark_without_its_data_is_refused_before_the_first_step(tmp_path, data_dir):
    config = tiny_config(data_dir, benchmark_tasks="('aime25',)")
    with pytest.raises(config_lib.ConfigError) as error:
        trainer.train(config, tmp_path / "run", echo=lambda *_: None)
    assert str(error.value) == ("eval.benchmark_tasks: aime25 needs the local file aime25.jsonl (no package ships "
                                "it); put it in a folder and set --config.eval.benchmark_data_dir to that folder "
                                "(format: docs/evaluation.md).")
    assert not (tmp_path / "run").exists()
    config = tiny_config(data_dir, benchmark_tasks="('gsm8k',)")  # the demo tokenizer has no capital letters
    with pytest.raises(config_lib.ConfigError, match="tokenizer 'demo' cannot encode the prompts of benchmark task "
                                                     "gsm8k"):
        trainer.train(config, tmp_path / "run", echo=lambda *_: None)
