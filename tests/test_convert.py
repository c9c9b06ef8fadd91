"""`rlp-jax convert` both ways through the real CLI: HF -> rlp-jax params -> HF is exact."""

import subprocess
import sys

import numpy as np
import torch
import transformers


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlp_jax.cli", "convert", *args],
                          capture_output=True, text=True, timeout=300)


def test_convert_round_trip_is_bit_exact_and_bad_input_is_one_sentence(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        initializer_range=0.2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    original.save_pretrained(tmp_path / "hf")

    result = run_cli("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "params"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "params" / "model_config.json").exists()
    result = run_cli("--to-hf", str(tmp_path / "params"), "--out", str(tmp_path / "hf2"))
    assert result.returncode == 0, result.stderr

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    for name, tensor in original.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    tokens = torch.tensor([[5, 17, 3, 90, 41, 2, 66, 8, 23, 1, 12, 30, 77, 4, 9, 55, 61, 20]])
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, reloaded(tokens).logits)

    again = run_cli("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "params"))
    assert again.returncode == 2 and "exists already" in again.stderr
    missing = run_cli("--to-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf3"))
    assert missing.returncode == 2 and "not an rlp-jax params folder" in missing.stderr
    assert not (tmp_path / "hf3").exists()
