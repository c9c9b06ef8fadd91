"""The KV-cache sampler against HF generate, teacher-forced log-probs and its own contract."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from rlp_jax import losses, sampling, sharding
from rlp_jax.models import decode, hf

VOCAB = 97


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random tiny Qwen3 in transformers and the same weights in rlp-jax."""
    import torch
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    folder = tmp_path_factory.mktemp("qwen3")
    torch_model.save_pretrained(folder)
    return torch_model, hf.load_hf(folder), folder


PROMPTS = np.random.RandomState(0).randint(1, VOCAB, (3, 9))
LENGTHS = np.array([9, 4, 6])


def teacher_forced_logprobs(model, prompt, generated, temperature):
    seq = jnp.asarray(np.concatenate([prompt, generated]))[None]
    logits = model(seq, jnp.arange(seq.shape[1])[None])
    return losses.token_logprobs(logits[0, len(prompt) - 1:-1], seq[0, len(prompt):], temperature)


def test_greedy_equals_hf_generate_token_for_token(hf_pair):
    import torch

    torch_model, model, _ = hf_pair
    out = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(0),
                            sampling.SamplingConfig(max_new_tokens=40, temperature=0.0))
    for b in range(len(PROMPTS)):
        with torch.no_grad():
            want = torch_model.generate(torch.tensor(PROMPTS[b:b + 1, :LENGTHS[b]]), do_sample=False,
                                        max_new_tokens=40, min_new_tokens=40)[0, LENGTHS[b]:].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens_NxL[b]), want)
    np.testing.assert_array_equal(out.lengths_N, [40] * 3)
    np.testing.assert_array_equal(out.next_positions_N, LENGTHS + 40)


def test_behaviour_logprobs_equal_teacher_forced_and_samples_share_prefill(hf_pair):
    _, model, _ = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=30, top_p=0.9,
                                  stop_tokens=(5, 7))
    G = 4
    out = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(1), cfg, num_samples=G)
    assert out.tokens_NxL.shape == (3 * G, 12)
    worst = 0.0
    for n in range(3 * G):
        b, length = n // G, int(out.lengths_N[n])
        generated = np.asarray(out.tokens_NxL[n, :length])
        want = teacher_forced_logprobs(model, PROMPTS[b, :LENGTHS[b]], generated, 0.7)
        worst = max(worst, float(np.abs(np.asarray(want) - np.asarray(out.logprobs_NxL[n, :length])).max()))
        assert (np.asarray(out.tokens_NxL[n, length:]) == cfg.pad_id).all()
        assert (np.asarray(out.logprobs_NxL[n, length:]) == 0).all()
        assert bool(out.finished_N[n]) == (generated[-1] in cfg.stop_tokens)
        assert not np.isin(generated[:-1], cfg.stop_tokens).any()
    assert worst <= 1e-4
    # Different samples of one prompt differ (they are samples, not copies).
    assert len({tuple(np.asarray(out.tokens_NxL[n])) for n in range(G)}) > 1


@pytest.mark.parametrize("block_len", [3, 64])  # several blocks / one
def test_cache_continuation_equals_full_forward(hf_pair, block_len):
    """Tokens appended to a finished sample's cache (as RLP scoring does) see exactly the prompt
    and the row's own generated tokens: their logits equal a fresh forward over the whole row."""
    _, model, _ = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=7, temperature=1.0, stop_tokens=(3, 8), block_len=block_len)
    out = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(2), cfg, num_samples=2, extra_slots=2)
    assert out.cache.num_blocks == decode.num_blocks(7 + 2, block_len)
    weights = decode.decode_weights(model)
    hidden, _ = decode.extend(weights, out.cache, jnp.array([[11, 12]] * 6), out.lengths_N[:, None] + jnp.arange(2),
                              attend_blocks=out.cache.num_blocks, write_blocks=tuple(range(out.cache.num_blocks)))
    logits_cached = decode.logits(weights, hidden)
    lengths = np.asarray(out.lengths_N)
    assert len(set(lengths)) > 1  # rows that stopped early and rows that ran on
    for n in range(6):
        b, length = n // 2, int(lengths[n])
        seq = np.concatenate([PROMPTS[b, :LENGTHS[b]], np.asarray(out.tokens_NxL[n, :length]), [11, 12]])
        logits_full = model(jnp.asarray(seq)[None], jnp.arange(len(seq))[None])
        np.testing.assert_allclose(logits_cached[n], logits_full[0, -2:], atol=1e-4)


