"""HF interop: fp32 logits parity with `transformers`, safetensors import/export, and clear errors.

Weights are large (std 0.2, norm scales 1 ± 0.3) so that a wrong RoPE layout, a dropped RoPE
scaling or a misplaced norm moves the logits by far more than the 1e-4 tolerance
(test_parity_is_sensitive_to_rope_scaling shows the margin).
"""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from rlp_jax import sharding
from rlp_jax.models import ModelConfig, RopeScaling, Transformer, hf
from tolerances import forward_tolerance

TOL = 1e-4
VOCAB, T = 101, 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}


def hf_model(family: str, tied: bool, rope_scaling: dict | None = None, seed: int = 0):
    """A random tiny HF model in fp32; head_dim·heads ≠ hidden so q/o layouts cannot hide."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.2,
                  rms_norm_eps=1e-6)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(**kwargs)
    else:
        cfg = transformers.LlamaConfig(**kwargs, rope_theta=500_000.0, rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises norm scales to 1, which would hide norm mix-ups
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def hf_logits(model, tokens, positions, valid) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens)),
                    attention_mask=torch.tensor(np.asarray(valid, np.int64)),
                    position_ids=torch.tensor(np.asarray(positions)))
    return out.logits.float().numpy()


def padded_batch(padding: str, seed: int = 0):
    """Rows of lengths T, 11, 5 and 1, right- or left-padded; positions 0… from the first real token."""
    rng = np.random.RandomState(seed)
    lengths = [T, 11, 5, 1]
    tokens = rng.randint(0, VOCAB, (len(lengths), T))
    valid = np.zeros((len(lengths), T), bool)
    positions = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        span = slice(0, n) if padding == "right" else slice(T - n, T)
        valid[b, span] = True
        positions[b, span] = np.arange(n)
    tokens = np.where(valid, tokens, 0)
    return tokens, positions, valid


_forward = nnx.jit(lambda m, t, p, v: m(t, p, v))


def ours_logits(model, tokens, positions, valid) -> np.ndarray:
    return np.asarray(_forward(model, *(jnp.asarray(a) for a in (tokens, positions, valid))))


def max_valid_diff(a, b, valid) -> float:
    return float(np.abs(a - b)[valid].max())


CASES = {
    "qwen3-untied": ("qwen3", False, None),
    "qwen3-tied": ("qwen3", True, None),
    "llama3-untied-rope-scaling": ("llama", False, LLAMA3_ROPE),
    "llama3-tied-rope-scaling": ("llama", True, LLAMA3_ROPE),
    "llama-tied-no-scaling": ("llama", True, None),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's HF model and the folder it was save_pretrained to (single file)."""
    out = {}
    for name, (family, tied, rope) in CASES.items():
        model = hf_model(family, tied, rope, seed=len(out))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_transformers(saved, case, padding):
    model_hf, folder = saved[case]
    assert (folder / "model.safetensors").exists()
    ours = hf.load_hf(folder)
    family, tied, rope = CASES[case]
    c = ours.config
    assert (c.family, c.tie_embeddings, c.num_layers, c.head_dim) == (family, tied, 2, 24)
    assert (c.rope_scaling is None) == (rope is None)
    assert hasattr(ours, "lm_head") != tied
    tokens, positions, valid = padded_batch(padding)
    want = hf_logits(model_hf, tokens, positions, valid)
    got = ours_logits(ours, tokens, positions, valid)
    assert want[valid].std() > 1.0  # logits big enough for the tolerance to mean something
    assert max_valid_diff(got, want, valid) <= TOL


def test_parity_is_sensitive_to_rope_scaling(saved):
    """The llama3 scaling moves the test logits by ≫ TOL, so the parity tests would catch a dropped
    or misread scaling (and the same weight scale makes them sensitive to layout errors)."""
    model_hf, folder = saved["llama3-untied-rope-scaling"]
    tokens, positions, valid = padded_batch("right")
    want = hf_logits(model_hf, tokens, positions, valid)
    unscaled = ours_logits(hf.load_hf(folder, rope_scaling=None), tokens, positions, valid)
    assert max_valid_diff(unscaled, want, valid) > 1000 * TOL
    # Position 0 has angle 0 whatever the frequencies: there the two agree.
    np.testing.assert_allclose(unscaled[:, 0][valid[:, 0]], want[:, 0][valid[:, 0]], atol=TOL)


def test_config_reads_legacy_rope_scaling_and_rope_parameters():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=16)
    legacy = hf.config_from_hf(base | {"rope_theta": 1234.0, "rope_scaling": LLAMA3_ROPE})
    v5 = hf.config_from_hf(base | {"rope_parameters": LLAMA3_ROPE | {"rope_theta": 1234.0}})
    assert legacy == v5
    assert legacy.rope_theta == 1234.0 and legacy.head_dim == 4 and legacy.num_kv_heads == 2
    assert legacy.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8)
    assert hf.config_from_hf(base).rope_scaling is None


