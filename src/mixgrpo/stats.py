"""Confidence intervals over prompts: the evaluation's spread.

A held-out evaluation scores P prompts (each the mean over its seeds); prompts are the sampling
unit, so the intervals resample prompts. Percentile bootstrap: draw ``resamples`` sets of P
prompt indices with replacement, take the mean of each, report the ``(1-c)/2`` and ``(1+c)/2``
quantiles of those means. Base-vs-tuned deltas are paired (the same prompts and seeds), so their
interval resamples the per-prompt differences ``tuned_p - base_p``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


def bootstrap_ci(per_prompt_values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``per_prompt_values`` (NaN prompts dropped).

    One value: ``(v, v)``; none: ``(nan, nan)``. Deterministic for a given ``seed``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(per_prompt_values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_bootstrap_ci(tuned: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray,
                        **kwargs: float) -> tuple[float, float]:
    """CI of ``mean(tuned - base)`` over paired prompts: :func:`bootstrap_ci` of the per-prompt differences."""
    tuned, base = np.asarray(tuned, dtype=np.float64).ravel(), np.asarray(base, dtype=np.float64).ravel()
    if tuned.shape != base.shape:
        raise ValueError(f"paired CI needs one tuned and one base value per prompt; got {tuned.size} and {base.size}")
    return bootstrap_ci(tuned - base, **kwargs)
