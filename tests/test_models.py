"""The decoder itself: configs and presets, sharded execution, remat, dtypes, the fused attention
kernels against the XLA path.

Parity with `transformers` and HF import/export live in test_hf.py; incremental decoding over the
rollout cache in test_decode.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlp_jax import sharding
from rlp_jax.models import PRESETS, ModelConfig, RopeScaling, Transformer, decode, kernels, preset, transformer
from tolerances import forward_tolerance


def small_config(family: str = "qwen3", **overrides) -> ModelConfig:
    """Every dimension divides the (2, 2, 2) test mesh; Llama gets a RoPE scaling that bites."""
    scaling = RopeScaling(8.0, 1.0, 4.0, 8) if family == "llama" else None
    return ModelConfig(family, 64, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 64, scaling).replace(
        **overrides)


def abstract_model(config: ModelConfig) -> Transformer:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))


def with_params(model: Transformer, params: dict) -> Transformer:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Unsharded model with std-0.2 weights and norm scales 1 ± 0.3 (so mistakes show); numpy draws
    them, which is much quicker on CPU than eager jax.random."""
    model = abstract_model(config)
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.3 * noise if "norm" in str(path[-1]) else 0.2 * noise)

    return with_params(model, jax.tree.map_with_path(draw, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def copy_params(src: Transformer, config: ModelConfig) -> Transformer:
    """A model of `config` (e.g. another remat or dtype) holding `src`'s weights."""
    return with_params(abstract_model(config), nnx.to_pure_dict(nnx.state(src, nnx.Param)))


def random_batch(vocab: int, lengths, width: int, seed: int = 0):
    """Right-padded rows of the given lengths: tokens, positions 0…width−1, valid mask."""
    rng = np.random.RandomState(seed)
    valid = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    tokens = np.where(valid, rng.randint(0, vocab, (len(lengths), width)), 0)
    positions = np.broadcast_to(np.arange(width), valid.shape)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(valid)


# Jitted once per module (a fresh nnx.jit per call would recompile every time).
_forward = nnx.jit(lambda m, t, p, v: m(t, p, v))


def forward(model, tokens, positions, valid=None):
    return _forward(model, tokens, positions, valid)


# ---------------------------------------------------------------- config and presets

@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config(name):
    c = preset(name)
    assert isinstance(c, ModelConfig) and c == PRESETS[name]
    assert c.family in ("qwen3", "llama") and c.qk_norm == (c.family == "qwen3")
    assert c.num_heads % c.num_kv_heads == 0 and c.head_dim % 2 == 0
    assert (c.rope_scaling is not None) == name.startswith("llama")
    assert (c.dtype, c.param_dtype, c.remat) == ("float32", "float32", "none")
    assert ModelConfig(**{f: getattr(c, f) for f in c.__dataclass_fields__}) == c  # re-validates
    assert preset(name, vocab_size=7, dtype="bfloat16").vocab_size == 7


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'; choose one of qwen3-0.6b"):
        preset("qwen9")


def abstract_param_count(config: ModelConfig) -> int:
    model = abstract_model(config)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing materialised
    return sum(int(np.prod(x.shape)) for x in leaves)


# Published sizes, checked against the shapes: Qwen3 cards give totals and non-embedding counts;
# Qwen3-1.7B's hub total of 2.03e9 counts the lm_head copy stored in its files although
# config.json ties it (= the untied count); Llama-3.2-1B 1.24e9, Llama-3.1-8B 8.03e9 (6.98e9 without its two
# vocabulary matrices).
@pytest.mark.parametrize("name, total, untied_total, non_embedding", [
    ("qwen3-0.6b", 0.596e9, 0.752e9, 0.44e9),
    ("qwen3-1.7b", 1.72e9, 2.03e9, 1.41e9),
    ("llama-3.2-1b", 1.236e9, 1.498e9, 0.974e9),
    ("llama-3.1-8b", 8.03e9, 8.03e9, 6.98e9),
])
def test_num_params_matches_shapes_and_published_sizes(name, total, untied_total, non_embedding):
    c = preset(name)
    assert c.num_params() == abstract_param_count(c)
    assert c.num_params() == pytest.approx(total, rel=3e-3)
    untied = c.replace(tie_embeddings=False)
    assert untied.num_params() == abstract_param_count(untied) == pytest.approx(untied_total, rel=3e-3)
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    assert c.num_params() - embeddings == pytest.approx(non_embedding, rel=5e-3)


def test_num_params_of_a_tiny_config_by_hand():
    c = small_config("qwen3")  # D=32, F=64, H=4, K=2, hd=8, L=2, V=64, untied
    attn = 32 * 8 * (4 + 2 + 2) + 4 * 8 * 32 + 2 * 8  # q, k, v, o, q_norm + k_norm
    per_layer = attn + 3 * 32 * 64 + 2 * 32
    assert c.num_params() == 2 * per_layer + 2 * 64 * 32 + 32
    assert c.replace(family="llama").num_params() == c.num_params() - 2 * 2 * 8


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 must be a multiple of num_kv_heads=4"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(num_kv_heads=0), "num_kv_heads=0 must be a positive integer"),
    (dict(num_heads=0), "num_heads=0 must be a positive integer"),
    (dict(head_dim=7), "head_dim=7 must be even"),
    (dict(remat="selective"), "remat='selective' is unknown"),
])
def test_config_rejects_bad_shapes_with_a_clear_message(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config().replace(**changes)


# ---------------------------------------------------------------- sharding

def test_sharded_model_equals_unsharded():
    c = small_config("llama")
    reference = random_model(c, seed=4)
    tokens, positions, valid = random_batch(c.vocab_size, [9, 4, 1, 7], 9, seed=5)
    want = np.asarray(forward(reference, tokens, positions, valid))

    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        model = Transformer(c, nnx.Rngs(99), init_std=0.2)
        q = model.layers.q[...]
        assert q.sharding.spec == P(None, "fsdp", "tensor", None)
        assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 8)}
        assert model.layers.down[...].sharding.spec == P(None, "tensor", "fsdp")
        assert model.embed[...].sharding.spec == P("tensor", "fsdp")
        # Same weights as the reference, placed on the shardings the model was built with.
        state = nnx.state(model, nnx.Param)
        placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                              nnx.to_pure_dict(nnx.state(reference, nnx.Param)), nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, placed)
        nnx.update(model, state)
        assert model.layers.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
        got = forward(model, tokens, positions, valid)
        assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    diff = float(np.abs(np.asarray(got) - want)[np.asarray(valid)].max())
    # Another summation order: 2 layers of ~9 chained reductions of at most 64 terms, plus the head.
    assert diff <= forward_tolerance(want[np.asarray(valid)], depth=20, width=64)


