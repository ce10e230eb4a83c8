"""Bradley-Terry strengths from (soft) pairwise verdicts, and the QuRating label helpers.

Model. Each item ``k`` has a log-strength ``s_k``; the probability that item ``j`` beats
item ``i`` is ``sigmoid(s_j - s_i)``. A verdict is ``p = P(j beats i)`` in ``[0, 1]``: hard
outcomes are 0/1, soft outcomes (QuRating's averaged judge probabilities) enter as
fractional wins, i.e. the cross-entropy ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))``
with ``d = s_j - s_i``. A pair stored the other way round is the same verdict with
``1 - p`` (for the ``pairwise`` table's "P(response_a is better)" put ``a`` at ``item_j``).

Objective (minimised)::

    sum_k w_k * [softplus(d_k) - p_k * d_k]  +  l2 * ||s||^2

This is exactly the objective of ``choix.opt_pairwise(..., alpha=l2)`` (MAP under an
isotropic Gaussian prior ``N(0, 1 / (2 * l2))``) when every ``p`` is 0/1 and every weight is
1, so ``l2`` and choix's ``alpha`` are the same number. Choice of the default ``l2 = 1e-3``:
the prior's standard deviation is ~22 log-units, far wider than any realistic spread of
strengths, so on connected, non-separable data the fit is ML up to a shrinkage well below
the sampling noise (measured: max |delta| ~ 1e-3 vs ``l2 = 1e-6`` on 1,000 items with ~20
comparisons each); and it is what makes the problem strictly convex, so a disconnected
graph still has one solution (each component is centred on 0) and a perfect winner stays
finite (one win, one comparison: ``s_winner - s_loser ~ 5.2``, i.e. P = 0.995).

Solver. Damped Newton (Armijo backtracking) on the exact objective. The Hessian is a
weighted graph Laplacian plus ``2 * l2 * I``:

- up to ``DENSE_MAX_ITEMS`` items (the filter stage's per-prompt graphs of 3-8 responses)
  it is built densely and solved with Cholesky: no setup, ~0.1 ms per fit;
- above that, the Newton system is solved by conjugate gradients preconditioned with the
  Hessian's diagonal (Jacobi), using Hessian-vector products from ``np.take`` and
  ``np.bincount`` on the comparison list: memory is O(comparisons + items).

Hand-written because neither reference fits the large case: choix builds a dense
``n x n`` Hessian (Newton-CG) or Markov chain (I-LSR) and loops over comparisons in Python,
scipy's ``Newton-CG`` takes no preconditioner, and L-BFGS needed ~150 objective evaluations
on 1,000,000 comparisons (this solver: ~8 Newton steps of ~10-20 Hessian products each, and
the Jacobi preconditioner absorbs uneven degrees and the flat curvature of near-perfect
winners). Convergence is declared when the Newton step (the solver's estimate of the
remaining error in log-strength units) is below ``tol`` in max-norm.

Because the objective separates over connected components, many small graphs (one per
prompt) can be fitted in one call by offsetting their item indices: the result equals
the per-graph fits.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike
import scipy.sparse
from scipy.special import expit

#: Largest graph solved with a dense Newton system (n^3 / 3 flops per step).
DENSE_MAX_ITEMS = 64

#: QuRating trains its rater only on labels with |p - 0.5| >= 0.25.
QURATING_CONFIDENCE = 0.25
#: QuRating's "80% confidence" evaluation: |p - 0.5| >= 0.3.
QURATING_HIGH_CONFIDENCE = 0.3

# Absolute slack on probability comparisons so that e.g. 0.8 - 0.5 >= 0.3 holds in floats.
_PROB_EPS = 1e-12
_DEBUG = False
# Cap on CG iterations per Newton step; a truncated solve is still a descent step.
_MAX_CG = 500


def normalise(scores: ArrayLike) -> np.ndarray:
    """Centre log-strengths on zero (float64 copy).

    Bradley-Terry strengths are identified only up to an additive constant, so two fits
    are compared after centring both. ``fit_bradley_terry`` already returns centred
    strengths; choix's ``ilsr_pairwise``/``mm_pairwise`` return centred log-weights and
    ``opt_pairwise`` (with ``alpha > 0``) is centred only up to its solver tolerance, so
    tests and the benchmark compare ``normalise(ours)`` with ``normalise(choix)``.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return values.copy()
    return values - values.mean()


def confident_mask(p: ArrayLike, threshold: float = QURATING_CONFIDENCE) -> np.ndarray:
    """Boolean mask of labels at least ``threshold`` away from a coin flip: |p - 0.5| >= threshold."""
    probs = np.asarray(p, dtype=np.float64)
    return np.abs(probs - 0.5) >= threshold - _PROB_EPS


