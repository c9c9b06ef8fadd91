"""Benchmark accuracy during training (`eval.benchmark_*` in the config; docs/evaluation.md).

The trainer calls `PeriodicBenchmark.run` with the run's current params at step 0, every
`eval.benchmark_every_steps` and at the end (the cadence of the held-out evaluation). Each call
appends to WORKDIR:

- `bench.jsonl`: one record per evaluation, `{"step", "<task>": score, "<task>/<number>": ...,
  "<suite>": score}` (also in TensorBoard as `bench/<task>`, ...);
- `bench_samples.jsonl`: one record per item, `{"step", "task", "id", "answer", "greedy": [...],
  "sampled": [...]}` with every response, its extracted answer and its grade;
- `bench.png`: every task's score against the step, with greedy accuracy (dashed) and, for the
  toy tasks, first-digit accuracy (dotted).

The numbers are those of `runner.evaluate_run_dir` on the checkpoint of that step with
`settings_from_config(config)`: the same items, prompts, seeds and batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax

from rlp_jax import sharding
from rlp_jax.benchmarks import runner, tasks, text
from rlp_jax.benchmarks.tasks import BenchmarkError, Task

# The per-task numbers logged beside the score (when the protocol has them).
LOGGED = ("greedy", "pass@1", "first_digit_greedy", "first_digit_pass@1", "acc", "acc_norm")


def settings_from_config(config) -> runner.Settings:
    """The benchmark settings of a run's `eval.benchmark_*` keys (sampling seed: the run's seed)."""
    e = config.eval
    return runner.Settings(prompt_format=e.benchmark_prompt_format, math_samples=e.benchmark_samples,
                           math_greedy=e.benchmark_greedy, choice_mode=e.benchmark_choice_mode,
                           choice_samples=e.benchmark_samples, temperature=e.benchmark_temperature,
                           top_p=e.benchmark_top_p, max_new_tokens=e.benchmark_max_new_tokens, seed=config.seed,
                           batch_size=e.benchmark_batch_size, limit=e.benchmark_limit)


def data_dir(config) -> str | None:
    return str(config.eval.benchmark_data_dir) or None


def tasks_from_config(config) -> list[Task]:
    """The tasks of `eval.benchmark_tasks`; the toy tasks on the run's own demo corpus (its seed)."""
    return tasks.resolve(tuple(config.eval.benchmark_tasks), demo_seed=int(config.seed))


def check(config) -> None:
    """Raises a BenchmarkError (one sentence) unless every task of `eval.benchmark_tasks` has its
    data and the run's tokenizer can encode its first prompt."""
    settings = settings_from_config(config)
    tok = text.load(config.tokenizer)
    for task in tasks_from_config(config):
        item = task.load(data_dir(config), 1)[0]
        try:
            tok.encode_prompt(runner.prompt_text(task, item, settings))
        except ValueError as error:
            reason = str(error).split(";")[0].rstrip(".")
            raise BenchmarkError(f"tokenizer {config.tokenizer!r} cannot encode the prompts of benchmark task "
                                 f"{task.name} ({reason}); drop it from eval.benchmark_tasks or train with a "
                                 "tokenizer that can (the demo tokenizer suits the demo_* tasks).") from None


def scores(result: dict) -> dict[str, float]:
    """The flat record of one evaluation: `<task>` (its score), `<task>/<number>` (LOGGED) and
    `<suite>` (the mean score of a suite whose every task was evaluated)."""
    out: dict[str, float] = {}
    for name, numbers in result["tasks"].items():
        out[name] = numbers["score"]
        out |= {f"{name}/{k}": numbers[k] for k in LOGGED if k in numbers}
    out |= {suite.replace(" ", "_"): v["score"] for suite, v in result["suites"].items()}
    return out


