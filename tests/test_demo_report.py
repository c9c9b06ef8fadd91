"""The demo's report (rlp_jax.demo.write_report) and the README's demo numbers.

README.md states the numbers of one recorded demo run, docs/demo_summary.json holds that run's
summary.json: the first test keeps the two from drifting apart. The others build a small run
folder by hand and check the verdict's numbers and wording, summary.json and the plots.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlp_jax import demo

ROOT = Path(__file__).resolve().parents[1]
NUM = r"([+\-]?\d+(?:\.\d+)?)"


def _readme_demo_sentence() -> str:
    """The README paragraph that states the recorded demo run's numbers, minus signs as ASCII."""
    text = (ROOT / "README.md").read_text().replace("−", "-")
    match = re.search(r"What the demo showed.*?\n\n", text, re.S)
    assert match, "README.md lost its 'What the demo showed' paragraph"
    return " ".join(match.group(0).split())


def _find(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in {text!r}"
    return match.groups()


def test_readme_numbers_are_the_recorded_runs():
    summary = json.loads((ROOT / "docs" / "demo_summary.json").read_text())
    before, after, config = summary["before"], summary["after"], summary["config"]
    text = _readme_demo_sentence()

    positions, = _find(r"(\d+) held-out positions", text)
    assert int(positions) == after["num_positions"] == config["eval_positions"]
    steps, batch, rollouts, length = _find(r"(\d+) RLP steps of B=(\d+) prompts × G=(\d+) thoughts of up to L=(\d+)", text)
    assert (int(steps), int(batch), int(rollouts), int(length)) == (
        summary["rlp_steps_done"], config["batch_size"], config["num_rollouts"], config["max_thought_len"])
    assert int(steps) == config["steps"]
    gain = _find(rf"frozen start model {NUM} ± {NUM} → {NUM} ± {NUM} nats", text)
    assert gain == (f"{before['gain_start']:+.2f}", f"{before['gain_start_se']:.2f}",
                    f"{after['gain_start']:+.2f}", f"{after['gain_start_se']:.2f}")
    think = _find(rf"with a greedy thought {NUM}% → {NUM}%", text)
    assert think == (f"{100 * before['acc_greedy_think']:.1f}", f"{100 * after['acc_greedy_think']:.1f}")
    no_think = _find(rf"without a thought {NUM}% → {NUM}%", text)
    assert no_think == (f"{100 * before['acc_no_think']:.1f}", f"{100 * after['acc_no_think']:.1f}")
    whole = _find(rf"greedy {NUM}% → {NUM}%", text)
    bench = summary["benchmark"]
    assert whole == (f"{100 * bench['warmup']['bench_greedy']:.1f}", f"{100 * bench['rlp']['bench_greedy']:.1f}")
    assert f"answer of {bench['rlp']['bench_items']} held-out problems" in text
    seconds, = _find(r"\((\d+) s in all", text)
    assert seconds == f"{summary['total_seconds']:.0f}"


def test_readme_keeps_the_two_commands_and_names_the_paper():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert blocks == ["pip install -e . && rlp-jax demo", "bash tests/install.sh && python -m pytest -q tests"]
    assert "RLP: Reinforcement as a Pretraining Objective" in text and "2510.01265" in text


def _eval(step, gain, gain_se, acc, acc_no_think):
    """One eval.jsonl record with the keys write_report reads (standard errors chosen by hand)."""
    return {"step": step, "num_positions": 400,
            "gain_start": gain, "gain_start_se": gain_se, "gain_ema": gain + 0.01, "gain_ema_se": gain_se,
            "nll_think": 1.0, "nll_think_se": 0.05, "nll_no_think": 1.5, "nll_no_think_se": 0.05,
            "acc_greedy_think": acc, "acc_greedy_think_se": 0.02, "acc_think": acc - 0.05, "acc_think_se": 0.02,
            "acc_no_think": acc_no_think, "acc_no_think_se": 0.02, "thought_len_mean": 17.0,
            "truncated_frac": "nan"}  # as metrics_io writes a non-finite value


def _run_folder(root: Path, evals: list[dict]) -> Path:
    """WORKDIR with rlp/{metrics,eval,eval_samples}.jsonl and rlp/config.json, as the trainer writes them."""
    rlp = root / "rlp"
    rlp.mkdir(parents=True)
    write = lambda name, records: (rlp / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    write("metrics.jsonl", [{"step": s, "reward_mean": -0.4 + s / 100, "reward_std": 0.5} for s in range(10, 121, 10)])
    write("eval.jsonl", evals)
    write("eval_samples.jsonl", [{"step": e["step"], "samples": [
        {"context": "457+386=", "thought": "76013 58114 43108</think>", "target": "8", "predicted": "8"}]}
        for e in evals])
    (rlp / "config.json").write_text(json.dumps({
        "train": {"steps": 120, "batch_size": 16, "learning_rate": 5e-5},
        "rlp": {"num_rollouts": 4, "max_thought_len": 20, "temperature": 1.0, "ema_decay": 0.99},
        "eval": {"num_positions": 400}}))
    return root


def _verdict_line(workdir: Path) -> str:
    first = (workdir / "report.md").read_text().splitlines()[2]
    assert first.startswith("**Verdict:**")
    return first


def test_report_of_an_improving_run(tmp_path):
    workdir = _run_folder(tmp_path, [_eval(0, -1.0, 0.10, 0.40, 0.25), _eval(60, 0.0, 0.10, 0.50, 0.20),
                                     _eval(120, 0.5, 0.05, 0.70, 0.15)])
    summary = demo.write_report(workdir, warmup_seconds=12.0, total_seconds=99.6)

    line = _verdict_line(workdir)
    # change +1.50, s.e. sqrt(0.10² + 0.05²) = 0.11; accuracy +30.0 points, s.e. sqrt(2² + 2²) = 2.8
    assert line == ("**Verdict:** RLP raised the held-out information gain against the frozen start model "
                    "from -1.00 ± 0.10 to +0.50 ± 0.05 nats (change +1.50 ± 0.11); accuracy with a greedy "
                    "thought rose from 40.0% to 70.0% (change +30.0 ± 2.8 points).")
    report = (workdir / "report.md").read_text()
    assert "457+386=<think>76013 58114 43108</think>8" in report
    assert "Accuracy without a thought dropped: 25.0% → 15.0% (change -10.0 ± 2.8 points" in report
    assert "hypothesis" in report and "Wall time: 100 s in all (warm-up 12 s)." in report

    assert summary == json.loads((workdir / "summary.json").read_text())
    assert summary["verdict"] == line
    assert summary["before"]["step"] == 0 and summary["after"]["step"] == summary["rlp_steps_done"] == 120
    assert summary["change"]["gain_start"]["delta"] == pytest.approx(1.5)
    assert summary["change"]["gain_start"]["se"] == pytest.approx((0.10 ** 2 + 0.05 ** 2) ** 0.5)
    assert summary["change"]["acc_no_think"]["delta"] == pytest.approx(-0.10)
    assert summary["total_seconds"] == 99.6 and summary["warmup_seconds"] == 12.0
    assert summary["config"] == {"task": "addition", "warmup_steps": None, "steps": 120, "batch_size": 16, "num_rollouts": 4,
                                 "max_thought_len": 20, "eval_positions": 400, "learning_rate": 5e-5,
                                 "temperature": 1.0, "ema_decay": 0.99}
    for name in ("reward.png", "gain.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_run_within_noise(tmp_path):
    # gain change +0.15 against s.e. sqrt(0.1² + 0.1²) = 0.14: within 2 standard errors
    workdir = _run_folder(tmp_path, [_eval(0, -0.30, 0.10, 0.400, 0.25), _eval(120, -0.15, 0.10, 0.385, 0.24)])
    summary = demo.write_report(workdir)

    line = _verdict_line(workdir)
    assert line == ("**Verdict:** RLP did not measurably change the held-out information gain against the "
                    "frozen start model, which went from -0.30 ± 0.10 to -0.15 ± 0.10 nats (change +0.15 ± "
                    "0.14), within 2 standard errors of no change; accuracy with a greedy thought went "
                    "from 40.0% to 38.5% (change -1.5 ± 2.8 points), within 2 standard errors of no change.")
    report = (workdir / "report.md").read_text()
    assert "raised" not in line and "did not drop by more than 2 standard errors: 25.0% → 24.0%" in report
    assert "Wall time" not in report and summary["total_seconds"] is None


def test_verdict_of_a_run_that_got_worse():
    line = demo.verdict(_eval(0, 0.2, 0.05, 0.6, 0.3), _eval(90, -0.4, 0.05, 0.3, 0.3))
    assert line.startswith("**Verdict:** RLP lowered the held-out information gain against the frozen start "
                           "model from +0.20 ± 0.05 to -0.40 ± 0.05 nats (change -0.60 ± 0.07)")
    assert line.endswith("accuracy with a greedy thought fell from 60.0% to 30.0% (change -30.0 ± 2.8 points).")
    assert "only one held-out evaluation (step 0)" in demo.verdict(_eval(0, 0.2, 0.05, 0.6, 0.3),
                                                                    _eval(0, 0.2, 0.05, 0.6, 0.3))


def test_carry_and_cups_task_stages_and_report(tmp_path):
    """`demo --task carry` runs the carry corpus (6-digit prompts, 40-token thoughts, a longer
    warm-up), `--task cups` the cups corpus, and the report says which task it was."""
    from rlp_jax.configs import demo as demo_configs

    warm, rlp = demo_configs.stages("carry")
    assert (warm.data.demo_variant, warm.train.steps, warm.data.seq_len) == ("carry_worked", 250, 64)
    assert (rlp.data.demo_variant, rlp.data.max_context, rlp.rlp.max_thought_len) == ("carry_plain", 16, 40)
    assert demo_configs.stages("addition")[1].data.demo_variant == "plain"
    warm, rlp = demo_configs.stages("cups")  # prompt BOS + 10 swaps + "=", thought 10 cups + </think>
    assert (warm.data.demo_variant, warm.train.steps, warm.data.seq_len) == ("cups_worked", 100, 32)
    assert (rlp.data.demo_variant, rlp.data.max_context, rlp.rlp.max_thought_len) == ("cups_plain", 12, 12)
    with pytest.raises(ValueError, match="unknown demo task 'mul'"):
        demo_configs.stages("mul")
    workdir = _run_folder(tmp_path, [_eval(0, -1.0, 0.1, 0.5, 0.3), _eval(120, 0.5, 0.1, 0.8, 0.3)])
    config = json.loads((workdir / "rlp" / "config.json").read_text())
    config["data"] = {"demo_variant": "carry_plain"}
    (workdir / "rlp" / "config.json").write_text(json.dumps(config))
    summary = demo.write_report(workdir)
    assert summary["config"]["task"] == "carry"
    assert "RLP on 6-digit additions whose leading digit hangs on a long carry chain" in (workdir / "report.md").read_text()
    config["data"] = {"demo_variant": "cups_plain"}
    (workdir / "rlp" / "config.json").write_text(json.dumps(config))
    assert demo.write_report(workdir)["config"]["task"] == "cups"
    report = (workdir / "report.md").read_text()
    assert "RLP on a ball under 3 cups after 10 swaps" in report
    assert "the cup the ball is under after each swap" in report and "column" not in report.split("## What")[1]


def test_report_carries_the_benchmark_table(tmp_path):
    workdir = _run_folder(tmp_path, [_eval(0, -1.0, 0.1, 0.5, 0.3), _eval(120, 0.5, 0.1, 0.8, 0.3)])
    bench = {"warmup": {"bench_pass@1": 0.125, "bench_greedy": 0.25, "bench_items": 64},
             "rlp": {"bench_pass@1": 0.375, "bench_greedy": 0.5, "bench_items": 64}}
    summary = demo.write_report(workdir, bench=bench)
    assert summary["benchmark"] == bench
    report = (workdir / "report.md").read_text()
    assert "| pass@1, 4 samples at T=1 | 0.125 | 0.375 |" in report and "| greedy | 0.250 | 0.500 |" in report
