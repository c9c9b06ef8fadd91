"""`rlp-jax demo`: RLP learning to think, on CPU, in minutes.

1. Build the demo corpus (3-digit additions; with `task="carry"` 6-digit ones whose leading
   digit hangs on a long carry chain; with `task="cups"` a ball under 3 swapped cups;
   rlp_jax.data.demo_corpus).
2. Warm-start a small model with next-token prediction on the worked-thought variant, briefly
   (configs/demo.py `warmup_config`; configs/demo_carry.py, configs/demo_cups.py).
3. RLP on the plain documents, prompts at the first answer digit, from the warm-started weights,
   with held-out evaluation before, during and after (configs/demo.py `get_config`).
4. WORKDIR/report.md (a verdict computed from the numbers first), summary.json, and PNG plots:
   reward and held-out information gain against step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

from rlp_jax.ablate import benchmark_numbers
from rlp_jax.configs import demo as demo_configs


def run_demo(workdir: str | Path, *, task: str = "addition", warmup_steps: int | None = None,
             rlp_steps: int | None = None, eval_positions: int | None = None,
             echo: Callable[[str], None] = print) -> dict:
    """Runs the whole demo of `task` (`addition`, `carry` or `cups`) in `workdir` (resumable: rerun to
    continue) and writes the report."""
    from rlp_jax import trainer

    workdir = Path(workdir).absolute()
    t0 = time.perf_counter()
    warm, rlp = demo_configs.stages(task)
    data_dir = str(workdir / "data")
    warm.data.data_dir = rlp.data.data_dir = data_dir
    if warmup_steps is not None:
        warm.train.steps = warm.checkpoint.every_steps = warmup_steps
    if rlp_steps is not None:
        rlp.train.steps = rlp_steps
        rlp.eval.every_steps = rlp.checkpoint.every_steps = max(rlp_steps // 3, 1)
    if eval_positions is not None:
        rlp.eval.num_positions = eval_positions
    rlp.init.kind, rlp.init.path = "checkpoint", str(workdir / "warmup")

    echo(f"[1/2] warm-up: next-token prediction on worked thoughts ({warm.train.steps} steps)")
    trainer.train(warm, workdir / "warmup", echo=echo)
    t_warm = time.perf_counter() - t0
    echo(f"[2/2] RLP at the first answer digit ({rlp.train.steps} steps, B={rlp.train.batch_size}, "
         f"G={rlp.rlp.num_rollouts}, L={rlp.rlp.max_thought_len})")
    result = trainer.train(rlp, workdir / "rlp", echo=echo)
    echo("benchmark: the held-out problems' whole answers, before and after RLP")
    bench = {stage: benchmark_numbers(workdir / stage, task, min(256, rlp.eval.num_positions))
             for stage in ("warmup", "rlp")}
    total = time.perf_counter() - t0
    summary = write_report(workdir, warmup_seconds=t_warm, total_seconds=total, bench=bench)
    echo(f"report: {workdir / 'report.md'}  ({total:.0f} s in all)")
    return summary | {"stopped_by_signal": result.stopped_by_signal}


def write_report(workdir: Path, warmup_seconds: float | None = None, total_seconds: float | None = None,
                 bench: dict | None = None) -> dict:
    """WORKDIR/report.md, reward.png, gain.png and summary.json from the RLP stage's metrics and
    evaluations (the first evaluation is "before", the last "after"), and `bench`
    (`{"warmup": numbers, "rlp": numbers}` of `ablate.benchmark_numbers`) when given. Returns the
    summary."""
    from rlp_jax.metrics_io import read_jsonl

    workdir = Path(workdir)
    rlp_dir = workdir / "rlp"
    metrics = read_jsonl(rlp_dir / "metrics.jsonl")
    evals = read_jsonl(rlp_dir / "eval.jsonl")
    samples = read_jsonl(rlp_dir / "eval_samples.jsonl")
    if not evals:
        raise RuntimeError(f"{rlp_dir} has no evaluations yet; run the demo to the end first.")
    before, after = evals[0], evals[-1]
    settings = _settings(workdir)
    _plot(metrics, evals, workdir, settings)

    def row(name, label, fmt="{:+.3f}"):
        b, a = _num(before, name), _num(after, name)
        bse, ase = _num(before, name + "_se"), _num(after, name + "_se")
        cell = lambda v, se: (fmt.format(v) + (f" ± {se:.3f}" if se is not None else "")) if v is not None else "—"
        return f"| {label} | {cell(b, bse)} | {cell(a, ase)} |"

    headline = verdict(before, after)
    lines = [
        "# rlp-jax demo report", "",
        headline, "",
        f"RLP on {_TASK_TEXT[settings.get('task') or 'addition']}: prompts at the first answer digit, G thoughts each,",
        "reward = log-likelihood gain of the true digit over the no-think EMA teacher.", "",
        f"Held-out positions: {int(_num(after, 'num_positions') or 0)} (validation split; problems never "
        "seen in training). Means ± standard error over positions. A change counts as real when it is "
        "more than 2 standard errors of the difference from zero.", "",
        f"| held-out | before RLP (step {int(before['step'])}) | after RLP (step {int(after['step'])}) |",
        "|---|---|---|",
        row("gain_start", "information gain vs the frozen start model (nats)"),
        row("gain_ema", "information gain vs the EMA teacher (nats)"),
        row("nll_think", "NLL of the answer digit, with a sampled thought", "{:.3f}"),
        row("nll_no_think", "NLL of the answer digit, no thought", "{:.3f}"),
        row("acc_greedy_think", "accuracy, greedy thought", "{:.3f}"),
        row("acc_think", "accuracy, sampled thought", "{:.3f}"),
        row("acc_no_think", "accuracy, no thought", "{:.3f}"),
        row("thought_len_mean", "thought length (tokens)", "{:.1f}"),
        "",
        "The gain against the frozen start model is the honest one: it cannot rise because the",
        "teacher got worse. Scoring masks the think markers out of both distributions (a no-think",
        "model that expects `<think>` at answers would otherwise hand thoughts a free gain).", "",
        *_thought_format(samples, settings.get("task") or "addition"), "",
        *_no_think_note(before, after), "",
        *_bench_section(bench), 
        "![reward](reward.png) ![gain](gain.png)", "",
    ]
    if samples:
        lines += ["## Thoughts after RLP (held-out)", "", "| context | thought | true | predicted |", "|---|---|---|---|"]
        for s in samples[-1]["samples"]:
            lines.append(f"| `{s['context']}` | `{s['thought']}` | `{s['target']}` | `{s['predicted']}` |")
        lines.append("")
    if total_seconds is not None:
        warm = f" (warm-up {warmup_seconds:.0f} s)" if warmup_seconds is not None else ""
        lines.append(f"Wall time: {total_seconds:.0f} s in all{warm}.")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    summary = {"verdict": headline, "before": before, "after": after,
               "change": {name: dict(zip(("delta", "se"), _change(before, after, name)))
                          for name in _COMPARED if _num(after, name) is not None},
               "rlp_steps_done": int(after["step"]), "total_seconds": total_seconds,
               "warmup_seconds": warmup_seconds, "config": settings}
    if bench:
        summary["benchmark"] = bench
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


_TASK_TEXT = {"addition": "3-digit additions (`457+386=843`)",
              "carry": "6-digit additions whose leading digit hangs on a long carry chain (`471596+215403=687000`)",
              "cups": "a ball under 3 cups after 10 swaps (`lrolrrolol=3`)"}

# What the warm-up's worked thought is, per task (the report's "What the model sees").
_WORKED_TEXT = {
    "addition": ["column by column from the units: both digits, the carry in and the two-digit column",
                 "sum (`7+6+0 = 13` is written `76013`)"],
    "cups": ["the cup the ball is under after each swap (`lro` from cup 1 is written `231`)"],
}
_WORKED_TEXT["carry"] = _WORKED_TEXT["addition"]

def _bench_section(bench: dict | None) -> list[str]:
    """The report's benchmark table: the whole answer, scored as `rlp-jax evaluate` scores real
    suites, so that the toy speaks the paper's metric."""
    if not bench:
        return []
    before, after = bench["warmup"], bench["rlp"]
    return ["## The whole answer, as `rlp-jax evaluate` scores benchmarks", "",
            f"The first {after['bench_items']} held-out problems, the model prompted with the problem up to `=` and "
            "left to open its own thought; graded on the digits after `</think>` (docs/evaluation.md). RLP trains "
            "only the first answer digit, so where the answer is longer this is the transfer to the rest of it.", "",
            "| | before RLP | after RLP |", "|---|---|---|",
            f"| pass@1, 4 samples at T=1 | {before['bench_pass@1']:.3f} | {after['bench_pass@1']:.3f} |",
            f"| greedy | {before['bench_greedy']:.3f} | {after['bench_greedy']:.3f} |", ""]