# ---------------------------------------------------------------- import

def test_import_sharded_checkpoint_equals_single_file(saved, tmp_path):
    model_hf, single = saved["qwen3-untied"]
    model_hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    a = nnx.to_pure_dict(nnx.state(hf.load_hf(single), nnx.Param))
    b = nnx.to_pure_dict(nnx.state(hf.load_hf(tmp_path), nnx.Param))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # and the sharded import has the HF weights: q of layer 1, head 3 = rows 72…95 of q_proj
    q_proj = model_hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(b["layers"]["q"][1][:, 3, :], q_proj[72:96].T)


def test_import_with_overrides_sets_dtypes():
    """config_from_hf passes overrides through; load_hf stores params in param_dtype."""
    c = hf.config_from_hf({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 4,
                           "intermediate_size": 16}, dtype="bfloat16", remat="full")
    assert (c.dtype, c.remat, c.param_dtype) == ("bfloat16", "full", "float32")


def test_import_bfloat16_params(saved):
    model_hf, folder = saved["qwen3-tied"]
    ours = hf.load_hf(folder, param_dtype="bfloat16")
    emb = ours.embed[...]
    assert emb.dtype == jnp.bfloat16
    want = model_hf.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(emb, np.float32), want)


# ---------------------------------------------------------------- export

def random_model(config: ModelConfig, seed: int) -> Transformer:
    """A native rlp-jax model with std-0.2 weights and norm scales 1 ± 0.3."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.3 * noise if "norm" in str(path[-1]) else 0.2 * noise)

    nnx.replace_by_pure_dict(state, jax.tree.map_with_path(draw, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def tiny_config(family: str, tied: bool, scaling: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig(family, VOCAB, 64, 2, 4, 2, 24, 96, tied, 10_000.0, 1e-6, 128, scaling)


EXPORT_CASES = {
    "qwen3-tied": tiny_config("qwen3", True),
    "llama3-untied-rope-scaling": tiny_config("llama", False, RopeScaling(8.0, 1.0, 4.0, 8)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    ours = random_model(EXPORT_CASES[case], seed=3)
    hf.save_hf(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(model_hf).__name__ == hf.config_to_hf(ours.config)["architectures"][0]
    tokens, positions, valid = padded_batch("right", seed=1)
    want = hf_logits(model_hf, tokens, positions, valid)
    got = ours_logits(ours, tokens, positions, valid)
    assert want[valid].std() > 1.0
    assert max_valid_diff(got, want, valid) <= TOL
    # Round trip back into rlp-jax is bit-exact.
    back = hf.load_hf(tmp_path)
    assert back.config == ours.config
    for x, y in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)),
                    jax.tree.leaves(nnx.state(back, nnx.Param)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sharded_export(tmp_path):
    ours = random_model(EXPORT_CASES["llama3-untied-rope-scaling"], seed=4)
    hf.save_hf(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "model.safetensors").exists()
    total = sum(v.nbytes for f in files for v in load_file(tmp_path / f).values())
    assert index["metadata"]["total_size"] == total == 4 * ours.config.num_params()
    model_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens, positions, valid = padded_batch("left", seed=2)
    got = ours_logits(ours, tokens, positions, valid)
    assert max_valid_diff(got, hf_logits(model_hf, tokens, positions, valid), valid) <= TOL
    np.testing.assert_array_equal(ours_logits(hf.load_hf(tmp_path), tokens, positions, valid), got)


def test_exported_files_have_the_mode_of_any_new_file(tmp_path):
    """safetensors writes its files 0600; an export's weights are as readable as its config.json."""
    umask = os.umask(0o022)
    try:
        ours = random_model(EXPORT_CASES["qwen3-tied"], seed=4)
        hf.save_hf(ours, tmp_path / "single")
        hf.save_hf(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    finally:
        os.umask(umask)
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("*/*")}
    assert len(modes) > 4 and set(modes.values()) == {0o644}, modes


def test_re_export_into_the_same_folder_replaces_old_shards(tmp_path):
    """Sharded → single file → sharded again: no weights of the earlier export survive to be read."""
    config = EXPORT_CASES["qwen3-tied"]
    tokens, positions, valid = padded_batch("right", seed=4)
    for seed, shard_bytes in [(6, 40_000), (7, 2**30), (8, 60_000)]:
        ours = random_model(config, seed)
        hf.save_hf(ours, tmp_path, max_shard_bytes=shard_bytes)
        names = {p.name for p in tmp_path.iterdir()}
        if shard_bytes == 2**30:
            assert names == {"config.json", "model.safetensors"}
        else:
            index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
            assert names == {"config.json", "model.safetensors.index.json",
                             *index["weight_map"].values()}
        want = ours_logits(ours, tokens, positions, valid)
        np.testing.assert_array_equal(ours_logits(hf.load_hf(tmp_path), tokens, positions, valid), want)
        model_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
        assert max_valid_diff(hf_logits(model_hf, tokens, positions, valid), want, valid) <= TOL