# ---------------------------------------------------------------- remat and dtypes

def loss_fn(model, tokens, positions, valid):
    """Next-token NLL over valid targets, and the logits."""
    logits = model(tokens, positions, valid)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = valid[:, 1:]
    return jnp.sum(nll * mask) / jnp.sum(mask), logits


_value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))


def test_remat_policies_give_same_logits_and_gradients():
    base = random_model(small_config("qwen3"), seed=7)
    batch = random_batch(64, [8, 5], 8, seed=7)
    (l0, logits0), g0 = _value_and_grad(base, *batch)
    flat0 = jax.tree.leaves(nnx.to_pure_dict(g0))
    assert len(flat0) == 14 and all(float(jnp.abs(a).max()) > 0 for a in flat0)
    graphdef, state = nnx.split(base)
    assert "remat" not in str(jax.make_jaxpr(lambda s: loss_fn(nnx.merge(graphdef, s), *batch)[0])(state))
    for policy, marker in [("full", "policy=None"), ("dots_saveable", "policy=DotsSaveable")]:
        remat = copy_params(base, base.config.replace(remat=policy))
        (l1, logits1), g1 = _value_and_grad(remat, *batch)
        np.testing.assert_allclose(logits1, logits0, atol=1e-5)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for a, b in zip(flat0, jax.tree.leaves(nnx.to_pure_dict(g1)), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
        # The policy is really in the program.
        graphdef, state = nnx.split(remat)
        jaxpr = str(jax.make_jaxpr(lambda s: loss_fn(nnx.merge(graphdef, s), *batch)[0])(state))
        assert "remat2[" in jaxpr and marker in jaxpr, policy  # jax.checkpoint's primitive


def test_bfloat16_compute_is_close_to_float32():
    """bf16 activations and matmuls (fp32 params, fp32 softmax and norm statistics). Tolerance:
    every logit within 0.15·std of the fp32 logits, 0.02·std on average (measured: 0.09·std and
    0.012·std), and ≥ 90% of argmax tokens unchanged. bf16 keeps 8 mantissa bits: a relative error
    of a few 1e-3 per op compounds to a few 1e-2 after two layers."""
    base = random_model(small_config("llama"), seed=8)
    low = copy_params(base, base.config.replace(dtype="bfloat16"))
    tokens, positions, valid = random_batch(64, [16, 11, 6, 16], 16, seed=8)
    want = np.asarray(forward(base, tokens, positions, valid))[np.asarray(valid)]
    got16 = forward(low, tokens, positions, valid)
    assert got16.dtype == jnp.bfloat16
    assert low.embed[...].dtype == jnp.float32  # only the compute dtype changed
    got = np.asarray(got16, np.float32)[np.asarray(valid)]
    err = np.abs(got - want)
    assert err.max() <= 0.15 * want.std() and err.mean() <= 0.02 * want.std()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    assert decode.empty_block(low.config, 1, 4)[0][0].dtype == jnp.bfloat16  # the rollout cache too


# ---------------------------------------------------------------- fused attention kernels

def test_splash_attention_kernel_equals_the_xla_path_forward_and_backward():
    """The TPU kernel in Pallas interpret mode (any backend): causal grouped-query attention with
    the sequence padded to 128, values and gradients as the XLA einsum path gives them."""
    rng = np.random.RandomState(0)
    B, T, Q, J, H = 2, 40, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (Q, J, J))

    def loss(fn, q, k, v):
        return (fn(q, k, v) * jnp.cos(jnp.arange(H))).sum()

    xla = lambda q, k, v: transformer.self_attention(q, k, v, setting="xla")
    splash = lambda q, k, v: transformer.splash_attention(q, k, v, interpret=True)
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-5)
    for a, b in zip(jax.grad(lambda *x: loss(splash, *x), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(lambda *x: loss(xla, *x), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # Under a (2, 2, 2) mesh it runs per device (shard_map over rows and heads).
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = jax.jit(splash)(*(jnp.concatenate([x, x]) for x in (q, k, v)))
    np.testing.assert_allclose(sharded, jnp.concatenate([xla(q, k, v)] * 2), atol=2e-5)


def test_attention_kernel_choice():
    """The platform-by-platform choice is tested in test_attention_kernels.py."""
    choose = kernels.attention_kernel
    assert choose("auto", None, jnp.bfloat16, 128) == "xla"  # an unresolved config
    assert choose("auto", "cpu", jnp.bfloat16, 128) == "xla"
    assert choose("splash", "cpu", jnp.float32, 128) == "splash"
    with pytest.raises(ValueError, match="attention='flash' is unknown"):
        small_config(attention="flash")
