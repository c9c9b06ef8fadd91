"""Nemotron-H (dense hybrid Mamba-2 / attention / ReLU² MLP): fp32 parity with transformers'
NemotronHForCausalLM (its pure-torch path on CPU), chunked SSD == recurrence, prefill + decode ==
forward, padding, greedy decoding, HF export, parameter counts, errors and a sharded forward.

HF weights are made large (std 0.2 projections, norm scales 1 ± 0.3, A_log and D perturbed) so a
wrong head-to-group map, norm grouping or fused-tensor split moves logits far past 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rlp_jax import sharding
from rlp_jax.models import mamba2
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_hf as nhf
from rlp_jax.models.hf import HFFormatError
from tolerances import forward_tolerance

TOL = 1e-4
VOCAB, T = 97, 11
PATTERNS = {
    # consecutive Mamba layers, two attention layers, MLPs; 11 tokens = 2 full chunks of 4 + 3
    "MM*-M*-": dict(chunk_size=4),
    # no attention at all; one group, no conv bias, chunk longer than the sequence
    "M-M-": dict(chunk_size=16, n_groups=1, use_conv_bias=False),
    # attention first, MLP-only stretch, 4 groups, conv width 3; Δ clamped to a limit that bites
    # (most initial Δ lie below 0.02): the mixer clamps to `time_step_limit`, not `time_step_min`
    "*--*M": dict(chunk_size=3, n_groups=4, conv_kernel=3, time_step_limit=(0.02, 0.3)),
}


def hf_config(pattern: str, **changes) -> transformers.NemotronHConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern=pattern, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, intermediate_size=48, mamba_num_heads=8, mamba_head_dim=6,
                  ssm_state_size=5, n_groups=2, conv_kernel=4, chunk_size=4, initializer_range=0.2,
                  layer_norm_epsilon=1e-5)
    return transformers.NemotronHConfig(**(kwargs | changes))


def hf_model(pattern: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(hf_config(pattern, **changes)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises norm scales to 1, which would hide norm mix-ups
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".D") or name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """pattern → (HF model, folder it was saved to, our model loaded from that folder)."""
    out = {}
    for i, (pattern, changes) in enumerate(PATTERNS.items()):
        model = hf_model(pattern, seed=i, **changes)
        folder = tmp_path_factory.mktemp(f"nemotron-h-{i}")
        model.save_pretrained(folder)
        out[pattern] = (model, folder, nhf.load_hf(folder))
    return out


def hf_logits(model, tokens, mask=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else dict(attention_mask=torch.tensor(np.asarray(mask, np.int64)))
        return model(input_ids=torch.tensor(np.asarray(tokens)), use_cache=False, **kwargs).logits.float().numpy()


_forward = nnx.jit(lambda m, t, v: m(t, None, v))


def ours_logits(model, tokens, valid=None) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens), None if valid is None else jnp.asarray(valid)))


def random_tokens(batch: int, length: int = T, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_logits_match_transformers(saved, pattern):
    hf, _, ours = saved[pattern]
    tokens = random_tokens(3, seed=1)
    want = hf_logits(hf, tokens)
    diff = float(np.abs(ours_logits(ours, tokens) - want).max())
    assert diff < TOL, diff
    assert np.abs(want).max() > 1.0  # the logits are far from trivially small


def test_parity_is_sensitive_to_the_group_map(saved):
    """Heads reading another group's B and C (e.g. h % G instead of h // G) break parity by far."""
    hf, folder, _ = saved["MM*-M*-"]
    tokens = random_tokens(3, seed=2)
    swapped = nhf.load_hf(folder)
    for name in ("in_B", "in_C", "conv_B", "conv_C", "conv_B_bias", "conv_C_bias"):
        p = getattr(swapped.mamba, name)
        p[...] = jnp.flip(p[...], axis=-2)  # groups reversed
    assert float(np.abs(ours_logits(swapped, tokens) - hf_logits(hf, tokens)).max()) > 100 * TOL


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padding_matches_transformers(saved, padding):
    hf, _, ours = saved["MM*-M*-"]
    lengths = [T, 8, 5, 1]
    tokens = random_tokens(len(lengths), seed=3)
    valid = np.zeros(tokens.shape, bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    if padding == "left":
        valid = valid[:, ::-1].copy()
    tokens = np.where(valid, tokens, 0)
    want = hf_logits(hf, tokens, valid)
    got = ours_logits(ours, tokens, valid)
    assert float(np.abs(got - want)[valid].max()) < TOL
    # A padded row's real tokens see exactly what they see at the start of an unpadded row (batch
    # shaped as in test_logits_match_transformers, so nothing compiles again).
    unpadded = random_tokens(3, seed=1)
    unpadded[0, :5] = tokens[2, valid[2]]
    alone = ours_logits(ours, unpadded)
    assert float(np.abs(got[2][valid[2]] - alone[0, :5]).max()) < TOL


def test_gradients_match_torch_autograd(saved):
    """The training loss's gradient (with remat) equals torch autograd's for every HF tensor."""
    hf, folder, _ = saved["MM*-M*-"]
    ours = nhf.load_hf(folder, remat="full")
    tokens = random_tokens(2, seed=10)

    def nll(w, t):
        logp = jax.nn.log_softmax(nh.logits(w, nh.hidden_states(w, t))[:, :-1])
        return -jnp.take_along_axis(logp, t[:, 1:, None], -1).mean()

    grads = jax.jit(jax.grad(nll))(ours.weights(), jnp.asarray(tokens))
    # The gradients written into a model, so that params_to_hf names and fuses them as HF does.
    state = nnx.state(ours, nnx.Param)
    pure = nnx.to_pure_dict(state) | {"embed": grads.embed_VxD, "final_norm": grads.final_norm_D,
                                      "lm_head": grads.head_DxV}
    for block_type, stack in grads.blocks.items():
        pure[block_type] = dict(stack)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(ours, state)
    hf.zero_grad(set_to_none=True)
    logp = torch.log_softmax(hf(input_ids=torch.tensor(tokens), use_cache=False).logits[:, :-1], -1)
    (-torch.gather(logp, -1, torch.tensor(tokens[:, 1:, None])).mean()).backward()
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    worst = max(float(np.abs(g - theirs[name]).max() / np.abs(theirs[name]).max())
                for name, g in nhf.params_to_hf(ours))
    assert worst < 1e-4, worst


# ---------------------------------------------------------------- the SSM

_ssd_chunked = jax.jit(mamba2.ssd_chunked, static_argnums=5)
_ssd_recurrent = jax.jit(mamba2.ssd_recurrent)


@pytest.mark.parametrize("chunk", [1, 5])
def test_chunked_ssd_equals_recurrence(chunk):
    B, L, H, P, G, N = 2, 13, 6, 3, 3, 4
    rng = np.random.RandomState(chunk)  # numpy inputs: eager jax.random compiles per shape
    x = rng.randn(B, L, H, P).astype(np.float32)
    dt = np.log1p(np.exp(rng.randn(B, L, H))).astype(np.float32)
    A = -np.exp(rng.randn(H)).astype(np.float32)
    Bm, Cm = rng.randn(2, B, L, G, N).astype(np.float32)
    h0 = rng.randn(B, H, P, N).astype(np.float32)
    y_chunk, final_chunk = _ssd_chunked(x, dt, A, Bm, Cm, chunk, h0)
    y_rec, final_rec = _ssd_recurrent(x, dt, A, Bm, Cm, h0)
    assert float(jnp.abs(y_chunk - y_rec).max()) < 1e-4 * float(jnp.abs(y_rec).max())
    assert float(jnp.abs(final_chunk - final_rec).max()) < 1e-4 * float(jnp.abs(final_rec).max())
    # Zero Δ and zero input at a token leave the state untouched (how padding is skipped).
    dt_skip, x_skip = dt.copy(), x.copy()
    dt_skip[:, 5], x_skip[:, 5] = 0.0, 0.0
    _, with_gap = _ssd_chunked(x_skip, dt_skip, A, Bm, Cm, chunk, h0)
    keep = np.r_[0:5, 6:L]
    _, without = _ssd_recurrent(x[:, keep], dt[:, keep], A, Bm[:, keep], Cm[:, keep], h0)
    assert float(jnp.abs(with_gap - without).max()) < 1e-4 * float(jnp.abs(without).max())


# ---------------------------------------------------------------- prefill + decode

_prefill = jax.jit(nh.prefill, static_argnames="capacity")
_decode = jax.jit(nh.decode_step)


@pytest.mark.parametrize("pattern", ["MM*-M*-", "*--*M"])
def test_prefill_then_decode_equals_forward(saved, pattern):
    """Ragged prompts (right-padded) prefilled, then fed one token per step: every step's logits equal
    the full forward's at that position."""
    _, _, ours = saved[pattern]
    w = ours.weights()
    prompt_lengths = np.array([6, 2, 4, 1])
    steps = 5
    tokens = random_tokens(4, int(prompt_lengths.max()) + steps, seed=4)
    full = ours_logits(ours, tokens)
    prompts = np.where(np.arange(prompt_lengths.max())[None] < prompt_lengths[:, None],
                       tokens[:, :prompt_lengths.max()], 0)
    hidden, state = _prefill(w, jnp.asarray(prompts), jnp.asarray(prompt_lengths), capacity=tokens.shape[1])
    prefill_logits = np.asarray(nh.logits(w, hidden))
    for b, n in enumerate(prompt_lengths):
        assert float(np.abs(prefill_logits[b, :n] - full[b, :n]).max()) < TOL
    assert state.ssm.dtype == jnp.float32 and state.ssm.shape == (3 if pattern == "MM*-M*-" else 1, 4, 8, 6, 5)
    grouped = nh.repeat_rows(state, 3)  # G rollouts per prompt start from copies of its state
    assert grouped.k.shape[1] == 12 and grouped.conv["x"].shape[1] == 12
    np.testing.assert_array_equal(np.asarray(grouped.lengths_B), np.repeat(prompt_lengths, 3))
    np.testing.assert_array_equal(np.asarray(grouped.ssm[:, 4]), np.asarray(state.ssm[:, 1]))
    diffs = []
    for j in range(steps):
        at = prompt_lengths + j
        hidden, state = _decode(w, state, jnp.asarray(tokens[np.arange(4), at])[:, None])
        step_logits = np.asarray(nh.logits(w, hidden))[:, 0]
        diffs.append(float(np.abs(step_logits - full[np.arange(4), at]).max()))
    assert max(diffs) < TOL, diffs
    np.testing.assert_array_equal(np.asarray(state.lengths_B), prompt_lengths + steps)


def test_greedy_decoding_equals_hf_generate(saved):
    """Greedy tokens from prefill + decode_step (the shapes of the test above: no new compile)
    equal transformers' generate(do_sample=False)."""
    hf, _, ours = saved["MM*-M*-"]
    w = ours.weights()
    prompts = random_tokens(4, 6, seed=6)
    new = 5
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[:, 6:].numpy()
    hidden, state = _prefill(w, jnp.asarray(prompts), jnp.full((4,), 6), capacity=6 + new)
    token = jnp.argmax(nh.logits(w, hidden[:, -1:]), axis=-1)  # [B, 1]
    got = [token]
    for _ in range(new - 1):
        hidden, state = _decode(w, state, token)
        token = jnp.argmax(nh.logits(w, hidden), axis=-1)
        got.append(token)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(got, axis=1)), want)


