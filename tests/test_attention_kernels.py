"""Kernel choice for the platform a program is compiled for (rlp_jax.models.kernels), and the
fused attention paths against the XLA path: splash (Pallas interpret mode, on CPU) at lengths its
blocks do not divide and with masks that have holes, cuDNN's odd-length padding (through
`jax.nn.dot_product_attention`'s XLA implementation, the same computation), refused masks."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlp_jax import sharding
from rlp_jax.models import ModelConfig, convert, decode, init_model, kernels
from rlp_jax.models import nemotron_h as nh
from rlp_jax.models import nemotron_h_decode as hd
from rlp_jax.models import transformer

Q, J, H = 4, 2, 16


def small_config(**overrides) -> ModelConfig:
    return ModelConfig("qwen3", 64, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 64).replace(**overrides)


def qkv(B: int, T: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (Q, J, J))


def xla(q, k, v, valid=None):
    return transformer.self_attention(q, k, v, valid, "xla")


def loss(fn, q, k, v, rows_BxT=None):
    """A loss that weighs every output element differently (over `rows_BxT` only, if given)."""
    out = fn(q, k, v) * jnp.cos(jnp.arange(H))
    return (out if rows_BxT is None else jnp.where(rows_BxT[..., None, None], out, 0)).sum()


def assert_same_values_and_grads(fn, q, k, v, rows_BxT=None, atol=2e-5, grad_atol=1e-4, valid=None):
    """`fn` against the XLA path with `valid`: outputs (on `rows_BxT`) and the gradients of `loss`;
    returns `fn`'s outputs."""
    want_fn = lambda q, k, v: xla(q, k, v, valid)
    both = jax.jit(lambda f, q, k, v: (f(q, k, v), jax.grad(lambda *x: loss(f, *x, rows_BxT), argnums=(0, 1, 2))(
        q, k, v)), static_argnums=0)
    (got, got_grads), (want, want_grads) = both(fn, q, k, v), both(want_fn, q, k, v)
    rows = np.ones(got.shape[:2], bool) if rows_BxT is None else np.asarray(rows_BxT)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=atol)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=grad_atol)
    return np.asarray(got)


# ---------------------------------------------------------------- choosing the kernel

def test_auto_resolves_to_the_target_platforms_kernel():
    choose = lambda platform, **kw: kernels.config_attention_kernel(
        kernels.resolve_kernels(small_config(head_dim=128, **kw), platform))
    assert choose("cpu", dtype="bfloat16") == "xla"
    assert choose("tpu") == choose("tpu", dtype="bfloat16") == "splash"
    assert choose("gpu", dtype="bfloat16") == choose("cuda", dtype="float16") == "cudnn"
    assert choose("gpu") == "xla"  # float32: cuDNN flash attention takes 16-bit inputs only
    assert kernels.attention_kernel("auto", "gpu", jnp.bfloat16, 12) == "xla"  # not a multiple of 8
    assert kernels.attention_kernel("auto", "gpu", jnp.bfloat16, 256) == "xla"
    assert kernels.attention_kernel("auto", None, jnp.bfloat16, 128) == "xla"  # unresolved
    assert kernels.attention_kernel("splash", None, jnp.float32, 128) == "splash"  # forced stays forced
    assert kernels.resolve_kernels(nh.preset("nemotron-h-tiny"), "tpu").platform == "tpu"


def test_forced_kernels_that_cannot_run_on_the_target_are_refused():
    with pytest.raises(ValueError, match="attention='splash' is the TPU kernel"):
        kernels.resolve_kernels(small_config(attention="splash"), "gpu")
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU, a bfloat16"):
        kernels.resolve_kernels(small_config(attention="cudnn"), "gpu")  # float32
    with pytest.raises(ValueError, match="platform 'metal' is unknown"):
        kernels.resolve_kernels(small_config(), "metal")
    with pytest.raises(ValueError, match="platform='gpu0' is unknown"):
        small_config(platform="gpu0")
    assert kernels.resolve_kernels(small_config(attention="cudnn", dtype="bfloat16"), "gpu").attention == "cudnn"


