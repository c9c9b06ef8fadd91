"""Accuracy estimators over sampled responses (pure functions of correctness arrays).

`correct_NxS[i, s]`: response s to item i was graded correct (N items, S samples per item).
"""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1): `1 − C(n−c, k) / C(n, k)`, the
    probability that at least one of k samples drawn without replacement from the n is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct of n={n} samples is impossible; need 0 <= c <= n.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n={n} samples; draw at least k samples per item.")
    if n - c < k:
        return 1.0
    # The product form of C(n−c, k) / C(n, k): exact in floating point for large n.
    return 1.0 - float(np.prod([1.0 - k / i for i in range(n - c + 1, n + 1)]))


def mean_pass_at_k(correct_NxS: np.ndarray, k: int) -> float:
    """pass@k averaged over items."""
    correct_NxS = np.asarray(correct_NxS, bool)
    n = correct_NxS.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct_NxS.sum(1)])) if len(correct_NxS) else math.nan


def pass_at_1(correct_NxS: np.ndarray) -> float:
    """pass@1 averaged over S samples: the mean accuracy of one sampled response (the paper's math
    metric with S = 8)."""
    correct_NxS = np.asarray(correct_NxS, bool)
    return float(correct_NxS.mean()) if correct_NxS.size else math.nan


def standard_error(correct_NxS: np.ndarray) -> float:
    """Standard error over items of the per-item mean accuracy (the items are the sample)."""
    per_item = np.asarray(correct_NxS, np.float64).reshape(len(correct_NxS), -1).mean(1)
    if per_item.size < 2:
        return math.nan
    return float(per_item.std(ddof=1) / math.sqrt(per_item.size))


def greedy_accuracy(correct_N: np.ndarray) -> float:
    correct_N = np.asarray(correct_N, bool)
    return float(correct_N.mean()) if correct_N.size else math.nan


def science_score(greedy_correct_N: np.ndarray, sampled_correct_NxS: np.ndarray) -> float:
    """The paper's science protocol: the mean of greedy accuracy and pass@1 over S (= 4) sampled
    runs."""
    return 0.5 * (greedy_accuracy(greedy_correct_N) + pass_at_1(sampled_correct_NxS))
