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

from rlp_jax import sampling, sharding
from rlp_jax.models import decode, mamba2
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_decode as hd
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


# ---------------------------------------------------------------- prefill + decode (the rollout cache)

G_ROWS, BLOCK = 2, 3
_extend = jax.jit(hd.extend, static_argnames=("attend_blocks", "write_blocks"))


def _cache(w, prompts, lengths, suffix_slots):
    """The prompts prefilled once each (`hd.prefill`) and a rollout cache for G_ROWS rows per prompt
    with suffix blocks of BLOCK slots: (prefill hidden states, cache)."""
    hidden, prefix_k, prefix_v, conv, ssm = jax.jit(hd.prefill)(w, jnp.asarray(prompts), jnp.asarray(lengths))
    N = len(prompts) * G_ROWS
    blocks = [hd.empty_blocks(w.config, N, BLOCK) for _ in range(decode.num_blocks(suffix_slots, BLOCK))]
    kv = decode.RolloutCache(prefix_k, prefix_v, jnp.asarray(lengths, jnp.int32), tuple(k for k, _ in blocks),
                             tuple(v for _, v in blocks))
    rows = lambda a: jnp.repeat(a, G_ROWS, axis=0)
    return hidden, hd.HybridCache(kv, tuple({k: rows(v) for k, v in c.items()} for c in conv), tuple(map(rows, ssm)))


@pytest.mark.parametrize("pattern", ["MM*-M*-", "*--*M"])
def test_prefill_then_decode_across_blocks_equals_forward(saved, pattern):
    """Ragged prompts (right-padded) prefilled once each, G rows per prompt fed their own tokens one
    per step across cache blocks, then three at once (RLP scoring) straddling a block boundary:
    every logit equals the full forward's at that position (each row's own sequence)."""
    _, _, ours = saved[pattern]
    w = hd.decode_weights(ours.weights())
    lengths = np.array([6, 2, 4, 1])
    P, steps, fed = int(lengths.max()), 4, 3
    prompts = np.where(np.arange(P)[None] < lengths[:, None], random_tokens(4, P, seed=4), 0)
    new = random_tokens(4 * G_ROWS, steps + fed, seed=5)
    hidden, cache = _cache(w, prompts, lengths, steps + fed)
    prefill_logits = np.asarray(hd.logits(w, hidden))
    for b, n in enumerate(lengths):
        assert float(np.abs(prefill_logits[b, :n] - ours_logits(ours, prompts[b:b + 1, :n])[0]).max()) < TOL
    got = []
    for s in range(steps):
        block = s // BLOCK
        hidden, cache = _extend(w, cache, jnp.asarray(new[:, s:s + 1]), jnp.full((len(new), 1), s),
                                attend_blocks=block + 1, write_blocks=(block,))
        got.append(np.asarray(hd.logits(w, hidden)))
    blocks = len(cache.kv.block_k)
    hidden, cache = _extend(w, cache, jnp.asarray(new[:, steps:]), jnp.broadcast_to(steps + jnp.arange(fed), (len(new), fed)),
                            attend_blocks=blocks, write_blocks=tuple(range(blocks)))
    got = np.concatenate(got + [np.asarray(hd.logits(w, hidden))], axis=1)
    width = P + steps + fed
    seqs = np.zeros((len(new), width), np.int64)
    for n in range(len(new)):
        b = n // G_ROWS
        seqs[n, :lengths[b] + steps + fed] = np.concatenate([prompts[b, :lengths[b]], new[n]])
    full = ours_logits(ours, seqs)
    want = np.stack([full[n, lengths[n // G_ROWS]:lengths[n // G_ROWS] + steps + fed] for n in range(len(new))])
    assert float(np.abs(got - want).max()) < TOL


def test_rows_not_advanced_keep_their_mamba_state(saved):
    """`advance_N` False: the row's conv and SSM state stay exactly as they were (a sampled stop
    token is not taken into the state a row continues from)."""
    _, _, ours = saved["MM*-M*-"]
    w = hd.decode_weights(ours.weights())
    _, cache = _cache(w, random_tokens(2, 3, seed=7), np.array([3, 2]), 4)
    advance = jnp.array([True, False, True, False])
    _, after = jax.jit(hd.extend, static_argnames=("attend_blocks", "write_blocks"))(
        w, cache, jnp.asarray(random_tokens(4, 1, seed=8)), jnp.zeros((4, 1), jnp.int32), attend_blocks=1,
        write_blocks=(0,), advance_N=advance)
    for before_ssm, after_ssm in zip(cache.ssm, after.ssm):
        np.testing.assert_array_equal(np.asarray(after_ssm)[1::2], np.asarray(before_ssm)[1::2])
        assert np.abs(np.asarray(after_ssm)[0::2] - np.asarray(before_ssm)[0::2]).max() > 1e-3
    for before_conv, after_conv in zip(cache.conv, after.conv):
        np.testing.assert_array_equal(np.asarray(after_conv["x"])[1::2], np.asarray(before_conv["x"])[1::2])


def test_greedy_decoding_equals_hf_generate(saved):
    """Greedy tokens of the hybrid's sampler (prefill, decode loop over cache blocks) equal
    transformers' generate(do_sample=False)."""
    hf, _, ours = saved["MM*-M*-"]
    prompts = random_tokens(4, 6, seed=6)
    new = 5
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[:, 6:].numpy()
    cfg = sampling.SamplingConfig(max_new_tokens=new, temperature=0.0, block_len=2)
    out = sampling.generate(ours, prompts, np.full(4, 6), jax.random.key(0), cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens_NxL), want)


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
    # Prefill and a decode step under the mesh: the cache sharded by its logical axes, same values.
    lengths = np.array([6, 3, 5, 2])
    prompts = tokens[:, :6]

    def prefill_and_step(model):
        w = hd.decode_weights(model.weights())
        _, cache = _cache(w, prompts, lengths, 2)
        return _extend(w, cache, jnp.asarray(tokens[:, :2].reshape(-1, 1)), jnp.zeros((8, 1), jnp.int32),
                       attend_blocks=1, write_blocks=(0,))

    hidden, cache = prefill_and_step(ours)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded_hidden, sharded_cache = prefill_and_step(sharded)
    assert sharded_cache.ssm[0].sharding.spec == P(("data", "fsdp"), "tensor")
    assert sharded_cache.kv.prefix_k[0].sharding.spec == P(("data", "fsdp"), "tensor")
    assert sharded_cache.kv.block_v[0][0].sharding.spec == P(("data", "fsdp"), "tensor")
    assert float(np.abs(np.asarray(sharded_hidden) - np.asarray(hidden)).max()) <= \
        forward_tolerance(hidden, depth=62, width=48)
    for a, b in zip(jax.tree.leaves(sharded_cache), jax.tree.leaves(cache)):
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= forward_tolerance(b, depth=62, width=48)