def test_resolving_leaves_the_serialised_config_unchanged():
    """A run's identity is computed from config_to_json: it must not depend on the platform."""
    for config in (small_config(), nh.preset("nemotron-h-tiny")):
        text = convert.config_to_json(config)
        for platform in kernels.PLATFORMS:
            assert convert.config_to_json(kernels.resolve_kernels(config, platform)) == text
        assert "platform" not in json.loads(text)
        assert convert.config_from_json(text) == config


def test_unresolved_auto_runs_the_xla_path_whatever_the_default_backend(monkeypatch):
    """Compiling on a CPU host for a TPU: the kernel comes from the config, never from
    `jax.default_backend()` at trace time."""
    tokens = jnp.zeros((2, 40), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(40), tokens.shape)
    traced = lambda config: str(jax.make_jaxpr(lambda t: init_model(config).hidden_states(t, positions))(tokens))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert "pallas_call" not in traced(small_config())
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert "pallas_call" in traced(kernels.resolve_kernels(small_config(), "tpu"))


def test_the_hybrid_attention_layers_use_the_resolved_kernel():
    c = nh.preset("nemotron-h-tiny")
    with nnx.use_eager_sharding(False):
        w = jax.eval_shape(lambda: nh.NemotronH(c, nnx.Rngs(0)).weights())  # shapes suffice to trace
    tokens = jnp.zeros((2, 40), jnp.int32)
    traced = lambda config, f: str(jax.make_jaxpr(f)(dataclasses.replace(w, config=config), tokens))
    forward = lambda w, t: nh.hidden_states(w, t)
    prefill = lambda w, t: hd.prefill(hd.decode_weights(w), t, jnp.asarray([3, 40]))  # right padding runs fused too
    for f in (forward, prefill):
        assert "pallas_call" not in traced(c, f)
        assert "pallas_call" in traced(kernels.resolve_kernels(c, "tpu"), f)


def test_auto_on_a_gpu_runs_cudnn_and_a_masked_call_the_xla_path(monkeypatch):
    calls, real = [], transformer.cudnn_attention

    def fake_cudnn(q, k, v):  # cuDNN cannot run here: its XLA twin, recorded
        calls.append(q.shape)
        return real(q, k, v, implementation="xla")

    monkeypatch.setattr(transformer, "cudnn_attention", fake_cudnn)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 9))
    valid = jnp.ones((2, 9), bool).at[0, 3].set(False)
    out = transformer.self_attention(q, k, v, None, "auto", "gpu")
    assert calls == [q.shape]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla(q, k, v), np.float32), atol=2e-2)
    transformer.self_attention(q, k, v, valid, "auto", "gpu")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="attention='cudnn' cannot leave out keys by a mask"):
        transformer.self_attention(q, k, v, valid, "cudnn", "gpu")


def test_decode_picks_the_cpu_score_form_from_the_config_not_the_backend():
    rng = np.random.RandomState(0)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    N, P, S = 2, 5, 4
    args = (draw(N, 1, Q, H), draw(N, J, H, P), draw(N, J, P, H), jnp.asarray([5, 3]),
            [draw(N, J, H, S)], [draw(N, J, S, H)], jnp.zeros((N, 1), jnp.int32))
    score_dots = lambda platform: str(jax.make_jaxpr(
        lambda *a: decode.cached_attention(*a, platform=platform))(*args)).count("dot_general")
    assert score_dots("tpu") == score_dots(None) == score_dots("cpu") + 2  # one per partial softmax
    np.testing.assert_allclose(decode.cached_attention(*args, platform="cpu"),
                               decode.cached_attention(*args, platform="tpu"), atol=1e-5)


# ---------------------------------------------------------------- splash: block sizes and masks