# Metrics whose before → after change summary.json records.
_COMPARED = ("gain_start", "gain_ema", "nll_think", "nll_no_think", "acc_greedy_think", "acc_think", "acc_no_think")


def _num(record: dict, name: str) -> float | None:
    """`record[name]` as a float (eval.jsonl stores non-finite values as strings), or None."""
    value = record.get(name)
    return None if value is None else float(value)


def _change(before: dict, after: dict, name: str) -> tuple[float, float]:
    """after − before of metric `name` and its standard error.

    Both evaluations score the same positions, so the paired standard error would be smaller;
    treating them as independent, sqrt(se_b² + se_a²), is the conservative choice when they are
    positively correlated, and is all that eval.jsonl's summaries allow."""
    delta = _num(after, name) - _num(before, name)
    se_b, se_a = _num(before, name + "_se"), _num(after, name + "_se")
    se = math.sqrt(se_b ** 2 + se_a ** 2) if se_b is not None and se_a is not None else math.nan
    return delta, se


def _direction(delta: float, se: float) -> int:
    """+1 / −1 when the change is more than 2 standard errors up / down, else 0 (NaN se: 0)."""
    return 1 if delta > 2 * se else -1 if delta < -2 * se else 0


def verdict(before: dict, after: dict) -> str:
    """The report's one-line verdict: did RLP raise the held-out gain against the frozen start
    model and the accuracy with a greedy thought, by more than 2 standard errors of the change?"""
    if int(before["step"]) == int(after["step"]):
        return f"**Verdict:** only one held-out evaluation (step {int(after['step'])}); no before/after comparison yet."
    g_b, g_a = _num(before, "gain_start"), _num(after, "gain_start")
    g_se_b, g_se_a = _num(before, "gain_start_se"), _num(after, "gain_start_se")
    g_delta, g_se = _change(before, after, "gain_start")
    a_b, a_a = 100 * _num(before, "acc_greedy_think"), 100 * _num(after, "acc_greedy_think")
    a_delta, a_se = _change(before, after, "acc_greedy_think")
    gains = f"from {g_b:+.2f} ± {g_se_b:.2f} to {g_a:+.2f} ± {g_se_a:.2f} nats (change {g_delta:+.2f} ± {g_se:.2f})"
    acc = f"from {a_b:.1f}% to {a_a:.1f}% (change {100 * a_delta:+.1f} ± {100 * a_se:.1f} points)"
    gain_clause = {
        1: f"RLP raised the held-out information gain against the frozen start model {gains}",
        0: f"RLP did not measurably change the held-out information gain against the frozen start model, "
           f"which went {gains}, within 2 standard errors of no change",
        -1: f"RLP lowered the held-out information gain against the frozen start model {gains}",
    }[_direction(g_delta, g_se)]
    acc_clause = {
        1: f"accuracy with a greedy thought rose {acc}",
        0: f"accuracy with a greedy thought went {acc}, within 2 standard errors of no change",
        -1: f"accuracy with a greedy thought fell {acc}",
    }[_direction(a_delta, a_se)]
    return f"**Verdict:** {gain_clause}; {acc_clause}."


