"""metrics.jsonl and TensorBoard from MetricsWriter; the progress line."""

import json

from rlp_jax import metrics_io


def test_jsonl_rows_tensorboard_and_progress(tmp_path):
    lines = []
    writer = metrics_io.MetricsWriter(tmp_path, total_steps=10, echo=lines.append)
    writer.write(1, {"loss": 0.5, "reward_mean": -1, "bad": float("nan"), "text": "skip me"})
    writer.write(2, {"loss": 0.25})
    writer.write(0, {"gain": 1.5}, file="eval.jsonl")
    writer.progress(2, {"loss": 0.25, "reward_mean": 0.1}, tokens_per_step=100)
    writer.close()
    rows = metrics_io.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 0.5, "reward_mean": -1.0, "bad": "nan"}, {"step": 2, "loss": 0.25}]
    assert json.loads((tmp_path / "eval.jsonl").read_text()) == {"step": 0, "gain": 1.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(lines) == 1 and lines[0].startswith("step 2/10") and "loss 0.25" in lines[0]
    assert metrics_io.read_jsonl(tmp_path / "missing.jsonl") == []
