"""Prompt-position strategies: bounds, counts, skipped/shortfall accounting, determinism."""

import numpy as np
import pytest

from rlp_jax.data.positions import PositionConfig, position_rng, sample_positions


def _sample(config, num_tokens, marked=None, seed=0, epoch=0, doc_id=0):
    return sample_positions(config, num_tokens, position_rng(seed, epoch, doc_id), marked)


@pytest.mark.parametrize("num_tokens,k,min_context", [(100, 5, 1), (100, 5, 40), (7, 5, 3),
                                                      (3, 5, 3), (1, 1, 1), (0, 2, 1)])
def test_uniform_counts_bounds_and_shortfall(num_tokens, k, min_context):
    config = PositionConfig("uniform", k, min_context=min_context)
    sample = _sample(config, num_tokens)
    valid = max(num_tokens - min_context, 0)
    assert len(sample.positions_P) == min(k, valid)
    assert sample.shortfall == k - min(k, valid)
    assert sample.skipped_short_context == 0
    assert sample.positions_P.dtype == np.int32
    assert np.all(np.diff(sample.positions_P) > 0)  # sorted, unique
    assert np.all((sample.positions_P >= min_context) & (sample.positions_P < num_tokens))


def test_uniform_is_deterministic_in_seed_epoch_and_document_and_covers_the_range():
    config = PositionConfig("uniform", 4, min_context=2)
    first = _sample(config, 1000, seed=3, epoch=1, doc_id=7).positions_P
    np.testing.assert_array_equal(first, _sample(config, 1000, seed=3, epoch=1,
                                                 doc_id=7).positions_P)
    others = [_sample(config, 1000, seed=s, epoch=e, doc_id=d).positions_P
              for s, e, d in [(4, 1, 7), (3, 2, 7), (3, 1, 8)]]
    assert all(not np.array_equal(first, o) for o in others)
    drawn = np.concatenate([_sample(config, 12, epoch=e).positions_P for e in range(200)])
    assert set(drawn.tolist()) == set(range(2, 12))  # every valid position gets drawn


def test_all_gives_every_position_and_counts_the_short_ones():
    sample = _sample(PositionConfig("all", min_context=4), 10)
    np.testing.assert_array_equal(sample.positions_P, np.arange(4, 10))
    assert sample.skipped_short_context == 3  # positions 1, 2, 3
    assert sample.shortfall == 0
    short = _sample(PositionConfig("all", min_context=4), 3)
    assert len(short.positions_P) == 0 and short.skipped_short_context == 2


def test_stride_with_fixed_and_random_offset():
    fixed = _sample(PositionConfig("stride", stride=4, stride_offset=2, min_context=5), 23)
    np.testing.assert_array_equal(fixed.positions_P, [6, 10, 14, 18, 22])
    assert fixed.skipped_short_context == 1  # position 2
    zero = _sample(PositionConfig("stride", stride=4, stride_offset=0), 9)
    np.testing.assert_array_equal(zero.positions_P, [4, 8])  # position 0 is never a candidate
    assert zero.skipped_short_context == 0
    offsets = set()
    for epoch in range(40):
        positions = _sample(PositionConfig("stride", stride=5), 100, epoch=epoch).positions_P
        assert np.all(np.diff(positions) == 5) and positions[0] < 6
        offsets.add(int(positions[0] % 5))
    assert offsets == {0, 1, 2, 3, 4}


def test_marked_keeps_filters_and_subsamples():
    marked = np.array([9, 2, 5, 0, 5], np.int32)
    every = _sample(PositionConfig("marked", None, min_context=3), 10, marked)
    np.testing.assert_array_equal(every.positions_P, [5, 9])
    assert every.skipped_short_context == 2  # positions 0 and 2
    two = _sample(PositionConfig("marked", 2), 10, marked)
    assert len(two.positions_P) == 2 and set(two.positions_P) <= {2, 5, 9}
    assert two.shortfall == 0
    many = _sample(PositionConfig("marked", 5), 10, marked)
    np.testing.assert_array_equal(many.positions_P, [2, 5, 9])
    assert many.shortfall == 2
    with pytest.raises(ValueError, match="fall outside the document's 0..9 token positions"):
        _sample(PositionConfig("marked", None), 10, np.array([3, 10]))
    with pytest.raises(ValueError, match="needs the record's marked positions"):
        _sample(PositionConfig("marked", None), 10, None)


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="random"), "unknown position strategy 'random'"),
    (dict(strategy="uniform", positions_per_document=None), "needs positions_per_document"),
    (dict(strategy="all", positions_per_document=0), "positions_per_document is 0"),
    (dict(strategy="stride", stride=0), "stride is 0"),
    (dict(strategy="stride", stride_offset=-1), "stride_offset is -1"),
    (dict(min_context=0), "min_context >= 1"),
    (dict(strategy="all", marked_kinds=("answer_start",)), "only applies to strategy='marked'"),
    (dict(strategy="marked", marked_kinds="answer_start"), r"write \('answer_start',\)"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PositionConfig(**kwargs)


def test_strategies_without_randomness_need_no_stream():
    assert not PositionConfig("all").draws_randomly
    assert not PositionConfig("stride", stride_offset=0).draws_randomly
    assert not PositionConfig("marked", None).draws_randomly
    assert PositionConfig("marked", 2).draws_randomly and PositionConfig("stride").draws_randomly
    sample = sample_positions(PositionConfig("stride", stride=2, stride_offset=1), 6, None)
    np.testing.assert_array_equal(sample.positions_P, [1, 3, 5])
    marked = sample_positions(PositionConfig("marked", None), 6, None, np.array([4, 2]))
    np.testing.assert_array_equal(marked.positions_P, [2, 4])