# ---------------------------------------------------------------- HF export, counts, errors

@pytest.mark.parametrize("pattern", ["MM*-M*-", "M-M-"])
def test_save_hf_loads_in_transformers_with_equal_logits(saved, pattern, tmp_path):
    _, _, ours = saved[pattern]
    nhf.save_hf(ours, tmp_path)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")  # not safetensors' own 0600
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).float().eval()
    assert sum(p.numel() for p in hf.parameters()) == ours.config.num_params()
    tokens = random_tokens(2, seed=8)
    want = ours_logits(ours, tokens)
    assert float(np.abs(hf_logits(hf, tokens) - want).max()) < TOL
    again = nhf.load_hf(tmp_path)
    assert again.config == ours.config
    assert float(np.abs(ours_logits(again, tokens) - want).max()) == 0.0


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_num_params_equals_transformers_count(saved, pattern):
    hf, _, ours = saved[pattern]
    assert ours.config.num_params() == sum(p.numel() for p in hf.parameters())
    assert ours.config.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    with nnx.use_eager_sharding(False):
        fresh = nnx.eval_shape(lambda: nh.NemotronH(ours.config, nnx.Rngs(0)))
    assert ours.config.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(fresh, nnx.Param)))


PRESET_COUNTS = {"nemotron-nano-12b-v2": 12_310_001_152, "nemotron-nano-9b-v2": 8_888_227_328,
                 "nemotron-h-8b": 8_100_852_736}


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_preset_counts_equal_transformers_on_meta_device(name, tmp_path):
    c = nh.preset(name)
    assert c.num_params() == PRESET_COUNTS[name]
    (tmp_path / "config.json").write_text(json.dumps(nhf.config_to_hf(c)))
    hf_cfg = transformers.NemotronHConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(hf_cfg)
    assert sum(p.numel() for p in model.parameters()) == PRESET_COUNTS[name]
    assert nhf.config_from_hf(nhf.config_to_hf(c)) == c