def _thought_format(samples: list[dict], task: str = "addition") -> list[str]:
    """The report section on what the model sees at a prompt, with one real held-out example."""
    *worked, last = _WORKED_TEXT[task]
    lines = [
        "## What the model sees", "",
        "Each prompt is a held-out problem cut right after `=`. The model writes `<think>`, then up to",
        "L thought tokens of its own, then `</think>` (sampled, or forced at L), and is scored on the",
        "true next token: the first answer digit. The warm-up taught a worked format,",
        *worked, f"{last}; RLP rewards whatever thought raises the likelihood of the answer digit.",
        "Without a thought, the same digit is scored right after `=`.",
    ]
    example = next((s for record in reversed(samples) for s in record.get("samples", [])), None)
    if example is not None:
        thought = example["thought"].removesuffix("</think>")
        lines += ["", f"A held-out example from the evaluation at step {int(samples[-1]['step'])}:", "",
                  "```", f"{example['context']}<think>{thought}</think>{example['target']}", "```", "",
                  f"context `{example['context']}`, thought `{thought}`, true next token `{example['target']}` "
                  f"(the model predicted `{example['predicted']}` after this thought)."]
    return lines


def _no_think_note(before: dict, after: dict) -> list[str]:
    """The report's reading of accuracy without a thought, worded by what the numbers show."""
    if _num(after, "acc_no_think") is None or int(before["step"]) == int(after["step"]):
        return []
    nt_b, nt_a = 100 * _num(before, "acc_no_think"), 100 * _num(after, "acc_no_think")
    nt_delta, nt_se = _change(before, after, "acc_no_think")
    nll_b, nll_a = _num(before, "nll_no_think"), _num(after, "nll_no_think")
    numbers = (f"{nt_b:.1f}% → {nt_a:.1f}% (change {100 * nt_delta:+.1f} ± {100 * nt_se:.1f} points; "
               f"no-think NLL {nll_b:.3f} → {nll_a:.3f} nats)")
    think_up = _direction(*_change(before, after, "acc_greedy_think")) > 0
    both = " (accuracy with a greedy thought rose while this one fell)" if think_up else ""
    why = ("RLP's loss covers only the thought tokens: the answer digit right after `=`, with no "
           "thought, is never a training target, and the no-think score forces the model to answer "
           "directly, which is not what RLP optimises. A hypothesis consistent with these numbers"
           f"{both}, not tested here: the shared "
           "weights learn to rely on a thought before the answer digits, and the direct answer, which "
           "nothing rewards, drifts. Comparing with a run that continues the warm-up's next-token "
           "training for as many steps would test it.")
    heading = ["## Accuracy without a thought", ""]
    if _direction(nt_delta, nt_se) < 0:
        return heading + [f"Accuracy without a thought dropped: {numbers}. {why}"]
    return heading + [f"Accuracy without a thought did not drop by more than 2 standard errors: {numbers}. "
                      "RLP does not train the direct answer (the no-think score forces the model "
                      "to answer right after `=`, which RLP does not optimise), so it is not expected to "
                      "rise; any change there is a side effect of the updates to the shared weights."]


