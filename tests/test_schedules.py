"""Learning-rate schedules from config: warm-up, then constant, cosine or linear decay that ends
exactly at the final value on the run's last optimizer update (hand-computed values)."""

import math

import numpy as np
import pytest

from rlp_jax import build
from rlp_jax.config import ConfigError, base_config


def train_config(**values):
    t = base_config().train
    for key, value in values.items():
        t[key] = value
    return t


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_the_final_value_on_the_last_update(schedule):
    steps, updates, warm = 10, 2, 2  # 20 updates: 4 of warm-up, decay over the 16 after
    f = build.learning_rate_schedule(train_config(steps=steps, warmup_steps=warm, learning_rate=1e-6,
                                                  final_learning_rate=1e-7, schedule=schedule), updates)
    lr = np.array([float(f(i)) for i in range(steps * updates)])
    np.testing.assert_allclose(lr[:4], [0.0, 2.5e-7, 5e-7, 7.5e-7], rtol=1e-6)
    k = np.arange(16)  # updates after the warm-up; the last (k = 15) gets exactly the final value
    frac = k / 15
    want = (1e-7 + (1e-6 - 1e-7) * (1 + np.cos(math.pi * frac)) / 2 if schedule == "cosine"
            else 1e-6 + (1e-7 - 1e-6) * frac)
    np.testing.assert_allclose(lr[4:], want, rtol=1e-5)


def test_constant_is_the_peak_after_warm_up_and_the_paper_default():
    f = build.learning_rate_schedule(train_config(steps=5, warmup_steps=0), 1)
    assert [float(f(i)) for i in range(5)] == pytest.approx([1e-6] * 5)
    assert base_config().train.schedule == "constant"  # the paper's RLP: constant 1e-6


def test_updates_per_step_multiply_warm_up_and_decay_lengths():
    c = base_config()
    c.rlp.ppo_epochs, c.rlp.num_minibatches = 2, 3
    assert build.updates_per_step(c) == 6


@pytest.mark.parametrize("values, message", [
    (dict(schedule="exp"), "train.schedule='exp' is not one of constant, cosine, linear"),
    (dict(final_learning_rate=-1.0), "must be >= 0"),
])
def test_bad_schedule_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build.learning_rate_schedule(train_config(**values), 1)
