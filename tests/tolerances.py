"""How far apart two float32 results may be when they were computed in another order.

Another mesh splits a reduction into other partial sums, another library (torch vs XLA) or another
CPU (AVX-512 vs AVX2 vector widths) sums in another order, and the results differ in their last
bits. The bounds here come from the standard rounding-error analysis (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1), not from what one machine happened to produce,
so a test holds on every CPU while still catching a real bug (which moves results by orders of
magnitude more).
"""

from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): |fl(Σ x_i) − Σ x_i| ≤ γ_(n−1) Σ |x_i| for n float32 terms in any order."""
    return n * U32 / (1 - n * U32)


def forward_tolerance(reference, *, depth: int, width: int) -> float:
    """Bound on the difference of two float32 evaluations of one network in two summation orders.

    `depth` chained reductions (matmuls, softmax sums, norms) of at most `width` terms each: both
    evaluations are within `depth · γ_width` (relative) of the exact result, so within twice that of
    each other. The scale is the largest magnitude of the result: the network's RMSNorms keep the
    sums of |terms| on the order of the outputs themselves.
    """
    return 2 * depth * gamma(width) * max(1.0, float(np.max(np.abs(reference))))


def assert_adam_runs_close(got: dict, want: dict, *, learning_rate: float, steps: int,
                           rtol: float = 1e-4, atol: float = 1e-5, max_flipped: float = 1e-3) -> None:
    """Two Adam runs whose gradients differ only by float32 rounding (e.g. on two meshes).

    Almost every weight agrees to rounding (`rtol`, `atol`). A weight whose gradient is itself at
    rounding level is the exception: Adam divides by √v̂, so a sign flip of g ≈ 0 moves that weight
    by a whole step, lr·|m̂|/√v̂, in the other direction. Over the first few steps |m̂|/√v̂ ≤ ~1.3
    (Cauchy–Schwarz on the bias-corrected moments), so such a weight may differ by at most
    2 · 1.3 · lr per step: allow that for at most a `max_flipped` share of the weights.
    """
    assert got.keys() == want.keys()
    bound = 2 * 1.3 * learning_rate * steps
    total = flipped = 0
    for name in want:
        a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        diff = np.abs(a - b)
        assert diff.max() <= bound, f"{name}: {diff.max():.3g} > {bound:.3g}, more than Adam's steps can explain"
        flipped += int((diff > atol + rtol * np.abs(b)).sum())
        total += b.size
    assert flipped <= max_flipped * total, f"{flipped} of {total} weights differ by more than rounding"