def test_bfloat16_export(tmp_path):
    ours = random_model(EXPORT_CASES["qwen3-tied"], seed=5)
    hf.save_hf(ours, tmp_path, dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model_hf.model.embed_tokens.weight.dtype == torch.float32
    # The bf16 folder holds exactly the bf16-rounded weights...
    rounded = hf.load_hf(tmp_path)
    want_embed = np.asarray(ours.embed[...].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(rounded.embed[...]), want_embed)
    np.testing.assert_array_equal(model_hf.model.embed_tokens.weight.detach().numpy(), want_embed)
    # ...so transformers matches rlp-jax on those weights, and both stay near the fp32 model.
    tokens, positions, valid = padded_batch("right", seed=3)
    want = hf_logits(model_hf, tokens, positions, valid)
    assert max_valid_diff(ours_logits(rounded, tokens, positions, valid), want, valid) <= TOL
    assert max_valid_diff(ours_logits(ours, tokens, positions, valid), want, valid) < 0.25


# ---------------------------------------------------------------- load onto a mesh

def test_load_hf_onto_mesh_matches_unsharded(saved):
    _, folder = saved["llama3-untied-rope-scaling"]
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = hf.load_hf(folder, mesh=mesh)
    q = sharded.layers.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 24)
    # A vocabulary of 101 does not split over tensor=2: that dimension is replicated instead.
    assert sharded.lm_head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    tokens, positions, valid = padded_batch("right")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        got = _forward(sharded, *map(jnp.asarray, (tokens, positions, valid)))
    assert got.sharding.spec[0] == ("data", "fsdp")
    want = ours_logits(hf.load_hf(folder), tokens, positions, valid)
    # Another summation order: 2 layers of ~9 chained reductions of at most 96 terms, plus the head.
    assert max_valid_diff(np.asarray(got), want, valid) <= forward_tolerance(want[valid], depth=20, width=96)


# ---------------------------------------------------------------- errors

@pytest.fixture()
def qwen_folder(saved, tmp_path):
    """A writable copy of the single-file Qwen3 folder."""
    _, folder = saved["qwen3-untied"]
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    return tmp_path


def test_error_unsupported_model_type(qwen_folder):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4,
            "n_layer": 2, "vocab_size": VOCAB}
    (qwen_folder / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(hf.HFFormatError, match="model_type 'gpt2' is not supported"):
        hf.load_hf(qwen_folder)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "biases are not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"use_sliding_window": True}, "sliding-window attention .* is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}, "rope_scaling": None},
     "rope_type 'yarn' is not supported"),
])
def test_error_unsupported_config_features(qwen_folder, change, message):
    config = json.loads((qwen_folder / "config.json").read_text()) | change
    (qwen_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFFormatError, match=message):
        hf.load_hf(qwen_folder)


def test_error_missing_tensor(qwen_folder):
    tensors = load_file(qwen_folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, qwen_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError,
                       match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing from .*incomplete"):
        hf.load_hf(qwen_folder)


@pytest.mark.parametrize("name, transform", [
    ("model.layers.0.self_attn.k_proj.weight", lambda w: w[:-1]),  # a row short
    ("model.embed_tokens.weight", lambda w: w[:, :32]),  # narrower than hidden_size
    ("model.layers.1.mlp.gate_proj.weight", lambda w: np.ascontiguousarray(w.T)),  # transposed
    # transposed, same element count; a reshape would accept it silently
    ("model.layers.0.self_attn.k_proj.weight", lambda w: np.ascontiguousarray(w.T)),
])
def test_error_misshapen_tensor(qwen_folder, name, transform):
    tensors = load_file(qwen_folder / "model.safetensors")
    tensors[name] = transform(tensors[name])
    save_file(tensors, qwen_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match=rf"tensor '{name}' has shape .*config and weights disagree"):
        hf.load_hf(qwen_folder)


def test_error_no_config_json(qwen_folder):
    (qwen_folder / "config.json").unlink()
    with pytest.raises(hf.HFFormatError, match="has no config.json"):
        hf.load_hf(qwen_folder)


def test_error_no_safetensors(qwen_folder):
    (qwen_folder / "model.safetensors").unlink()
    with pytest.raises(hf.HFFormatError, match=r"holds no \*\.safetensors file"):
        hf.load_hf(qwen_folder)
