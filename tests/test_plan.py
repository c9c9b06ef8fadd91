"""`rlp-jax plan`: sizes checked against hand counts for a tiny config, the state against a real
sharded state on 8 CPU devices, FLOPs and the paper's T_flop by hand, and verdicts that name a
knob which then makes the plan fit."""

import argparse
import json
from pathlib import Path

import jax
import pytest

from rlp_jax import build, plan, sharding
from rlp_jax import train_step as ts
from rlp_jax.config import base_config

CONFIGS = Path(__file__).parent.parent / "configs"


def tiny_config(**rlp):
    """tiny (2 layers, D 64, 4 heads / 2 kv heads of 16, MLP 128, untied), vocab 256, float32, on a
    (2, 2, 2) mesh: 8 prompts (context 10, 1 target) × 2 thoughts of ≤ 4 tokens."""
    c = base_config()
    c.model.preset, c.model.vocab_size, c.tokenizer = "tiny", 256, "demo"
    c.mesh.shape = (2, 2, 2)
    c.train.batch_size, c.data.max_context = 8, 10
    c.rlp.num_rollouts, c.rlp.max_thought_len = 2, 4
    c.rlp.rollout_microbatches, c.rlp.grad_accum_steps = 2, 2
    for key, value in rlp.items():
        c.rlp[key] = value
    return c


def tiny_estimate(config=None):
    config = config or tiny_config()
    model_config, _ = plan.model_config_for(config, [])
    return plan.estimate(config, model_config, (2, 2, 2)), model_config


# Per-device elements of each tiny parameter on the (2, 2, 2) mesh: embed (vocab, embed) and every
# weight's embed dimension are split over fsdp = 2; vocab, heads, kv heads and mlp over tensor = 2.
TINY_PARAM_ELEMENTS_PER_DEVICE = {
    "embed [256, 64]": 128 * 32,
    "lm_head [64, 256]": 32 * 128,
    "final_norm [64]": 64,
    "attn_norm, mlp_norm [2, 64]": 2 * 2 * 64,
    "q [2, 64, 4, 16]": 2 * 32 * 2 * 16,
    "k, v [2, 64, 2, 16]": 2 * (2 * 32 * 1 * 16),
    "o [2, 4, 16, 64]": 2 * 2 * 16 * 32,
    "q_norm, k_norm [2, 16]": 2 * 2 * 16,
    "gate, up [2, 64, 128]": 2 * (2 * 32 * 64),
    "down [2, 128, 64]": 2 * 64 * 32,
}
TINY_PARAM_BYTES = 4 * sum(TINY_PARAM_ELEMENTS_PER_DEVICE.values())  # float32


def test_state_bytes_match_the_hand_count():
    est, model_config = tiny_estimate()
    assert model_config.vocab_size == 256 and model_config.num_layers == 2
    assert TINY_PARAM_BYTES == 108_032
    assert est.memory["params"] == TINY_PARAM_BYTES
    assert est.memory["ema"] == TINY_PARAM_BYTES  # float32 like the params here
    # AdamW: two moments like the params, plus int32 step counters of Adam and of the schedule.
    assert est.memory["optimizer"] == 2 * TINY_PARAM_BYTES + 2 * 4
    assert est.memory["reference"] == 0
    assert est.memory["gradients"] == 2 * TINY_PARAM_BYTES
    with_kl, _ = tiny_estimate(tiny_config(kl_coef=0.01))
    assert with_kl.memory["reference"] == TINY_PARAM_BYTES


def test_state_bytes_equal_a_real_sharded_state_on_8_devices():
    config = tiny_config()
    config.model.param_dtype = "bfloat16"
    est, model_config = tiny_estimate(config)
    mesh = sharding.make_mesh((2, 2, 2))
    _, state, _ = ts.create_state_from_scratch(model_config, build.optimizer(config), 0, mesh)
    device = jax.devices()[3]

    def on_device(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
                   if s.device == device)

    assert est.memory["params"] == on_device(state.params) == TINY_PARAM_BYTES // 2  # bfloat16
    assert est.memory["ema"] == on_device(state.ema_params) == TINY_PARAM_BYTES  # float32 always
    assert est.memory["optimizer"] == on_device(state.opt_state)


