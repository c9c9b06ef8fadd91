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
    args = parse([*TINY, "--remat", "full", "--json", str(out), "--profile", str(tmp_path / "profile")])
    assert args.run(args) == 0
    console = capsys.readouterr().out
    for heading in ("memory bandwidth", "matmul peak f32", "fwd+bwd tokens/s", "update MFU", "decode tokens/s, batch 2",
                    "MB it must read", "prefill tokens/s (2 × 8", "generate incl. prefill",
                    "scoring on the extended cache", "EMA no-think baseline", "aim update_mfu",
                    "load average"):
        assert heading in console, heading

    r = json.loads(out.read_text())
    assert {"machine", "model", "shapes", "roofline", "bandwidth", "update", "decode", "step", "torch", "ratios",
            "aims", "wall_s"} <= set(r)
    assert positive(r["bandwidth"]["read_bytes_per_s"]) and positive(r["bandwidth"]["copy_bytes_per_s"])
    assert r["machine"]["cores_used"] >= 1 and r["model"]["name"] == "tiny"
    assert r["model"]["config"]["platform"] == "cpu"  # kernels resolved: the CPU decode form is what is timed
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
        assert_decode_structure(d, batch=2, prompt=8, new=4)
        assert positive(r["ratios"]["decode_b2"]) and positive(r["ratios"]["prefill_b2"])
    step = r["step"]
    for key in ("rollout_s", "scoring_s", "ema_baseline_s", "update_s", "step_s"):
        assert positive(step[key]), key
    assert math.isfinite(step["scoring_in_sample_and_score_s"])
    assert set(step["fractions"]) == {"rollout", "scoring", "ema_baseline", "update"}
    assert r["torch"]["max_abs_logit_diff"] < 1e-3  # the peer really runs the same weights
    assert positive(r["ratios"]["fwd_bwd"])
    # --profile: one update, and the prefill and the decode loop each alone, traced and ranked.
    assert set(r["profile"]) == {"update", "prefill_b2", "decode_b2"}
    for name, profiled in r["profile"].items():
        assert profiled["trace"].startswith(str(tmp_path / "profile")) and profiled["ops"], name
    assert set(r["aims"]) == {"update_mfu", "scoring_fraction", "decode_speedup_b16"}  # the CPU aims
    assert r["aims"]["decode_speedup_b16"]["met"] is None  # batch 16 was not measured, and it says so
    assert "batch 16 not measured" in r["aims"]["decode_speedup_b16"]["why"]
    assert "n/a (batch 16 not measured: add it to --decode-batches)" in console


def assert_decode_structure(d, *, batch, prompt, new):
    """The decode measurement: the prefill and the n-step decode loop timed apart, every figure
    a number (none left empty), the derived ones consistent with the timings."""
    assert (d["batch"], d["prompt"], d["new_tokens"]) == (batch, prompt, new)
    for part in ("prefill", "decode"):
        assert positive(d[part]["median_s"]) and len(d[part]["times_s"]) >= 1, part
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step", "generate_tokens_per_s",
                "decode_gflops", "step_bytes"):
        assert positive(d[key]), key
    step_s = d["decode"]["median_s"] / new
    assert math.isclose(d["decode_ms_per_step"], 1e3 * step_s)
    assert math.isclose(d["decode_tokens_per_s"], batch / step_s)
    assert math.isclose(d["prefill_tokens_per_s"], batch * prompt / d["prefill"]["median_s"])
    assert math.isclose(d["generate_tokens_per_s"], batch * new / (d["prefill"]["median_s"] + d["decode"]["median_s"]))
    assert isinstance(d["notes"], list)


def test_timeit_stops_after_three_calls_once_their_median_is_near_the_fastest(monkeypatch):
    """`--repeats` is the most calls: 3 suffice once their median is within 10 % of the fastest (a
    slow outlier does not hold them up); a wide spread runs them all. A scripted clock, no timing."""
    import types

    from rlp_jax.bench import measure

    def calls(durations, repeats=5):
        clock = {"now": 0.0, "calls": 0}

        def fn():
            clock["now"] += durations[clock["calls"]]
            clock["calls"] += 1

        monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
        t = measure.timeit(fn, repeats, warmup=0, block=lambda _: None)
        return len(t.times_s), t.median_s

    assert calls([1.0, 1.0625, 1.03125, 9, 9]) == (3, 1.03125)
    assert calls([1.0, 3.0, 1.0625, 9, 9]) == (3, 1.0625)  # one slow outlier
    assert calls([1.0, 1.5, 2.0, 1.25, 1.375]) == (5, 1.375)
    assert calls([1.0, 1.5], repeats=2) == (2, 1.25)


def test_spread_note_speaks_only_for_a_wide_spread():
    from rlp_jax.bench.measure import Timing, spread_note

    assert spread_note("decode", Timing(1.0, 0.95, [0.95, 1.0, 1.05])) is None
    note = spread_note("prefill", Timing(12.0, 10.2, [10.2, 12.0, 16.7]))
    assert note.startswith("prefill: repetitions span 10.2–16.7 s") and "busy machine" in note


@pytest.mark.parametrize("name", ["tiny", "nemotron-h-tiny"])
def test_the_hf_peer_decodes_one_token_per_forward_from_its_prefilled_cache(name):
    """The peer's decode (`Peer.decode_from`) continues a cache of the first P − 1 prompt tokens:
    n forwards of one token per row (no prefill inside the timed decode), sampling the tokens
    `generate` samples from the bare prompts; its prefill fills the cache with all P tokens."""
    import numpy as np
    import torch

    from rlp_jax.bench import torch_side
    from rlp_jax.models import init_model, nemotron_h

    config = bench.model_config(name, None, "float32")
    model = nemotron_h.init_model(config) if name.startswith("nemotron") else init_model(config)
    peer = torch_side.Peer(model, threads=1)
    prompts_BxP = torch.tensor(np.random.RandomState(0).randint(3, config.vocab_size, (2, 8)))
    prefilled = peer.prefill(prompts_BxP)
    assert prefilled.logits.shape == (2, 1, config.vocab_size) and prefilled.cache.get_seq_length() == 8
    cache = peer.prefill(prompts_BxP[:, :-1]).cache
    widths = []
    hook = peer.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        tokens = peer.decode_from(prompts_BxP, cache, 5, temperature=0.7, seed=3)
    finally:
        hook.remove()
    assert widths == [(2, 1)] * 5
    assert tokens.shape == (2, 8 + 5) and torch.equal(tokens[:, :8], prompts_BxP)
    assert torch.equal(tokens, peer.decode_from(prompts_BxP, None, 5, temperature=0.7, seed=3))


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