def pairwise_accuracy(
    scores: ArrayLike,
    item_i: ArrayLike,
    item_j: ArrayLike,
    p_j_beats_i: ArrayLike,
    min_confidence: float = 0.0,
) -> float:
    """Share of verdicts whose winner the scores rank higher (QuRating's held-out accuracy).

    A verdict counts when ``|p - 0.5| >= min_confidence`` and ``p != 0.5`` (an undecided
    label has no winner to agree with); ``min_confidence=0.3`` is QuRating's "80%
    confidence" accuracy. Equal scores for the two items count as half right (a coin flip).
    Returns NaN when no verdict counts.
    """
    s = np.asarray(scores, dtype=np.float64)
    i = np.asarray(item_i, dtype=np.int64)
    j = np.asarray(item_j, dtype=np.int64)
    p = np.asarray(p_j_beats_i, dtype=np.float64)
    margin = p - 0.5
    counted = (np.abs(margin) >= min_confidence - _PROB_EPS) & (margin != 0.0)
    if not counted.any():
        return float("nan")
    predicted = np.sign(s[j[counted]] - s[i[counted]])
    agreement = predicted * np.sign(margin[counted])  # +1 right, -1 wrong, 0 tie
    return float(np.mean((agreement + 1.0) / 2.0))


def _as_inputs(
    item_i: ArrayLike,
    item_j: ArrayLike,
    p_j_beats_i: ArrayLike,
    n_items: int,
    weights: ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    i = np.asarray(item_i)
    j = np.asarray(item_j)
    p = np.asarray(p_j_beats_i, dtype=np.float64)
    if not (i.ndim == j.ndim == p.ndim == 1 and i.shape == j.shape == p.shape):
        raise ValueError("item_i, item_j and p_j_beats_i must be 1-D arrays of one length")
    if i.size and not (np.issubdtype(i.dtype, np.integer) and np.issubdtype(j.dtype, np.integer)):
        raise TypeError("item indices must be integers")
    i = i.astype(np.intp, copy=False)
    j = j.astype(np.intp, copy=False)
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    if i.size and not (np.all(p >= 0.0) and np.all(p <= 1.0)):  # also rejects NaN
        raise ValueError("p_j_beats_i must lie in [0, 1]")
    if weights is None:
        w = np.ones(p.shape, dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != p.shape:
            raise ValueError("weights must have one entry per comparison")
        if w.size and not (np.all(w >= 0.0) and np.all(np.isfinite(w))):
            raise ValueError("weights must be finite and non-negative")
    # A self-comparison or a zero weight carries no information about any difference.
    useful = (i != j) & (w > 0.0)
    if not useful.all():
        i, j, p, w = i[useful], j[useful], p[useful], w[useful]
    return i, j, p, w


class _Problem:
    """Objective, gradient and curvature of the penalised BT likelihood on one edge list.

    Differences ``s_j - s_i`` come from a CSR incidence matrix on large graphs (one
    sequential sweep, ~2x faster than two ``np.take``) and from ``np.take`` on small ones
    (no setup); sums back onto items use ``np.bincount``, which beat the transposed CSR
    product (its gathers from the edge vector miss the cache).
    """

    def __init__(
        self, i: np.ndarray, j: np.ndarray, p: np.ndarray, w: np.ndarray, n: int, l2: float, *, sparse: bool
    ):
        self.i, self.j, self.n, self.l2 = i, j, n, l2
        self.w = w
        self.wp = w * p
        self.incidence = None
        if sparse:
            m = i.size
            index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
            columns = np.empty(2 * m, dtype=index_dtype)
            columns[0::2] = i
            columns[1::2] = j
            signs = np.tile(np.array([-1.0, 1.0]), m)
            indptr = np.arange(0, 2 * m + 1, 2, dtype=np.int64 if 2 * m >= np.iinfo(np.int32).max else index_dtype)
            self.incidence = scipy.sparse.csr_matrix((signs, columns, indptr), shape=(m, n))

    def differences(self, s: np.ndarray) -> np.ndarray:
        if self.incidence is not None:
            return self.incidence @ s
        return np.take(s, self.j) - np.take(s, self.i)

    def objective(self, s: np.ndarray, d: np.ndarray) -> float:
        return float(self.w @ np.logaddexp(0.0, d) - self.wp @ d + self.l2 * (s @ s))

    def scatter(self, edge_values: np.ndarray) -> np.ndarray:
        """B^T u for the edge-item incidence B (+1 at j, -1 at i)."""
        return np.bincount(self.j, edge_values, self.n) - np.bincount(self.i, edge_values, self.n)

    def gradient(self, s: np.ndarray, sig: np.ndarray) -> np.ndarray:
        return self.scatter(self.w * sig - self.wp) + (2.0 * self.l2) * s

    def diagonal(self, curvature: np.ndarray) -> np.ndarray:
        return np.bincount(self.j, curvature, self.n) + np.bincount(self.i, curvature, self.n) + 2.0 * self.l2


def _dense_newton_step(problem: _Problem, grad: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    n = problem.n
    off = np.bincount(problem.i * n + problem.j, curvature, n * n).reshape(n, n)
    hess = -(off + off.T)
    hess[np.diag_indices(n)] = problem.diagonal(curvature)
    # LU rather than Cholesky: at these sizes OpenBLAS's threaded potrf was far slower.
    return -np.linalg.solve(hess, grad)


def _pcg_newton_step(
    problem: _Problem,
    grad: np.ndarray,
    curvature: np.ndarray,
    rel_tol: float,
    max_cg: int,
) -> np.ndarray:
    """Solve H x = -grad by Jacobi-preconditioned conjugate gradients (stops early: inexact Newton).

    Every CG iterate from x = 0 is a descent direction, so a truncated solve is still a
    usable step.
    """
    inv_diag = 1.0 / problem.diagonal(curvature)
    ridge = 2.0 * problem.l2
    x = np.zeros_like(grad)
    r = -grad
    z = r * inv_diag
    direction = z.copy()
    rz = r @ z
    stop = (rel_tol**2) * rz
    for _ in range(max_cg):
        h_dir = problem.scatter(curvature * problem.differences(direction)) + ridge * direction
        alpha = rz / (direction @ h_dir)
        x += alpha * direction
        r -= alpha * h_dir
        z = r * inv_diag
        rz_next = r @ z
        if rz_next <= stop:
            break
        direction *= rz_next / rz
        direction += z
        rz = rz_next
    return x


def fit_bradley_terry(
    item_i: ArrayLike,
    item_j: ArrayLike,
    p_j_beats_i: ArrayLike,
    n_items: int,
    *,
    l2: float = 1e-3,
    weights: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> np.ndarray:
    """Fit Bradley-Terry log-strengths to pairwise verdicts; returns float64 ``[n_items]``, mean zero.

    Args:
        item_i, item_j: integer item indices in ``[0, n_items)``, one entry per comparison.
        p_j_beats_i: probability that ``item_j`` beats ``item_i`` (0/1 for hard outcomes).
        n_items: number of items; items in no comparison get strength 0.
        l2: Gaussian-prior strength, penalty ``l2 * ||s||^2`` (= choix's ``alpha``); must be > 0.
        weights: optional non-negative weight per comparison (e.g. duplicate counts).
        max_iter: maximum Newton steps (5-15 in practice; near-perfect winners take the most).
        tol: stop when the Newton step is below ``tol`` log-units for every item.

    See the module docstring for the objective and the solver. Warns (RuntimeWarning) and
    returns the last iterate if ``max_iter`` is reached.
    """
    n_items = int(n_items)
    if n_items < 0:
        raise ValueError("n_items must be non-negative")
    if not l2 > 0.0:
        raise ValueError("l2 must be > 0 (it keeps disconnected graphs and perfect winners finite)")
    i, j, p, w = _as_inputs(item_i, item_j, p_j_beats_i, n_items, weights)
    s = np.zeros(n_items, dtype=np.float64)
    if n_items == 0 or i.size == 0:
        return s

    dense = n_items <= DENSE_MAX_ITEMS
    problem = _Problem(i, j, p, w, n_items, float(l2), sparse=not dense)
    d = np.zeros(i.size)
    sig = np.full(i.size, 0.5)
    grad = problem.gradient(s, sig)
    f = None  # objective at s, computed only when a step has to be checked
    converged = False
    for _ in range(max_iter):
        curvature = w * sig * (1.0 - sig)
        if dense:
            step = _dense_newton_step(problem, grad, curvature)
        else:
            # Forcing term: loose solves far from the optimum, tight ones near it.
            scaled_grad = float(np.max(np.abs(grad) / problem.diagonal(curvature)))
            rel_tol = 0.1 * min(1.0, max(np.sqrt(scaled_grad), 1e-3))
            step = _pcg_newton_step(problem, grad, curvature, rel_tol, max_cg=_MAX_CG)
        if float(np.max(np.abs(step))) <= tol:
            converged = True
            break
        slope = float(grad @ step)
        if not slope < 0.0:  # no descent left at float precision
            break
        d_step = problem.differences(step)
        t = 1.0
        s_new, d_new = s + step, d + d_step
        sig_new = expit(d_new)
        grad_new = problem.gradient(s_new, sig_new)
        # Convexity: if the slope along the step is still <= 0 at t = 1, the full Newton step
        # has not passed the 1-D minimum and decreases f, so f need not be evaluated.
        if grad_new @ step > 0.0:
            f_old = problem.objective(s, d) if f is None else f
            slack = 1e-12 * max(1.0, abs(f_old))  # absorbs rounding once decreases reach ~eps * f
            while True:
                f_new = problem.objective(s_new, d_new)
                if f_new <= f_old + 1e-4 * t * slope + slack or t < 1e-10:
                    break
                t *= 0.5
                s_new, d_new = s + t * step, d + t * d_step
            sig_new = expit(d_new)
            grad_new = problem.gradient(s_new, sig_new)
            f = f_new
        else:
            f = None
        s, d, sig, grad = s_new, d_new, sig_new, grad_new
        if _DEBUG:
            print("newton", t, float(np.max(np.abs(step))), float(np.abs(s).max()))
    if not converged:
        warnings.warn(
            f"fit_bradley_terry stopped after {max_iter} Newton steps before reaching tol={tol}",
            RuntimeWarning,
            stacklevel=2,
        )
    return normalise(s)
