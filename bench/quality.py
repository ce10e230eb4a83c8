"""Bradley-Terry fit at scale: prefcurate's solver vs choix, in the same run.

Data: 100,000 items with N(0, 1) latent log-strengths and 1,000,000 comparisons between
uniformly drawn pairs (self-pairs redrawn), hard outcomes drawn from the BT model (choix
takes only hard outcomes), about 20 comparisons per item.

- ours on the full 1,000,000: wall seconds (best of 2), and peak memory measured with
  ``tracemalloc`` in a separate run: the peak of allocations made during the fit (numpy
  and scipy buffers report to tracemalloc), inputs excluded. Also timed with the soft
  outcomes (the true probabilities) for reference.
- choix cannot fit the full graph: ``opt_pairwise`` (the function with the same objective,
  penalty ``alpha * ||s||^2``, alpha = our l2) builds a dense n x n Hessian (Newton-CG) or
  inverse Hessian (BFGS), 80 GB at 100,000 items, and loops over comparisons in Python.
  So both run on a subsample of equal data: 2,000 of the items with 20,000 fresh
  comparisons among them (the same ~20 per item as the full graph). choix runs
  ``Newton-CG`` (its default and its fastest here: BFGS took ~4x longer in a trial run,
  196 s vs 49 s, so it is left out to keep the bench short) with ``tol=1e-8``.
  Agreement is the max |difference| of the mean-centred strengths.

Last line: ``RESULT speedup=<choix s / ours s on the subsample> max_abs_diff=<subsample,
after centring> seconds=<ours, full 1M> peak_mb=<ours, full 1M, tracemalloc>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefcurate.tasks.bradley_terry import DEFAULT_L2, fit_bradley_terry, normalise

N_ITEMS = 100_000
N_COMPARISONS = 1_000_000
SUB_ITEMS = 2_000
SUB_COMPARISONS = 20_000
SEED = 0


def draw_pairs(rng: np.random.Generator, n_items: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    i = rng.integers(0, n_items, n)
    j = rng.integers(0, n_items, n)
    same = i == j
    while same.any():
        j[same] = rng.integers(0, n_items, int(same.sum()))
        same = i == j
    return i, j


def timed(fn, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    import choix

    rng = np.random.default_rng(SEED)
    strengths = rng.normal(size=N_ITEMS)
    i, j = draw_pairs(rng, N_ITEMS, N_COMPARISONS)
    p_true = expit(strengths[j] - strengths[i])
    p_hard = (rng.random(N_COMPARISONS) < p_true).astype(np.float64)
    print(f"data: {N_ITEMS:,} items, {N_COMPARISONS:,} comparisons, hard outcomes, l2 = alpha = {DEFAULT_L2}")

    # warm-up (imports, first-call costs) on a small problem
    fit_bradley_terry(i[:5000], j[:5000], p_hard[:5000], N_ITEMS)

    seconds_full, s_full = timed(lambda: fit_bradley_terry(i, j, p_hard, N_ITEMS), repeats=2)
    rho_full = spearmanr(s_full, strengths).statistic
    print(f"ours, full {N_COMPARISONS:,}: {seconds_full:.2f} s (best of 2), Spearman vs truth {rho_full:.4f}")
    seconds_soft, s_soft = timed(lambda: fit_bradley_terry(i, j, p_true, N_ITEMS))
    print(
        f"ours, full, soft outcomes (true probabilities): {seconds_soft:.2f} s, "
        f"Spearman vs truth {spearmanr(s_soft, strengths).statistic:.4f}"
    )

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    fit_bradley_terry(i, j, p_hard, N_ITEMS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_mb = peak / 2**20
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"ours, full: tracemalloc peak of allocations during the fit {peak_mb:.0f} MiB "
        f"(inputs excluded); process max RSS {rss_after / 1024:.0f} MiB "
        f"(grew {max(0, rss_after - rss_before) / 1024:.0f} MiB in that run)"
    )

    # ---- equal data for both: a subsample choix can handle
    sub_items = rng.choice(N_ITEMS, SUB_ITEMS, replace=False)
    si, sj = draw_pairs(rng, SUB_ITEMS, SUB_COMPARISONS)
    sp = (rng.random(SUB_COMPARISONS) < expit(strengths[sub_items][sj] - strengths[sub_items][si])).astype(float)
    data = [(int(b), int(a)) if won else (int(a), int(b)) for a, b, won in zip(si, sj, sp)]  # (winner, loser)
    print(
        f"subsample (choix cannot fit the full graph: dense n x n Hessian): {SUB_ITEMS:,} of the items, "
        f"{SUB_COMPARISONS:,} fresh comparisons among them, hard outcomes"
    )
    seconds_ours_sub, s_ours_sub = timed(lambda: fit_bradley_terry(si, sj, sp, SUB_ITEMS), repeats=3)
    print(f"ours, subsample: {seconds_ours_sub * 1e3:.1f} ms (best of 3)")

    seconds_choix, s_choix = timed(
        lambda: choix.opt_pairwise(SUB_ITEMS, data, alpha=DEFAULT_L2, method="Newton-CG", tol=1e-8)
    )
    max_abs_diff = float(np.max(np.abs(normalise(s_choix) - normalise(s_ours_sub))))
    speedup = seconds_choix / seconds_ours_sub
    print(
        f"choix.opt_pairwise(Newton-CG, alpha={DEFAULT_L2}, tol=1e-8), subsample: {seconds_choix:.2f} s; "
        f"max |ours - choix| after centring {max_abs_diff:.2e}; speedup on equal data {speedup:.0f}x"
    )
    print(
        f"RESULT speedup={speedup:.1f} max_abs_diff={max_abs_diff:.2e} "
        f"seconds={seconds_full:.2f} peak_mb={peak_mb:.0f}"
    )


if __name__ == "__main__":
    main()