def test_prefill_holds_empty_blocks_for_every_new_and_extra_slot(hf_pair):
    """The Transformer's `prefill`: each prompt's keys once, and empty suffix blocks of `block_len`
    for the 7 new and 2 extra slots (tests/test_family_contract.py checks that `decode_loop` from
    it samples what `sample` samples, and the tokens against fresh forwards)."""
    _, model, _ = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=7, temperature=1.0, stop_tokens=(3, 8), block_len=3)
    start = sampling.prefill_jit(sampling.weights_of(model), PROMPTS, LENGTHS, cfg, num_samples=2, extra_slots=2)
    assert start.logits_NxV.shape == (3 * 2, VOCAB)
    assert start.cache.prefix_k[0].shape[0] == len(PROMPTS)
    assert (start.cache.num_blocks, start.cache.block_len) == (3, 3)  # 7 + 2 slots
    assert not any(np.asarray(block).any() for block in jax.tree.leaves((start.cache.block_k, start.cache.block_v)))


def test_stop_tokens_end_rows_early_and_min_new_tokens_defers_them(hf_pair):
    _, model, _ = hf_pair
    greedy = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    free = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(0), greedy)
    # Make every row's own first greedy token a stop token: all rows stop after one token,
    # and the loop ends there.
    stops = tuple(sorted({int(t) for t in free.tokens_NxL[:, 0]}))
    out = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(0),
                            dataclasses.replace(greedy, stop_tokens=stops), num_samples=2)
    np.testing.assert_array_equal(out.lengths_N, [1] * 6)
    assert bool(out.finished_N.all())
    np.testing.assert_array_equal(out.tokens_NxL[:, 0], np.repeat(free.tokens_NxL[:, 0], 2))
    np.testing.assert_array_equal(out.tokens_NxL[:, 1:], 0)
    np.testing.assert_array_equal(out.next_positions_N, np.repeat(LENGTHS, 2) + 1)
    deferred = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(0),
                                 dataclasses.replace(greedy, stop_tokens=stops, min_new_tokens=3))
    tokens = np.asarray(deferred.tokens_NxL)
    assert not np.isin(tokens[:, :3], stops).any()
    for n, length in enumerate(np.asarray(deferred.lengths_N)):
        assert length >= 3
        assert bool(deferred.finished_N[n]) == bool(np.isin(tokens[n, length - 1], stops))
        assert not np.isin(tokens[n, :length - 1], stops).any()


def test_first_token_frequencies_follow_the_tempered_distribution(hf_pair):
    _, model, _ = hf_pair
    prompt = PROMPTS[:1]
    temperature, n = 1.3, 4000
    out = sampling.generate(model, prompt, np.array([9]), jax.random.key(3),
                            sampling.SamplingConfig(max_new_tokens=1, temperature=temperature),
                            num_samples=n)
    logits = model(jnp.asarray(prompt), jnp.arange(9)[None])
    probs = np.asarray(jax.nn.softmax(logits[0, -1] / temperature))
    freq = np.bincount(np.asarray(out.tokens_NxL[:, 0]), minlength=VOCAB) / n
    # 4 standard errors of a binomial proportion, per token.
    assert (np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / n) + 1e-3).all()


def test_filter_logits_top_k_and_top_p_hand_computed():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda x: np.asarray(x[0] > jnp.finfo(jnp.float32).min / 2)
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_k=2)), [1, 0, 1, 0])
    # nucleus 0.7: 0.5 (before: 0) and 0.3 (before: 0.5) are in; 0.15 (before 0.8) is out.
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.7)), [1, 0, 1, 0])
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.85)), [1, 0, 1, 1])
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.1)), [1, 0, 0, 0])


def test_sampler_under_a_2x2x2_mesh_matches_unsharded(hf_pair):
    _, model, folder = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0)
    want = sampling.generate(model, PROMPTS, LENGTHS, jax.random.key(4), cfg, num_samples=2)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded_model = hf.load_hf(folder, mesh=mesh)
        assert sharded_model.layers.q[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        # 6 rows over the (data, fsdp) batch axes of size 4 would not divide; use 8 rows.
        prompts8 = np.concatenate([PROMPTS, PROMPTS[:1]])
        got = sampling.generate(sharded_model, prompts8, np.concatenate([LENGTHS, LENGTHS[:1]]),
                                jax.random.key(4), cfg, num_samples=2)
    np.testing.assert_array_equal(np.asarray(got.tokens_NxL[:6]), np.asarray(want.tokens_NxL))
    np.testing.assert_allclose(np.asarray(got.logprobs_NxL[:6]), np.asarray(want.logprobs_NxL), atol=1e-5)


def test_bad_sampling_config_is_one_clear_sentence():
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="at least 1"):
        sampling.SamplingConfig(max_new_tokens=0)