def test_splash_blocks_divide_the_padded_length():
    for T in range(1, 5000):
        block, padded = transformer.splash_blocks(T)
        assert block % 128 == 0 and block <= 512 and padded % block == 0 and T <= padded < T + block, T
    assert transformer.splash_blocks(600) == (512, 1024) and transformer.splash_blocks(4097) == (512, 4608)


@pytest.mark.parametrize("T", [600, 130, 1000])
def test_splash_at_lengths_its_blocks_do_not_divide(T):
    """600 padded to 128s is 640, which 512-blocks do not divide (ValueError before)."""
    assert_same_values_and_grads(lambda q, k, v: transformer.splash_attention(q, k, v, interpret=True),
                                 *qkv(1, T, seed=T))


def test_splash_of_the_same_shape_in_one_program_after_another():
    """A kernel built while tracing one program holds that trace's arrays: it must not serve the
    next (an UnexpectedTracerError when kernels were cached by shape)."""
    q, k, v = qkv(1, 24)
    splash = lambda q, k, v: transformer.splash_attention(q, k, v, interpret=True)
    first = jax.jit(lambda q, k, v: splash(q, k, v) * 2)(q, k, v)
    np.testing.assert_allclose(jax.jit(splash)(q, k, v) * 2, first, atol=1e-6)


def test_splash_leaves_out_the_keys_a_mask_with_holes_marks():
    """Valid queries see exactly the valid keys up to them; invalid ones get finite outputs."""
    B, T = 2, 150
    rng = np.random.RandomState(1)
    valid = rng.rand(B, T) > 0.3
    valid[0, :20] = False  # a leading run: queries with no valid key at or before them
    valid[1, 60:] = False  # right padding
    valid = jnp.asarray(valid)
    q, k, v = qkv(B, T, seed=2)
    splash = lambda q, k, v: transformer.splash_attention(q, k, v, valid, interpret=True)
    got = assert_same_values_and_grads(splash, q, k, v, rows_BxT=valid, valid=valid)
    assert np.isfinite(got).all()
    assert float(jnp.abs(xla(q, k, v) - xla(q, k, v, valid))[valid].max()) > 0.1  # the holes matter


def test_splash_with_a_mask_under_a_mesh():
    B, T = 2, 40
    valid = jnp.asarray(np.random.RandomState(3).rand(B, T) > 0.4).at[:, 0].set(True)
    q, k, v = qkv(B, T, seed=4)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        got = jax.jit(lambda *x: transformer.splash_attention(*x, interpret=True))(
            *(jnp.concatenate([x, x]) for x in (q, k, v, valid)))
    want = jnp.concatenate([xla(q, k, v, valid)] * 2)
    rows = np.asarray(jnp.concatenate([valid, valid]))
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)


# ---------------------------------------------------------------- cuDNN: odd lengths, right padding

@pytest.mark.parametrize("T", [1, 15, 64])
def test_cudnn_padding_for_odd_lengths_changes_no_value_or_gradient(T, monkeypatch):
    lengths = []
    real = jax.nn.dot_product_attention

    def recorded(q, *args, **kwargs):
        lengths.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    assert_same_values_and_grads(lambda q, k, v: transformer.cudnn_attention(q, k, v, implementation="xla"),
                                 *qkv(2, T, seed=T))
    assert lengths and all(n % 2 == 0 for n in lengths) and set(lengths) == {T + T % 2}


def test_right_padded_rows_need_no_key_mask():
    """Why the hybrid's prefill passes no mask (and so runs fused): under the causal mask no
    real query sees a key after it, so leaving out the padding changes no real row."""
    B, T = 3, 12
    valid = jnp.arange(T)[None, :] < jnp.asarray([12, 5, 1])[:, None]
    q, k, v = qkv(B, T, seed=5)
    np.testing.assert_allclose(np.asarray(xla(q, k, v))[np.asarray(valid)],
                               np.asarray(xla(q, k, v, valid))[np.asarray(valid)], atol=1e-6)
