"""`rlp-jax bench --model nemotron-h-tiny`: the Nemotron-H hybrid's bench runs end to end (decode on
its recurrent state, update, the RLP step's pieces, the HF `NemotronHForCausalLM` peer) and the
bytes it holds one decode step against are the hand count below. No timing assertions."""

import argparse
import json
import math

from rlp_jax import bench
from rlp_jax.bench import measure
from test_bench import assert_decode_structure

P, NEW, BATCH = 8, 4, 2
TINY = ["--model", "nemotron-h-tiny", "--repeats", "1", "--batch", "2", "--rollouts", "2", "--context", "8",
        "--thought", "8", "--decode-prompt", str(P), "--decode-new", str(NEW), "--decode-batches", str(BATCH),
        "--roofline-sizes", "128", "--bandwidth-mib", "8"]

# nemotron-h-tiny by hand: V 256, D 64, layers "MM*-M*-" (3 Mamba, 2 attention, 2 MLP), attention
# 4 heads / 2 kv heads of 16, MLP 96, Mamba 8 heads of 8 (inner 64), state 8, 2 groups, conv 4, float32.
MAMBA_LAYER = 64 + 64 * (2 * 64 + 2 * 2 * 8 + 8) + (64 + 2 * 2 * 8) * 4 + 96 + 3 * 8 + 64 + 64 * 64  # 15,480
ATTENTION_LAYER = 64 + 64 * 16 * (2 * 4 + 2 * 2)  # 12,352
MLP_LAYER = 64 + 2 * 64 * 96  # 12,352
PARAMS = 3 * MAMBA_LAYER + 2 * ATTENTION_LAYER + 2 * MLP_LAYER + 2 * 256 * 64 + 64  # 128,680
WEIGHT_BYTES = (PARAMS - 256 * 64) * 4  # all but the embedding table: 449,184
CONV_BYTES = 3 * (4 - 1) * (64 + 2 * 2 * 8) * 4  # per row: 3 layers × K−1 × conv_dim: 3,456
SSM_BYTES = 3 * 8 * 8 * 8 * 4  # per row: 3 layers × heads × head_dim × state (float32): 6,144
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # keys and values × 2 attention layers × 2 kv heads × 16: 512


def parse(argv):
    parser = argparse.ArgumentParser(prog="rlp-jax")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.register(commands)
    return parser.parse_args(["bench", *argv])


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_hand_count_of_the_tiny_hybrid():
    c = bench.model_config("nemotron-h-tiny", None, "float32")
    assert (MAMBA_LAYER, ATTENTION_LAYER, MLP_LAYER, PARAMS) == (15_480, 12_352, 12_352, 128_680)
    assert c.num_params() == PARAMS
    assert measure.matmul_params(c) == 3 * (64 * 168 + 64 * 64) + 2 * 64 * 16 * 12 + 2 * 2 * 64 * 96
    # bfloat16 halves the weights, conv history and keys but not the float32 SSM state.
    half = bench.model_config("nemotron-h-tiny", None, "bfloat16")
    assert measure.decode_step_bytes_parts(half, prompts=1, prompt_tokens=P, rows=1, suffix_tokens=1) == {
        "weights": WEIGHT_BYTES / 2, "recurrent_state": CONV_BYTES / 2 + SSM_BYTES,
        "kv": KV_BYTES_PER_TOKEN / 2 * (P + 1)}


def test_hybrid_bench_runs_on_the_tiny_preset_with_the_hf_peer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = parse([*TINY, "--json", str(out)])
    assert args.run(args) == 0
    console = capsys.readouterr().out
    for heading in ("Nemotron-H hybrid, layers MM*-M*-", "fwd+bwd tokens/s", "update MFU",
                    f"decode tokens/s, batch {BATCH}", "Mamba conv+SSM state / attention KV",
                    "scoring on the extended cache", "load average"):
        assert heading in console, heading

    r = json.loads(out.read_text(), parse_constant=lambda name: pytest_fail(f"non-strict JSON {name}"))
    assert {"machine", "model", "shapes", "roofline", "bandwidth", "update", "decode", "step", "torch", "ratios",
            "aims", "wall_s"} <= set(r)
    assert r["model"]["hybrid"] and r["model"]["family"] == "nemotron_h" and r["model"]["num_params"] == PARAMS
    assert r["model"]["config"]["pattern"] == "MM*-M*-"

    # Decode: the bytes of one step against the hand count, as a fraction of the measured bandwidth.
    for framework in ("jax", "torch"):
        d = r["decode"][framework][str(BATCH)]
        assert_decode_structure(d, batch=BATCH, prompt=P, new=NEW)
        # mean filled attention slots per row over the decode steps: P + NEW / 2 (each row its own copy)
        parts = {"weights": WEIGHT_BYTES, "recurrent_state": BATCH * (CONV_BYTES + SSM_BYTES),
                 "kv": KV_BYTES_PER_TOKEN * BATCH * (P + NEW / 2)}
        assert d["step_bytes_parts"] == parts
        assert d["step_bytes"] == 449_184 + 2 * 9_600 + 512 * 2 * 10 == sum(parts.values())
    jd = r["decode"]["jax"][str(BATCH)]
    step_s = jd["decode_ms_per_step"] / 1e3
    assert math.isclose(jd["bandwidth_fraction"], jd["step_bytes"] / step_s / r["bandwidth"]["bytes_per_s"])
    assert positive(r["ratios"][f"decode_b{BATCH}"]) and positive(r["ratios"][f"prefill_b{BATCH}"])

    # Update: forward + backward tokens/s and MFU against the measured peak, rlp-jax and HF.
    upd = r["update"]["jax"]
    for key in ("model_flops", "fwd_bwd_tokens_per_s", "update_tokens_per_s", "fwd_bwd_mfu", "update_mfu"):
        assert positive(upd[key]), key
    assert upd["model_flops"] == 3 * measure.forward_flops(bench.model_config("nemotron-h-tiny", None, "float32"),
                                                           4, 8 + 1 + 8, 8)
    assert positive(r["update"]["torch"]["fwd_bwd_tokens_per_s"]) and positive(r["ratios"]["fwd_bwd"])

    # The RLP step, piece by piece.
    step = r["step"]
    for key in ("rollout_s", "scoring_s", "ema_baseline_s", "update_s", "step_s"):
        assert positive(step[key]), key
    assert set(step["fractions"]) == {"rollout", "scoring", "ema_baseline", "update"}

    # The peer is transformers' NemotronHForCausalLM on the same weights.
    assert r["torch"]["hf_class"] == "NemotronHForCausalLM" and r["torch"]["max_abs_logit_diff"] < 1e-3


def pytest_fail(message):
    raise AssertionError(message)