def _settings(workdir: Path) -> dict:
    """The run's settings that matter for its numbers, from the stages' saved config.json files."""
    def load(stage):
        path = workdir / stage / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    rlp, warm = load("rlp"), load("warmup")
    pick = lambda cfg, section, key: cfg.get(section, {}).get(key)
    variant = pick(rlp, "data", "demo_variant") or "plain"
    return {
        "task": next((task for task in ("carry", "cups") if variant.startswith(task)), "addition"),
        "warmup_steps": pick(warm, "train", "steps"),
        "steps": pick(rlp, "train", "steps"),
        "batch_size": pick(rlp, "train", "batch_size"),
        "num_rollouts": pick(rlp, "rlp", "num_rollouts"),
        "max_thought_len": pick(rlp, "rlp", "max_thought_len"),
        "eval_positions": pick(rlp, "eval", "num_positions"),
        "learning_rate": pick(rlp, "train", "learning_rate"),
        "temperature": pick(rlp, "rlp", "temperature"),
        "ema_decay": pick(rlp, "rlp", "ema_decay"),
    }


def _plot(metrics: list[dict], evals: list[dict], workdir: Path, settings: dict | None = None) -> None:
    """reward.png (training reward per step) and gain.png (held-out gains with error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = settings or {}
    steps = [m["step"] for m in metrics if "reward_mean" in m]
    rewards = [float(m["reward_mean"]) for m in metrics if "reward_mean" in m]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, rewards, lw=0.8, alpha=0.5, marker=".", label="batch mean reward, at each logged step")
    if len(rewards) >= 10:
        k = 10
        smooth = [sum(rewards[max(0, i - k + 1):i + 1]) / len(rewards[max(0, i - k + 1):i + 1]) for i in range(len(rewards))]
        ax.plot(steps, smooth, lw=2, label=f"running mean of the last {k} logged points")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("RLP step")
    ax.set_ylabel("reward (nats)")
    batch = (f"B={settings['batch_size']} prompts × G={settings['num_rollouts']} thoughts per step; "
             if settings.get("batch_size") and settings.get("num_rollouts") else "")
    ax.set_title("Training reward at the first answer digit: log p(digit | thought) − log p_EMA(digit)\n"
                 f"({batch}no error bars)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "reward.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [float(e["step"]) for e in evals]
    # The two series often coincide (the EMA teacher stays near the start model), so each gets its
    # own marker and line style and a small horizontal offset.
    offset = 0.015 * (max(xs) - min(xs) or 1.0)
    series = (("gain_start", "vs frozen start model", "o", "-", -offset),
              ("gain_ema", "vs EMA teacher", "s", "--", offset))
    for name, label, marker, style, dx in series:
        ys = [_num(e, name) for e in evals]
        se = [_num(e, name + "_se") or 0.0 for e in evals]
        ax.errorbar([x + dx for x in xs], ys, yerr=se, marker=marker, ls=style, capsize=3, mfc="none", label=label)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("RLP step (points of the two series shifted apart slightly to stay visible)", fontsize=8)
    ax.set_ylabel("held-out information gain (nats)")
    n = int(_num(evals[-1], "num_positions") or 0)
    ax.set_title("Held-out information gain at the first answer digit", fontsize=10)
    ax.legend(title=f"error bars: ± 1 standard error over {n} held-out positions", title_fontsize=8, fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "gain.png", dpi=120)
    plt.close(fig)