def _config_json(folder, **changes):
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf | changes))


@pytest.fixture()
def folder_copy(saved, tmp_path):
    _, folder, _ = saved["MM*-M*-"]
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    (dict(layers_block_type=["mamba", "moe", "attention", "mlp"]), "has MoE blocks"),
    (dict(layers_block_type=None, hybrid_override_pattern="ME*-"), "has MoE blocks"),
    (dict(use_bias=True), "projection biases"),
    (dict(mlp_hidden_act="silu"), "only 'relu2'"),
    (dict(model_type="llama"), "is not 'nemotron_h'"),
    (dict(layers_block_type=["mamba", "mamba", "attention", "mlp", "mamba", "attention", "conv"]),
     "not a Nemotron-H block"),
])
def test_unsupported_configs_are_refused_in_one_sentence(folder_copy, changes, message):
    _config_json(folder_copy, **changes)
    with pytest.raises(HFFormatError, match=message) as err:
        nhf.load_hf(folder_copy)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_moe_pattern_is_refused_by_the_config():
    with pytest.raises(ValueError, match="only dense Nemotron-H models"):
        nh.preset("nemotron-h-tiny", pattern="ME*")


def test_mismatched_tensor_shape_is_refused(folder_copy):
    _config_json(folder_copy, mamba_head_dim=3)
    with pytest.raises(HFFormatError, match=r"has shape .* but config.json implies"):
        nhf.load_hf(folder_copy)


