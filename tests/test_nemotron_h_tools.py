"""Nemotron-H in the tools around the model: `rlp-jax convert` both ways (dispatched on config.json's
model_type and on the family model_config.json records), `rlp-jax train` on a tiny HF Nemotron-H
folder (a short run that resumes from its checkpoint; MoE checkpoints refused in one line before
any work), and `rlp-jax plan`'s state memory for a preset, counted by hand."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from xla_env import xla_flags

from rlp_jax import cli
from rlp_jax.models import convert
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_hf as nhf


def tiny_hf_model(vocab_size=61):
    """A float32 transformers NemotronHForCausalLM of 5 blocks (Mamba, attention, MLP)."""
    cfg = transformers.NemotronHConfig(
        vocab_size=vocab_size, hidden_size=32, hybrid_override_pattern="M*-M-", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=4, n_groups=2, conv_kernel=4, chunk_size=4, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.NemotronHForCausalLM(cfg).float().eval()


def test_convert_dispatches_on_model_type_and_round_trips_bit_exact(tmp_path, capsys):
    original = tiny_hf_model()
    original.save_pretrained(tmp_path / "hf")

    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "params")]) == 0
    recorded = json.loads((tmp_path / "params" / "model_config.json").read_text())
    assert recorded["family"] == "nemotron_h" and recorded["pattern"] == "M*-M-"
    loaded = convert.load_params(tmp_path / "params")
    assert isinstance(loaded, nh.NemotronH) and loaded.config == nhf.config_from_hf(original.config.to_dict())
    assert cli.main(["convert", "--to-hf", str(tmp_path / "params"), "--out", str(tmp_path / "hf2")]) == 0

    reloaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "hf2").float().eval()
    want = original.state_dict()
    assert set(reloaded.state_dict()) == set(want)
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), want[name].numpy(), err_msg=name)
    tokens = torch.tensor([[5, 17, 3, 60, 41, 2, 33, 8, 23]])
    with torch.no_grad():
        assert torch.equal(original(tokens, use_cache=False).logits, reloaded(tokens, use_cache=False).logits)

    # The Qwen/Llama config round trip is unchanged: no family key is added to a ModelConfig's fields.
    from rlp_jax.models.config import preset

    assert convert.config_from_json(convert.config_to_json(preset("tiny"))) == preset("tiny")
    assert convert.config_from_json(convert.config_to_json(nh.preset("nemotron-nano-12b-v2"))) == \
        nh.preset("nemotron-nano-12b-v2")
    capsys.readouterr()
    assert cli.main(["convert", "--from-hf", str(tmp_path / "params"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and len(err.strip().splitlines()) == 1


def train_cli(cwd, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    return subprocess.run([sys.executable, "-m", "rlp_jax.cli", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=env)


# The smallest RLP run: 2 prompts of ≤ 24 context tokens, G = 2 thoughts of ≤ 4 tokens, no
# held-out evaluation; the byte tokenizer (260 ids) in the model's vocabulary of 264.
TINY_RUN = ["--config.tokenizer=bytes", "--config.train.batch_size=2", "--config.rlp.num_rollouts=2",
            "--config.rlp.max_thought_len=4", "--config.data.max_context=24", "--config.data.min_context=8",
            "--config.eval.num_positions=0", "--config.train.log_every=1", "--config.checkpoint.every_steps=1"]


def test_train_runs_the_hybrid_from_an_hf_folder_and_resumes(tmp_path):
    """`rlp-jax train --init-from-hf` a tiny random Nemotron-H (blocks M, *, -): 2 steps with finite
    metrics, then the same command with 3 steps resumes from the step-2 checkpoint (each step
    logged once); the run records the hybrid's family."""
    tiny_hf_model(vocab_size=264).save_pretrained(tmp_path / "hf")
    lines = [f"Line {i} of a small corpus about hybrid models, recurrent state and attention." for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    args = ["--corpus", "corpus.txt", "--init-from-hf", "hf", "--workdir", "run", *TINY_RUN]

    first = train_cli(tmp_path, *args, "--config.train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert recorded["family"] == "nemotron_h" and recorded["pattern"] == "M*-M-"
    second = train_cli(tmp_path, *args, "--config.train.steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert m["nonfinite_skipped"] == 0
    # The trained run exports to an HF folder that transformers loads, with our logits.
    from rlp_jax import build

    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    ours = build.model_from_run(tmp_path / "run")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.arange(3, 15, dtype=np.int64)[None]
    with torch.no_grad():
        want = theirs(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens.astype(np.int32))), want, atol=1e-4)


def test_train_refuses_a_moe_hybrid_in_one_line_before_any_work(tmp_path, capsys):
    """Only dense Nemotron-H blocks are supported: an HF folder with MoE blocks ('E') is refused."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf_json = nhf.config_to_hf(nh.preset("nemotron-h-tiny"))
    hf_json["hybrid_override_pattern"] = "ME*-"
    hf_json["layers_block_type"] = ["mamba", "moe", "attention", "mlp"]
    hf_json["num_hidden_layers"] = 4
    (hf_dir / "config.json").write_text(json.dumps(hf_json))
    (tmp_path / "corpus.txt").write_text("Some text to train on.\n")
    workdir = tmp_path / "run"
    argv = ["train", "--corpus", str(tmp_path / "corpus.txt"), "--workdir", str(workdir), "--init-from-hf",
            str(hf_dir), "--config.tokenizer=bytes"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlp-jax train: ")
    assert "MoE blocks" in err and "only the dense variants" in err
    assert not workdir.exists()


def nemotron_plan_config(mesh_shape):
    """nemotron-nano-12b-v2 in bfloat16 (float32 params and SSM state): 8 prompts of context 100
    and 1 target, G = 4 thoughts of ≤ 20 tokens, rollouts in 2 chunks, no prompt template."""
    from rlp_jax.config import base_config

    c = base_config()
    c.model.preset, c.model.dtype, c.tokenizer = "nemotron-nano-12b-v2", "bfloat16", "demo"
    c.init.kind, c.mesh.shape = "scratch", mesh_shape
    c.train.batch_size, c.data.max_context, c.data.target_len = 8, 100, 1
    c.rlp.num_rollouts, c.rlp.max_thought_len, c.rlp.rollout_microbatches = 4, 20, 2
    c.rlp.prompt_template, c.rlp.kl_coef, c.rlp.grad_accum_steps, c.rlp.num_minibatches = "", 0.0, 1, 1
    return c


def test_plan_counts_the_hybrids_state_memory_by_hand():
    from rlp_jax import plan, plan_hybrid

    p = plan.plan(nemotron_plan_config((1, 1, 1)), devices=1, hbm_gib=141.0)
    assert p["hybrid"] and p["model"]["num_params"] == 12_310_001_152
    assert (p["model"]["mamba_layers"], p["model"]["attention_layers"], p["model"]["mlp_layers"]) == (28, 6, 28)
    # Train state on one device: float32 params, φ float32, AdamW's two moments + two int32 counters.
    params = 4 * 12_310_001_152
    gib = 2**30
    assert p["memory_gib"]["params"] * gib == params == 49_240_004_608
    assert p["memory_gib"]["ema"] * gib == params
    assert p["memory_gib"]["optimizer"] * gib == 2 * params + 8
    assert p["memory_gib"]["reference"] == 0
    # One rollout row: 28 Mamba layers × (K−1 = 3) conv inputs of x (128 heads × 80) and B, C (8 groups
    # × 128 each) in bfloat16; 28 × SSM state 128 × 80 × 128 in float32; 6 attention layers × keys and
    # values of 8 kv heads × 128 over its L + 1 + K = 20 + 1 + 1 = 22 suffix slots (one block), bfloat16.
    kv_token = 2 * 6 * 8 * 128 * 2
    assert p["slots_per_row"] == 22
    assert p["row_bytes"] == {"mamba_conv": 28 * 3 * (128 * 80 + 2 * 8 * 128) * 2,
                              "mamba_ssm": 28 * 128 * 80 * 128 * 4, "kv_suffix": 22 * kv_token}
    assert p["row_bytes"] == {"mamba_conv": 2_064_384, "mamba_ssm": 146_800_640, "kv_suffix": 540_672}
    # One chunk of 8 / 2 = 4 prompts × G = 4 → 16 rows, all on the one device; each prompt's
    # P = 100 + 1 slots once; the rollout's bfloat16 copy of every weight but the embedding table
    # (28 × 3 × 128 Mamba A_log, D and dt_bias stay float32).
    assert p["rollout_rows_per_device"] == 16
    mamba_f32 = 28 * 3 * 128
    decode_weights = (12_310_001_152 - 131_072 * 5120 - mamba_f32) * 2 + mamba_f32 * 4
    assert p["phases_gib"]["rollouts"]["kv_prefix"] * gib == 4 * 101 * kv_token
    assert p["phases_gib"]["rollouts"]["decode_weights"] * gib == decode_weights == 23_277_846_528
    rollouts = 16 * (2_064_384 + 146_800_640 + 540_672) + 4 * 101 * kv_token + decode_weights
    assert sum(p["phases_gib"]["rollouts"].values()) * gib == pytest.approx(rollouts, rel=1e-12)
    # The peak: the state (θ, φ, moments, and 12 bytes of step counter and rng key) plus the largest
    # phase, here applying the update (new θ, φ and moments beside one gradient).
    assert p["memory_gib"]["other"] * gib == 12
    state = 4 * params + 8 + 12
    assert p["peak_phase"] == "optimizer_apply"
    assert p["peak_gib"] * gib == pytest.approx(state + params + 4 * params + 8, rel=1e-12)
    assert p["fits"] is False  # 9 copies of 49 GB on one 141 GiB device

    # tensor = 2 splits the Mamba heads (conv x, SSM) and the kv heads; B and C stay whole.
    config = nemotron_plan_config((1, 1, 2))
    est = plan_hybrid.estimate(config, plan_hybrid.hybrid_config(config, []), (1, 1, 2))
    assert est.row_bytes == {"mamba_conv": 28 * 3 * (64 * 80 + 2 * 8 * 128) * 2, "mamba_ssm": 146_800_640 // 2,
                             "kv_suffix": 540_672 // 2}
    assert est.rows == 16  # data × fsdp = 1: every device holds every row
    text = plan.format_plan(p)
    assert "Nemotron-H hybrid: 28 Mamba, 6 attention, 28 MLP layers" in text and "lower bound" in text
