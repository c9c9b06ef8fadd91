"""Nemotron-H in the tools around the model: `rlp-jax convert` both ways (dispatched on config.json's
model_type and on the family model_config.json records), `rlp-jax train` refusing the hybrid in
one line before any work, and `rlp-jax plan`'s state memory for a preset, counted by hand."""

import json

import numpy as np
import pytest
import torch
import transformers

from rlp_jax import cli
from rlp_jax.models import convert
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_hf as nhf


def tiny_hf_model():
    """A float32 transformers NemotronHForCausalLM of 5 blocks (Mamba, attention, MLP)."""
    cfg = transformers.NemotronHConfig(
        vocab_size=61, hidden_size=32, hybrid_override_pattern="M*-M-", num_attention_heads=4,
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


@pytest.fixture()
def nemotron_folders(tmp_path):
    """An HF folder (config.json only: the refusal reads no weights) and a params folder's
    model_config.json, both of the tiny preset, and a one-line corpus."""
    hf_dir, params_dir = tmp_path / "hf", tmp_path / "params"
    hf_dir.mkdir()
    params_dir.mkdir()
    config = nh.preset("nemotron-h-tiny")
    (hf_dir / "config.json").write_text(json.dumps(nhf.config_to_hf(config)))
    (params_dir / "model_config.json").write_text(convert.config_to_json(config))
    (tmp_path / "corpus.txt").write_text("Some text to train on.\n")
    return tmp_path


@pytest.mark.parametrize("flags, named", [
    (["--init-from-hf", "{tmp}/hf", "--config.tokenizer=bytes"], "init.path"),
    (["--config.init.kind=params", "--config.init.path={tmp}/params", "--config.tokenizer=bytes"], "init.path"),
    (["--config.model.preset=nemotron-nano-12b-v2"], "model.preset='nemotron-nano-12b-v2'"),
    (["--config.rlp.objective=rpt", "--config.rlp.rpt_proxy={tmp}/hf"], "rlp.rpt_proxy"),
])
def test_train_refuses_the_hybrid_in_one_line_before_any_work(nemotron_folders, capsys, flags, named):
    tmp = nemotron_folders
    workdir = tmp / "run"
    argv = ["train", "--corpus", str(tmp / "corpus.txt"), "--workdir", str(workdir),
            *(f.replace("{tmp}", str(tmp)) for f in flags)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rlp-jax train: {named}")
    assert "Nemotron-H hybrid, which the RLP step and its sampler do not run yet" in err
    assert "rlp-jax convert" in err and "rlp-jax plan" in err
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
    from rlp_jax import plan

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
    # values of 8 kv heads × 128 over S = P + L + 1 + K = (100 + 1) + 20 + 1 + 1 = 123 slots, bfloat16.
    assert p["slots_per_row"] == 123
    assert p["row_bytes"] == {"mamba_conv": 28 * 3 * (128 * 80 + 2 * 8 * 128) * 2,
                              "mamba_ssm": 28 * 128 * 80 * 128 * 4,
                              "kv": 2 * 6 * 123 * 8 * 128 * 2}
    assert p["row_bytes"] == {"mamba_conv": 2_064_384, "mamba_ssm": 146_800_640, "kv": 3_022_848}
    # One chunk of 8 / 2 = 4 prompts × G = 4 → 16 rows, all on the one device.
    assert p["rollout_rows_per_device"] == 16
    rollouts = 16 * (2_064_384 + 146_800_640 + 3_022_848)
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
    est = plan.hybrid_estimate(config, plan.hybrid_model_config(config, []), (1, 1, 2))
    assert est.row_bytes == {"mamba_conv": 28 * 3 * (64 * 80 + 2 * 8 * 128) * 2, "mamba_ssm": 146_800_640 // 2,
                             "kv": 3_022_848 // 2}
    assert est.rows == 16  # data × fsdp = 1: every device holds every row
    text = plan.format_plan(p)
    assert "Nemotron-H hybrid: 28 Mamba, 6 attention, 28 MLP layers" in text and "lower bound" in text
