"""`rlp-jax bench` runs end to end on a tiny config (PyTorch peer included) and emits well-formed
JSON and a console table. No timing assertions: this checks the harness, not the speed."""

import argparse
import json
import math

import pytest

from rlp_jax import bench

TINY = ["--model", "tiny", "--repeats", "1", "--batch", "2", "--rollouts", "2", "--context", "8",
        "--thought", "8", "--decode-prompt", "8", "--decode-new", "4", "--decode-batches", "2",
        "--roofline-sizes", "128", "--bandwidth-mib", "8", "--block-len", "4"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="rlp-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.register(commands)
    return parser.parse_args(["bench", *argv])


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_runs_on_a_tiny_config_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = parse([*TINY, "--remat", "full", "--json", str(out)])
    assert args.run(args) == 0
    console = capsys.readouterr().out
    for heading in ("memory bandwidth", "matmul peak f32", "fwd+bwd tokens/s", "update MFU", "decode tokens/s, batch 2",
                    "MB it must read",
                    "scoring on the extended cache", "EMA no-think baseline", "aim update_mfu",
                    "load average"):
        assert heading in console, heading

    r = json.loads(out.read_text())
    assert {"machine", "model", "shapes", "roofline", "bandwidth", "update", "decode", "step", "torch", "ratios",
            "aims", "wall_s"} <= set(r)
    assert positive(r["bandwidth"]["read_bytes_per_s"]) and positive(r["bandwidth"]["copy_bytes_per_s"])
    assert r["machine"]["cores_used"] >= 1 and r["model"]["name"] == "tiny"
    for framework in ("jax", "torch"):
        for dtype in ("f32", "bf16"):
            assert positive(r["roofline"][framework][dtype]["peak_gflops"])
    upd = r["update"]["jax"]
    for key in ("model_flops", "fwd_bwd_tokens_per_s", "update_tokens_per_s", "fwd_bwd_mfu", "update_mfu"):
        assert positive(upd[key]), key
    assert positive(r["update"]["torch"]["fwd_bwd_tokens_per_s"])
    # Both sides recompute activations in the backward, as the paper configs do.
    assert r["model"]["config"]["remat"] == "full" and r["update"]["torch"]["gradient_checkpointing"]
    assert 0 < upd["update_mfu_best_peak"] <= upd["update_mfu"]
    for framework in ("jax", "torch"):
        d = r["decode"][framework]["2"]
        assert d["batch"] == 2 and positive(d["generate_tokens_per_s"])
        # t(n) − t(1) may drown in noise on a tiny model; then it is reported as null, not invented.
        assert d["decode_tokens_per_s"] is None or positive(d["decode_tokens_per_s"])
        assert positive(d["step_bytes"])
    step = r["step"]
    for key in ("rollout_s", "scoring_s", "ema_baseline_s", "update_s", "step_s"):
        assert positive(step[key]), key
    assert math.isfinite(step["scoring_in_sample_and_score_s"])
    assert set(step["fractions"]) == {"rollout", "scoring", "ema_baseline", "update"}
    assert r["torch"]["max_abs_logit_diff"] < 1e-3  # the peer really runs the same weights
    assert positive(r["ratios"]["fwd_bwd"])
    assert set(r["aims"]) == {"update_mfu", "scoring_fraction", "decode_speedup_b16"}  # the CPU aims
    assert r["aims"]["decode_speedup_b16"]["met"] is None  # batch 16 was not measured


def test_the_paper_shape_preset_fills_only_the_flags_not_given():
    args = bench.with_shape_preset(parse(["--shape", "paper", "--batch", "2"]))
    assert (args.model, args.dtype, args.remat, args.context, args.rollouts, args.thought) == (
        "qwen3-1.7b", "bfloat16", "full", 2048, 16, 2048)
    assert args.batch == 2


def test_bad_arguments_end_with_one_sentence(capsys):
    args = parse(["--model", "no-such-model", "--skip-torch"])
    assert args.run(args) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--decode-batches", "0,x"])