def test_kv_cache_activations_and_flops_match_hand_computation():
    est, _ = tiny_estimate(tiny_config(cache_block_len=4))
    # Rollout cache: chunk of 8/2 = 4 prompts over data×fsdp = 4 → 1 prompt per device, its
    # P = 10 + 1 (<think>) = 11 slots once; × G = 2 → 2 rows per device, each ⌈(L + 1 + K)/4⌉ = 2
    # blocks of 4 slots; per slot: layers 2 × kv heads 2 / tensor 2 = 1 × head_dim 16 × (k, v) 2 ×
    # float32 4 = 256 bytes.
    assert est.phases["rollouts"]["kv_prefix"] == 1 * 11 * 256 == 2816
    assert est.phases["rollouts"]["kv_suffix"] == 2 * 8 * 256 == 4096
    # The rollout's own float32 weights, split over tensor = 2 only: per layer q 64·4·16/2, k, v
    # 64·2·16/2 each, o like q, MLP 3·64·128/2, two norms 64; head 64·256/2; final norm 64.
    layer = 64 * 16 * (2 * 4 // 2 + 2 * 2 // 2) + 3 * 64 * 128 // 2 + 2 * 64
    assert est.phases["rollouts"]["decode_weights"] == 4 * (2 * layer + 64 * 256 // 2 + 64) == 181_504
    # Update micro-batch: 8 / 2 = 4 prompts × 2 = 8 rows / 4 = 2 rows of S = P + L = 15 tokens.
    # One layer (per device: heads 2, kv heads 1, mlp 64): per token 4·(4·64 + 4·(2 + 1)·16 + 4·64)
    # = 2816 bytes; attention 2 heads × 15 × 15 × (4 + 4). remat 'none' keeps both layers.
    layer = 2 * 15 * 2816 + 2 * 2 * 15 * 15 * 8
    assert layer == 91_680
    assert est.phases["update"]["activations"] == 2 * layer
    # Thought logits: 2 rows × L 4 × (hidden 64·4 + vocab 256/2 × (4 + 12)).
    assert est.phases["update"]["logits"] == 2 * 4 * (64 * 4 + 128 * 16) == 18_432
    # The untied embedding and head, each whole over the batch axes and split over tensor = 2 into
    # 128 vocabulary rows of D 64 in float32: 4 copies of each (gathered, gathered again in the
    # backward, gradient accumulator, transposed).
    assert est.phases["update"]["vocab_copies"] == 4 * 2 * 128 * 64 * 4 == 262_144
    config = tiny_config()
    config.model.remat = "full"
    full, _ = tiny_estimate(config)  # keeps each layer's input only, recomputes one layer
    assert full.phases["update"]["activations"] == 2 * (2 * 15 * 64 * 4) + layer
    # FLOPs of decode: N = 16 thoughts × L = 4 tokens × (body + head + attention over P + L/2 keys);
    # body 2·layers·(D·hd·(2H + 2K) + 3·D·F) = 147456, head 2·D·V = 32768, attention 4·layers·H·hd = 512.
    assert est.flops["rollout decode"] == 16 * 4 * (147_456 + 32_768 + 512 * (11 + 2)) == 11_960_320
    # The paper's T_flop per step: n·l_seq·bs + T_inp with l_seq = context 10 + <think> + L 4 +
    # forced </think> + K 1 and T_inp = 8 prompts × (context 10 + K 1).
    assert est.tokens["t_flop"] == 2 * (10 + 1 + 4 + 1 + 1) * 8 + 8 * (10 + 1) == 360


@pytest.mark.parametrize("objective, suffix_len", [("rlp", 0), ("rpt", 3)])
def test_t_flop_is_one_count_for_the_step_the_plan_and_the_ablation_budget(objective, suffix_len):
    """The step's `flop_tokens` (`train_step.processed_tokens`) at every length's maximum — full
    contexts, K targets, every thought cut at L with its forced `</think>`, RPT's M prediction
    tokens — equals the plan's T_flop per step and `ablate.rlp_token_budget` per step."""
    import numpy as np

    from rlp_jax import ablate
    from rlp_jax.batch import prompt_batch

    config = tiny_config(objective=objective, rpt_prediction_len=2)
    config.data.target_len, config.train.steps = 3, 5
    B, G, C, L, K, M = 8, 2, 10, 4, 3, (2 if objective == "rpt" else 0)
    model_config, _ = plan.model_config_for(config, [])
    est = plan.estimate(config, model_config, (2, 2, 2), suffix_len=suffix_len)
    batch = prompt_batch(np.ones((B, C), np.int32), np.full(B, C), np.ones((B, K), np.int32))
    counted = ts.processed_tokens(batch, np.full((B, G), L + M), np.ones((B, G), bool), suffix_len)["flop_tokens"]
    want = B * (G * (C + suffix_len + 1 + L + M + 1 + K) + C + K)  # 8·(2·19 + 13) = 408 for rlp
    assert float(counted) == est.tokens["t_flop"] == ablate.rlp_token_budget(config, suffix_len) / 5 == want
    assert objective == "rpt" or want == 408


def run_plan(capsys, *argv):
    parser = argparse.ArgumentParser()
    plan.register(parser.add_subparsers())
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
    code = args.run(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


H100X8 = str(CONFIGS / "rlp_qwen3_1p7b_h100x8.py")


def test_paper_config_fits_and_reports_flops(capsys):
    code, out, _ = run_plan(capsys, "plan", "--config", H100X8, "--json")
    result = json.loads(out)
    assert code == 0 and result["fits"]
    assert result["devices"] == 8 and result["model"]["num_params"] == 1_720_574_976
    # 512 prompts × 16 thoughts × 2048 thought tokens; T_flop = 16·(2048 + 1 + 2048 + 1 + 1)·512 + 512·(2048 + 1).
    assert result["tokens"]["thought_tokens"] == 512 * 16 * 2048
    assert result["tokens"]["t_flop"] == 16 * 4099 * 512 + 512 * 2049 == 34_628_096
    # float32 params over fsdp = 8, except the RMSNorm scales, which are replicated: the final norm
    # (2048) and per layer two norms of 2048 and the q/k norms of 128.
    norms = 2048 + 28 * (2 * 2048 + 2 * 128)
    per_device = (1_720_574_976 - norms) // 8 + norms
    assert result["memory_gib"]["params"] * 2**30 == per_device * 4
    code, text, _ = run_plan(capsys, "plan", "--config", H100X8)
    assert "verdict: FITS" in text and "paper's T_flop" in text


@pytest.mark.parametrize("override, knob, value", [
    ("--config.rlp.rollout_microbatches=1", "rlp.rollout_microbatches", 8),
    ("--config.rlp.grad_accum_steps=8", "rlp.grad_accum_steps", 32),
])
def test_a_config_that_does_not_fit_names_the_knob_that_fixes_it(capsys, override, knob, value):
    code, out, _ = run_plan(capsys, "plan", "--config", H100X8, override)
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: DOES NOT FIT") and f"set {knob} to {value}" in verdict
    code, out, _ = run_plan(capsys, "plan", "--config", H100X8, f"--config.{knob}={value}")
    assert code == 0 and "verdict: FITS" in out


def test_the_ema_baseline_is_chunked_with_the_rollouts(capsys):
    config = str(CONFIGS / "rlp_qwen3_1p7b_v5e16.py")
    # All 512 prompts at once do not fit a 16 GiB v5e chip; the planner names the chunking.
    code, out, _ = run_plan(capsys, "plan", "--config", config, "--config.rlp.rollout_microbatches=1",
                            "--config.rlp.grad_accum_steps=512")
    assert code == 1 and "set rlp.rollout_microbatches to 16" in out
    assert "train.batch_size" not in out.strip().splitlines()[-1]
    whole = json.loads(run_plan(capsys, "plan", "--config", config, "--json", "--config.rlp.rollout_microbatches=1")[1])
    code, out, _ = run_plan(capsys, "plan", "--config", config, "--json", "--config.rlp.rollout_microbatches=32")
    result = json.loads(out)
    # S_ema's forward runs over the same 32 chunks of prompts as the rollouts: 1/32 of the whole.
    assert result["fits"] and whole["phases_gib"]["ema_baseline"]["forward"] == pytest.approx(
        32 * result["phases_gib"]["ema_baseline"]["forward"])
    code, out, _ = run_plan(capsys, "plan", "--config", config, "--hbm-gib", "4")
    assert code == 1 and "DOES NOT FIT" in out


def test_plan_errors_are_one_line(capsys):
    code, _, err = run_plan(capsys, "plan", "--config", str(CONFIGS / "rlp_paper.py"))
    assert code == 2 and "pass --devices" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_plan(capsys, "plan", "--config", str(CONFIGS / "rlp_paper.py"), "--devices", "32",
                            "--platform", "h100")
    assert code == 0 and "= 32 devices" in out
    code, _, err = run_plan(capsys, "plan", "--config", H100X8, "--devices", "6")
    assert code == 2 and "mesh.shape" in err
