"""The rollout cache (rlp_jax.models.decode): prefill + decode across blocks equal a full forward,
shared-prefix attention equals ordinary attention, pads never leak, sharded equals unsharded, and
the compiled decode loop copies no layer's cache or weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlp_jax import sampling, sharding
from rlp_jax.models import ModelConfig, RopeScaling, decode, init_model, kernels, transformer

import decode_loop

B, G = 3, 2
LENGTHS = np.array([5, 2, 7])


def small_config(family="qwen3", **overrides):
    scaling = RopeScaling(8.0, 1.0, 4.0, 8) if family == "llama" else None
    return ModelConfig(family, 64, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 64, scaling).replace(**overrides)


def _prompts(vocab, width=7, seed=0):
    rng = np.random.RandomState(seed)
    tokens = np.where(np.arange(width) < LENGTHS[:, None], rng.randint(1, vocab, (B, width)), 0)
    return jnp.asarray(tokens, jnp.int32)


def _cache(weights, prompts, block_len, num_blocks):
    _, prefix_k, prefix_v = decode.prefill(weights, prompts, jnp.asarray(LENGTHS, jnp.int32))
    blocks = [decode.empty_block(weights.config, B * G, block_len) for _ in range(num_blocks)]
    return decode.RolloutCache(prefix_k, prefix_v, jnp.asarray(LENGTHS, jnp.int32), tuple(k for k, _ in blocks),
                               tuple(v for _, v in blocks))


_extend = jax.jit(decode.extend, static_argnames=("attend_blocks", "write_blocks"))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_prefill_and_decode_across_blocks_equal_a_full_forward(family):
    c = small_config(family)
    model = init_model(c, seed=1)
    weights = decode.decode_weights(model)
    prompts, steps, block_len = _prompts(c.vocab_size), 5, 2
    new_NxS = np.random.RandomState(2).randint(1, c.vocab_size, (B * G, steps + 3))
    cache = _cache(weights, prompts, block_len, decode.num_blocks(steps + 3, block_len))
    got = []
    for s in range(steps):  # one token per step, as the sampler feeds them
        block = s // block_len
        hidden, cache = _extend(weights, cache, jnp.asarray(new_NxS[:, s:s + 1], jnp.int32),
                                jnp.full((B * G, 1), s, jnp.int32), attend_blocks=block + 1, write_blocks=(block,))
        got.append(decode.logits(weights, hidden))
    # Then three tokens at once (as RLP scoring does), straddling a block boundary.
    hidden, cache = _extend(weights, cache, jnp.asarray(new_NxS[:, steps:], jnp.int32),
                            jnp.broadcast_to(steps + jnp.arange(3), (B * G, 3)),
                            attend_blocks=cache.num_blocks, write_blocks=tuple(range(cache.num_blocks)))
    got.append(decode.logits(weights, hidden))
    got = np.concatenate(got, axis=1)
    for n in range(B * G):
        b = n // G
        seq = np.concatenate([np.asarray(prompts[b, :LENGTHS[b]]), new_NxS[n]])
        want = model(jnp.asarray(seq)[None], jnp.arange(len(seq))[None])[0, LENGTHS[b]:]
        np.testing.assert_allclose(got[n], want, atol=2e-5)


def _reference_attention(q_NxTxQxH, prefix_k, prefix_v, blocks_k, blocks_v, slots_NxT):
    """Ordinary attention over each row's own copy of its prompt's keys followed by its suffix."""
    N, T, Q, H = q_NxTxQxH.shape
    Bp, J, P, _ = prefix_v.shape
    k = jnp.swapaxes(jnp.concatenate([jnp.repeat(prefix_k, N // Bp, 0)] + list(blocks_k), axis=3), 2, 3)
    v = jnp.concatenate([jnp.repeat(prefix_v, N // Bp, 0)] + list(blocks_v), axis=2)
    prefix_valid = jnp.repeat(jnp.arange(P)[None] < jnp.asarray(LENGTHS)[:, None], N // Bp, 0)
    suffix_slots = jnp.arange(k.shape[2] - P)
    mask_NxTxS = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None], (N, T, P)),
                                  suffix_slots[None, None] <= slots_NxT[:, :, None]], axis=2)
    return transformer.attention(q_NxTxQxH, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask_NxTxS)


def test_shared_prefix_attention_equals_ordinary_attention_and_ignores_garbage():
    rng = np.random.RandomState(3)
    J, Q, H, P, S, T = 2, 4, 8, 7, 3, 2
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = draw(B * G, T, Q, H)
    prefix_k, prefix_v = draw(B, J, H, P), draw(B, J, P, H)
    blocks_k, blocks_v = [draw(B * G, J, H, S) for _ in range(2)], [draw(B * G, J, S, H) for _ in range(2)]
    slots = jnp.asarray(rng.randint(0, 2 * S - 1, (B * G, 1)) + jnp.arange(T), jnp.int32)
    got = decode.cached_attention(q, prefix_k, prefix_v, jnp.asarray(LENGTHS), blocks_k, blocks_v, slots)
    want = _reference_attention(q, prefix_k, prefix_v, blocks_k, blocks_v, slots)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Garbage in prefix slots past a prompt's length and in suffix slots after a query changes nothing.
    pad = jnp.arange(P)[None, None, :, None] >= jnp.asarray(LENGTHS)[:, None, None, None]  # [B, 1, P, 1]
    later = lambda b: (b * S + jnp.arange(S))[None, None, :, None] > slots.max(1)[:, None, None, None]
    noisy = decode.cached_attention(
        q, jnp.where(jnp.swapaxes(pad, 2, 3), 1e3, prefix_k), jnp.where(pad, -1e3, prefix_v), jnp.asarray(LENGTHS),
        [jnp.where(jnp.swapaxes(later(b), 2, 3), 1e3, k) for b, k in enumerate(blocks_k)],
        [jnp.where(later(b), 7.0, v) for b, v in enumerate(blocks_v)], slots)
    np.testing.assert_allclose(noisy, got, atol=1e-6)


def test_sharded_decode_equals_unsharded():
    c = small_config("llama")
    model = init_model(c, seed=4)
    prompts = jnp.concatenate([_prompts(c.vocab_size, seed=5), _prompts(c.vocab_size, seed=6)[:1]])
    lengths = jnp.asarray(np.concatenate([LENGTHS, LENGTHS[:1]]), jnp.int32)
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=1.0, block_len=2)
    run = jax.jit(lambda p: sampling.sample(decode.decode_weights(nnx.merge(graphdef, p)), prompts, lengths,
                                            jax.random.key(0), cfg, num_samples=2))
    graphdef, params = nnx.split(model)
    want = run(params)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        placed = jax.device_put(params, sharding.param_shardings(params, mesh))
        got = run(placed)
    np.testing.assert_array_equal(got.tokens_NxL, want.tokens_NxL)
    np.testing.assert_allclose(got.logprobs_NxL, want.logprobs_NxL, atol=1e-5)


FAMILIES = {"transformer": decode_loop.small_config, "hybrid": decode_loop.hybrid_config}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_compiled_decode_loop_copies_no_layer_cache_or_weights(family):
    """XLA:CPU's compiled sampler, both families: inside each decode while loop, no copy, slice or
    transpose as large as one layer's cache block, prefix, smallest weight matrix or (the hybrid)
    Mamba state (tests/decode_loop.py). The config is resolved for the CPU, as a CPU run's is (its
    own form of the score matmul); tests/test_aot.py checks the TPU and GPU programs."""
    c = kernels.resolve_kernels(FAMILIES[family](), "cpu")
    run, args = decode_loop.decode_program(c)
    hlo = jax.jit(run).lower(*args).compile().as_text()
    loops, offenders = decode_loop.loop_copies(hlo, c)
    assert loops >= 2  # one decode loop per cache block (16 new tokens, blocks of 8)
    if family == "hybrid":
        # XLA:CPU computes the SSM update twice (for the new state and for the readout) and so
        # copies the carried state once per Mamba layer and step; XLA:GPU fuses the two and copies
        # nothing (tests/test_aot.py). Exactly those copies, nothing else.
        state_copies = decode_loop.ssm_state_copies(offenders, c)
        assert len(state_copies) == decode_loop.NEW_TOKENS // decode_loop.BLOCK_LEN * c.count("mamba"), state_copies
        offenders = [line for line in offenders if line not in state_copies]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_are_cast_to_the_compute_dtype_once_outside_the_decode_loops(family):
    """float32 parameters, bfloat16 compute, both families: the program's decode loops convert no
    weight matrix (every stacked matrix's per-layer shape)."""
    c = FAMILIES[family](dtype="bfloat16")
    run, params = decode_loop.sampler(c)
    weight_shapes = {tuple(p.shape[1:]) for p in jax.tree.leaves(params) if p.ndim >= 3}

    def loop_converts(jaxpr):
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "while":
                inner = eqn.params["body_jaxpr"].jaxpr
                found += [tuple(e.outvars[0].aval.shape) for e in inner.eqns
                          if e.primitive.name == "convert_element_type"]
                found += loop_converts(inner)
            for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else ():
                found += loop_converts(sub)
        return found

    jaxpr = jax.make_jaxpr(run)(params, *decode_loop.prompts(c.vocab_size), jax.random.key(0)).jaxpr
    converts = loop_converts(jaxpr)
    assert converts  # the loops do cast activations (e.g. the float32 softmax)
    assert not weight_shapes & set(converts), weight_shapes & set(converts)
