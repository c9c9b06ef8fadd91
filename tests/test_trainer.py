"""The trainer through the real CLI: resume after kill -9 and SIGTERM is bitwise identical, a
corrupt latest checkpoint falls back, checkpoints restore onto another mesh, bad configs fail
with one line (exit 2), and the demo report is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tolerances import assert_adam_runs_close
from xla_env import xla_flags

CONFIG = str(Path(__file__).parent / "configs" / "tiny_rlp.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS: 8 devices and any other flag, from conftest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rlp_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def train(workdir, data_dir, *overrides, timeout=600):
    return cli("train", "--config", CONFIG, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
               *overrides, timeout=timeout)


def exported(workdir, out):
    result = cli("export", "--workdir", str(workdir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return load_file(str(Path(out) / "model.safetensors"))


def logged_steps(workdir):
    return [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(workdir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, exported(workdir, workdir / "hf")


def _run_until_checkpoint(workdir, data_dir, step_dir: str, *overrides):
    """Starts `rlp-jax train` and returns the process once checkpoint `step_dir` is committed."""
    proc = subprocess.Popen([sys.executable, "-m", "rlp_jax.cli", "train", "--config", CONFIG,
                             "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    marker = Path(workdir) / "checkpoints" / step_dir / "commit_success.txt"
    deadline = time.time() + 400
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint {step_dir}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    return proc


def test_export_writes_the_char_tokenizer_of_the_run(uninterrupted):
    """The demo's char tokenizer, as tokenizer.json + tokenizer_config.json that transformers reads
    to our ids; the weights file as readable as the rest."""
    import transformers

    from rlp_jax.data import demo_tokenizer

    workdir, _ = uninterrupted
    tok, auto = demo_tokenizer(), transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    text = "what is 457+386? 457+386=<think>76013 58114</think>843\n"
    assert auto.encode(text) == tok.encode(text) and auto.decode(tok.encode(text)) == text
    modes = {p.name: p.stat().st_mode & 0o777 for p in (workdir / "hf").iterdir()}
    assert set(modes) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert len(set(modes.values())) == 1, modes


def test_kill_9_then_rerun_gives_bitwise_identical_weights(tmp_path, data_dir, uninterrupted):
    _, want = uninterrupted
    proc = _run_until_checkpoint(tmp_path, data_dir, "2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    result = train(tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout
    assert_same_weights(exported(tmp_path, tmp_path / "hf"), want)
    assert logged_steps(tmp_path) == list(range(1, 7))  # what the killed run logged past step 2 is not doubled


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, data_dir, uninterrupted):
    """SIGTERM as soon as the trainer says its handler is in place (before step 1 ends): it
    finishes the step it is in, saves and exits 0 — at step 1, whatever the machine's speed."""
    _, want = uninterrupted
    proc = subprocess.Popen([sys.executable, "-m", "rlp_jax.cli", "train", "--config", CONFIG,
                             "--workdir", str(tmp_path), f"--config.data.data_dir={data_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    try:
        for line in proc.stdout:  # ends at EOF if the process dies first
            seen.append(line)
            if line.startswith("training steps 1–6"):
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(seen) + proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step 1 (SIGTERM)" in out and "checkpoint saved" in out, out[-3000:]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    result = train(tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 1" in result.stdout
    assert_same_weights(exported(tmp_path, tmp_path / "hf"), want)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, uninterrupted):
    uninterrupted_dir, want = uninterrupted
    assert train(tmp_path, data_dir, "--config.train.steps=4").returncode == 0
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for f in state_dir.rglob("*"):  # destroy the array data of step 4
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 7)
    result = train(tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot be restored" in result.stderr + result.stdout
    assert "resumed from step 2" in result.stdout
    assert_same_weights(exported(tmp_path, tmp_path / "hf"), want)
    assert logged_steps(tmp_path) == list(range(1, 7))


def test_checkpoint_restores_onto_another_mesh(tmp_path, data_dir, uninterrupted):
    _, want = uninterrupted
    assert train(tmp_path, data_dir, "--config.train.steps=2").returncode == 0
    result = train(tmp_path, data_dir, "--config.mesh.shape=(2, 2, 2)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout
    got = exported(tmp_path, tmp_path / "hf")
    # Another mesh sums in another order: equal to float32 rounding, but for the rare weight whose
    # gradient is itself at rounding level (tests/tolerances.py). 4 steps ran on the new mesh.
    assert_adam_runs_close(got, want, learning_rate=1e-2, steps=4)


def test_metrics_jsonl_has_every_step_with_stable_names(uninterrupted):
    workdir, _ = uninterrupted
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "reward_mean", "reward_std", "s_pred_mean", "s_ema_mean", "thought_len_mean",
                 "truncated_frac", "clip_frac", "entropy", "grad_norm", "nonfinite_skipped", "data_prompts"):
        assert all(name in r for r in rows), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_mesh_axes_renamed_by_the_config_rules_train_the_same(tmp_path, data_dir):
    """`mesh.rules` says where each logical axis goes: other mesh axis names with rules to match
    compile the same program — the same metrics, bit for bit."""
    rules = (("batch", ("dp", "fs")), ("length", None), ("embed", "fs"), ("heads", "tp"), ("kv_heads", "tp"),
             ("head_dim", None), ("mlp", "tp"), ("vocab", "tp"), ("layers", None), ("norm", None))
    common = ("--config.train.steps=2", "--config.mesh.shape=(2, 2, 2)")
    default = train(tmp_path / "default", data_dir, *common)
    renamed = train(tmp_path / "renamed", data_dir, *common, "--config.mesh.axes=('dp', 'fs', 'tp')",
                    f"--config.mesh.rules={rules!r}")
    assert default.returncode == 0 and renamed.returncode == 0, (default.stderr + renamed.stderr)[-3000:]
    rows = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows("renamed"), rows("default"), strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("data_")} == \
            {k: v for k, v in b.items() if not k.startswith("data_")}


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=3", "unknown config key 'train.stepz'"),
    ("--config.mesh.shape=(2, 2, 1)", "needs 4 devices but 8 are available"),
    ("--config.train.batch_size=12", "does not divide"),
    ("--config.init.kind=hf", "does not exist"),
    ("--config.mesh.axes=('dp', 'fsdp', 'tensor')", "which is not one of mesh.axes"),
    ("--config.mesh.rules=(('batch', 'data'),)", "mesh.rules has no rule for length"),
    ("--config.rlp.num_rollouts=1", "G >= 2"),
    ("--config.rlp.kl_estimator=k9", "kl_estimator"),
    ("--config.data.strategy=everywhere", "unknown position strategy"),
])
def test_bad_config_is_one_line_and_exit_2_before_any_work(tmp_path, data_dir, override, message):
    result = train(tmp_path, data_dir, override)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("rlp-jax")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_demo_writes_report_and_plots_from_real_evaluations(tmp_path):
    # As a user runs it: one CPU device (with the suite's faster-compiling XLA flags).
    env = {**ENV, "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run([sys.executable, "-m", "rlp_jax.cli", "demo", "--workdir", str(tmp_path),
                             "--warmup-steps", "10", "--steps", "4", "--eval-positions", "64"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "information gain vs the frozen start model" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"]["step"] == 0 and summary["after"]["step"] == 4
    assert summary["before"]["num_positions"] >= 64
    for name in ("gain_start", "gain_ema", "acc_no_think"):
        assert np.isfinite(summary["after"][name])
    # φ = θ at the start: both gains are the same number then.
    assert summary["before"]["gain_start"] == pytest.approx(summary["before"]["gain_ema"], abs=1e-6)
    for png in ("reward.png", "gain.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The benchmark table: the whole answers of the first 64 held-out problems, before and after.
    assert summary["benchmark"]["rlp"]["bench_items"] == 64
    assert all(0 <= summary["benchmark"][stage]["bench_pass@1"] <= 1 for stage in ("warmup", "rlp"))