def lowered_programs(config, graphdef, abstract_params, max_len: int, mesh, rules, notes: list[str]
                     ) -> list[tuple[str, Callable]]:
    """`(name, lower)` of the programs `PeriodicBenchmark.run` runs (`runner.lowered_programs`, each
    at its widest batch), for `rlp-jax compile`. The tasks' items are read here (the packaged sets
    and the toy tasks are local; a set only on the cluster is refused by its loader); without the
    run's tokenizer, prompts are counted one token per byte plus a start token, an upper bound
    for a BPE tokenizer (noted in `notes`)."""
    settings = runner.fit_batch(settings_from_config(config), mesh)
    try:
        tok = text.load(config.tokenizer)
    except BenchmarkError:
        tok = text.BenchmarkTokenizer(lambda s: [0, *s.encode()], lambda s: list(s.encode()), lambda ids: "", (1,), 0,
                                      256, "bytes stand-in")
        notes.append("benchmark prompts counted one token per byte plus a start token (the tokenizer is not here)")
    else:
        check(config)  # the tokenizer encodes the tasks' prompts, as `rlp-jax train` checks
    loaded = [(task, task.load(data_dir(config), settings.limit)) for task in tasks_from_config(config)]
    return runner.lowered_programs(graphdef, abstract_params, tok, loaded, settings, max_len=max_len, mesh=mesh,
                                   rules=rules)


class PeriodicBenchmark:
    """The benchmark tasks of a run, loaded once, evaluated on the run's mesh whenever `run` is
    called (on every process: the generation is collective; only process 0 writes)."""

    def __init__(self, config, workdir: str | Path, mesh, rules=sharding.DEFAULT_RULES, writer=None,
                 echo: Callable[[str], None] = print):
        self.workdir, self.mesh, self.rules, self.writer, self.echo = Path(workdir), mesh, rules, writer, echo
        self.settings = runner.fit_batch(settings_from_config(config), mesh)
        self.data_dir = data_dir(config)
        self.tasks = []
        for task in tasks_from_config(config):  # each task's first `limit` items, read once for the run
            items = task.load(self.data_dir, self.settings.limit)
            self.tasks.append(dataclasses.replace(task, loader=lambda _dir, items=items: items))
        self.tok = text.load(config.tokenizer)

    def run(self, graphdef, params, step: int) -> dict:
        """Evaluates the model `(graphdef, params)`; logs and returns `{"step", **scores}`."""
        from flax import nnx

        t0 = time.perf_counter()
        result, records = runner.evaluate(nnx.merge(graphdef, params), self.tok, self.tasks, self.settings,
                                          data_dir=self.data_dir, mesh=self.mesh, rules=self.rules)
        flat = scores(result)
        if self.writer is not None:
            self.writer.write(step, flat, file="bench.jsonl")
        if jax.process_index() == 0:
            with open(self.workdir / "bench_samples.jsonl", "a", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps({"step": step} | record, ensure_ascii=False) + "\n")
            plot(self.workdir / "bench.jsonl", self.workdir / "bench.png")
        self.echo(f"bench @ {step}: " + "; ".join(_line(name, t) for name, t in result["tasks"].items())
                  + f" ({time.perf_counter() - t0:.0f}s)")
        return {"step": step} | flat


def _line(name: str, numbers: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    extra = [f"greedy {pct(numbers['greedy'])}"] if "greedy" in numbers and "pass@1" in numbers else []
    extra += [f"first digit {pct(numbers['first_digit_pass@1' if 'pass@1' in numbers else 'first_digit_greedy'])}"
              ] if "first_digit_greedy" in numbers or "first_digit_pass@1" in numbers else []
    return (f"{name} {pct(numbers['score'])} ({numbers['protocol']}, {numbers['num_items']} items"
            + "".join(f", {e}" for e in extra) + ")")


def plot(history: str | Path, out: str | Path) -> None:
    """`out` (PNG): each task's (and suite's) score in bench.jsonl `history` against the step, with
    greedy accuracy (dashed) and first-digit accuracy (dotted) in the same colour where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from rlp_jax.metrics_io import read_jsonl

    rows = sorted(read_jsonl(history), key=lambda r: r["step"])
    names = list(dict.fromkeys(k for r in rows for k in r if k != "step" and "/" not in k))
    if not names:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, name in enumerate(names):
        sampled = f"{name}/pass@1" in rows[-1]  # else the score is the greedy accuracy itself
        first = f"{name}/first_digit_pass@1" if sampled else f"{name}/first_digit_greedy"
        for key, style, label in ((name, "-", name), (f"{name}/greedy", "--", f"{name} greedy"),
                                  (first, ":", f"{name} first digit")):
            points = [(r["step"], 100 * r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points and (key != f"{name}/greedy" or sampled):
                ax.plot(*zip(*points), style, marker="o", color=f"C{i}", label=label)
    ax.set_ylim(-2, 102)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("benchmark score (%)")
    ax.set_title("benchmark accuracy during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