# ---------------------------------------------------------------- sharding

def test_sharded_forward_equals_unsharded(saved):
    from jax.sharding import PartitionSpec as P

    hf, folder, ours = saved["MM*-M*-"]
    tokens = random_tokens(4, seed=9)
    valid = np.ones(tokens.shape, bool)
    valid[1, 7:] = False
    want = ours_logits(ours, tokens, valid)
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = nhf.load_hf(folder, mesh=mesh)
    assert sharded.mamba.in_x[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded.mamba.out[...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert sharded.attention.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        got = _forward(sharded, jnp.asarray(tokens), jnp.asarray(valid))
    assert got.sharding.spec[0] == ("data", "fsdp")
    # Another summation order: 6 blocks of at most ~10 chained reductions of at most 48 terms.
    tol = forward_tolerance(want[valid], depth=62, width=48)
    assert float(np.abs(np.asarray(got) - want)[valid].max()) <= tol
    # Prefill and a decode step under the mesh: the state sharded by its logical axes, same values.
    lengths = jnp.asarray([6, 3, 5, 2])
    prompts = jnp.asarray(tokens[:, :6])
    _, state = _prefill(ours.weights(), prompts, lengths, capacity=T)
    hidden, state = _decode(ours.weights(), state, prompts[:, :1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        _, sharded_state = _prefill(sharded.weights(), prompts, lengths, capacity=T)
        sharded_hidden, sharded_state = _decode(sharded.weights(), sharded_state, prompts[:, :1])
    assert sharded_state.ssm.sharding.spec == P(None, ("data", "fsdp"), "tensor")
    assert sharded_state.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    assert float(np.abs(np.asarray(sharded_hidden) - np.asarray(hidden)).max()) <= \
        forward_tolerance(hidden, depth=62, width=48)
    for a, b in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(state)):
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= forward_tolerance(b, depth=62, width=48)
