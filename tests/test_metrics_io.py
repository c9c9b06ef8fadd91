"""metrics.jsonl and TensorBoard from MetricsWriter; the progress line."""

import json

from rlp_jax import metrics_io


def test_jsonl_rows_tensorboard_and_progress(tmp_path):
    lines = []
    writer = metrics_io.MetricsWriter(tmp_path, total_steps=10, echo=lines.append)
    writer.write(1, {"loss": 0.5, "reward_mean": -1, "bad": float("nan"), "text": "skip me"})
    writer.write(2, {"loss": 0.25})
    writer.write(0, {"gain": 1.5}, file="eval.jsonl")
    writer.progress(2, {"loss": 0.25}, tokens_per_step=100)
    writer.close()
    rows = metrics_io.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 0.5, "reward_mean": -1.0, "bad": "nan"}, {"step": 2, "loss": 0.25}]
    assert json.loads((tmp_path / "eval.jsonl").read_text()) == {"step": 0, "gain": 1.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(lines) == 1 and lines[0].startswith("step 2/10") and "loss 0.25" in lines[0]
    assert metrics_io.read_jsonl(tmp_path / "missing.jsonl") == []


def test_an_rlp_progress_line_shows_the_reward_and_thoughts_not_the_loss(tmp_path):
    """A policy step's loss is ~1e-8 by construction (docs/training.md): the line shows what moves."""
    lines = []
    writer = metrics_io.MetricsWriter(tmp_path, total_steps=10, echo=lines.append, tensorboard=False)
    metrics = {"loss": 1.2e-8, "reward_mean": 0.0123, "reward_std": 0.25, "reward_pos_frac": 0.5625,
               "thought_len_mean": 12.5, "entropy": 1.75, "clip_frac": 0.0, "grad_norm": 0.5}
    writer.progress(1, metrics, tokens_per_step=100)
    writer.progress(2, metrics, tokens_per_step=100)
    assert all("loss" not in line for line in lines), lines
    assert lines[1].endswith("reward +0.0123  ± 0.25  reward>0 56%  len 12.5  entropy 1.75  clip 0  |g| 0.5")
