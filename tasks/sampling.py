"""QuRating's quality-weighted selection: Gumbel top-k over z-scored quality.

QuRating (Wettig et al.) z-scores a criterion's ratings over the corpus, divides by a
temperature ``tau``, adds standard Gumbel noise and keeps the items with the largest keys
until the budget is spent. By the Gumbel-top-k trick (Kool et al., 2019) the order of the
keys is a draw of sequential sampling *without replacement* with probabilities
``softmax(z / tau)``: the first pick has exactly those probabilities, the next one the same
renormalised over the rest, and so on.

- ``tau -> 0`` degenerates to plain top-k (``tau == 0`` is handled exactly, without noise,
  ties going to the lower index);
- ``tau -> inf`` (``float("inf")`` allowed) is uniform sampling without replacement;
- QuRating released ``tau = 1`` and ``tau = 2``; their top-k baseline trained worse models,
  so a finite temperature is the default choice of the select stage, not ``0``.

The population standard deviation (``ddof=0``) is used for the z-score; a constant
quality vector z-scores to all zeros (every item equally likely).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

RandomState = np.random.Generator | int | None


def zscore(x: ArrayLike) -> np.ndarray:
    """(x - mean) / std over the whole array (float64); zeros if x is constant. Rejects NaN/inf."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError("zscore expects a 1-D array")
    if values.size == 0:
        return values.copy()
    if not np.all(np.isfinite(values)):
        raise ValueError("quality values must be finite")
    centred = values - values.mean()
    std = float(np.sqrt(np.mean(centred * centred)))
    if std == 0.0:
        return np.zeros_like(values)
    return centred / std


def gumbel_keys(quality: ArrayLike, tau: float, rng: RandomState = None) -> np.ndarray:
    """Sampling keys ``zscore(quality) / tau + Gumbel(0, 1)``; sort descending to get the draw.

    ``tau == 0`` returns the z-scores themselves (deterministic top-k order); ``tau == inf``
    returns pure Gumbel noise (uniform order).
    """
    tau = float(tau)
    if not tau >= 0.0:
        raise ValueError("tau must be >= 0")
    z = zscore(quality)
    if tau == 0.0:
        return z
    noise = np.random.default_rng(rng).gumbel(size=z.size)
    if np.isinf(tau):
        return noise
    return z / tau + noise


def gumbel_topk(quality: ArrayLike, k: int, tau: float, rng: RandomState = None) -> np.ndarray:
    """Indices of ``min(k, n)`` items drawn without replacement with probabilities ∝ softmax(z / tau).

    Returned in draw order (largest key first). ``tau == 0`` is exact top-k by quality.
    ``rng`` is a ``numpy.random.Generator`` or a seed.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    keys = gumbel_keys(quality, tau, rng)
    k = min(int(k), keys.size)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if float(tau) == 0.0:
        # Stable sort: equal qualities go to the lower index, reproducibly.
        return np.argsort(-keys, kind="stable")[:k].astype(np.int64)
    # Continuous noise: ties have probability zero, so a partial sort suffices.
    top = np.argpartition(-keys, k - 1)[:k]
    return top[np.argsort(-keys[top])].astype(np.int64)


def take_within_budget(order: ArrayLike, costs: ArrayLike, budget: float) -> np.ndarray:
    """The longest prefix of ``order`` whose summed ``costs`` (indexed by item) stays <= ``budget``.

    QuRating selects "the top keys until the budget" (a token budget); we stop before the
    first item that would overshoot rather than after it, so the budget is a hard cap.
    """
    order = np.asarray(order, dtype=np.int64)
    spent = np.cumsum(np.asarray(costs, dtype=np.float64)[order])
    return order[: int(np.searchsorted(spent, budget, side="right"))]
