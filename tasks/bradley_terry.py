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
1, so ``l2`` and choix's ``alpha`` are the same number.

Choice of the default ``l2 = DEFAULT_L2 = 0.05`` (prior sd ~3.2 log-units). Any ``l2 > 0``
makes the problem strictly convex, so a disconnected graph has one solution (each
component centred on 0) and a perfect winner stays finite. The value was measured: 2,000
items with N(0, sigma^2) strengths, sigma in {1, 3}, 6 or 20 hard comparisons per item,
scored by held-out log-loss against the true probabilities. ``l2 = 1e-3`` (near-ML) let
perfect winners run to 10-23 log-units and was far worse in all four settings (held-out
log-loss 1.03 vs 0.44 at sigma 3, degree 6); of 1e-4 ... 0.5, ``0.05`` was within 0.02 of
the best in three settings (larger values over-shrink wide spreads) and only the weakest
data (sigma 1, degree 6) wanted more (0.5: 0.63 vs 0.76). Rank correlation with the truth
moved by < 0.03 over the whole range.
Shrinkage of a well-compared item is ``~2 * l2 / (0.2 * degree)``: under 3% from 20
comparisons. One win in one comparison gives a gap of ~2.2 (P = 0.90).

Solver. Damped Newton on the exact objective. The Hessian is a weighted graph Laplacian
plus ``2 * l2 * I``:

- up to ``DENSE_MAX_ITEMS`` items (the filter stage's per-prompt graphs of 3-8 responses)
  it is built densely from the edge list and solved by LU: no setup cost;
- above that, comparisons are stored as half-edges grouped by item (see
  ``_HalfEdgeProblem``) and each Newton system is solved inexactly by conjugate gradients
  preconditioned with the Hessian's diagonal (Jacobi) with one CSR product per
  iteration; memory is O(comparisons + items).

A full Newton step is accepted without evaluating the objective when the slope along it is
still <= 0 at its end (convexity then guarantees a decrease); otherwise Armijo
backtracking on the objective. Convergence: the Newton step (the solver's estimate of the
remaining error, in log-strength units) is below ``tol`` for every item.

Hand-written because no library fits the large case: choix builds a dense ``n x n``
Hessian (``opt_pairwise`` Newton-CG; BFGS keeps a dense ``n x n`` inverse) or Markov chain
(I-LSR) and loops over comparisons in Python; scipy's ``Newton-CG`` takes no
preconditioner, and L-BFGS needed ~150 objective evaluations on 1,000,000 comparisons
against ~10 Newton steps here (the Jacobi preconditioner absorbs uneven degrees and the
flat curvature of near-perfect winners). ``bench/quality.py`` measures it against choix.

Because the objective separates over connected components, many small graphs (one per
prompt) can be fitted in one call by offsetting their item indices: the result equals
the per-graph fits.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike
from scipy.special import expit

#: Default Gaussian-prior strength (penalty l2 * ||s||^2); see the module docstring.
DEFAULT_L2 = 0.05
#: Largest graph solved with a dense Newton system.
DENSE_MAX_ITEMS = 64

#: QuRating trains its rater only on labels with |p - 0.5| >= 0.25.
QURATING_CONFIDENCE = 0.25
#: QuRating's "80% confidence" evaluation: |p - 0.5| >= 0.3.
QURATING_HIGH_CONFIDENCE = 0.3

# Absolute slack on probability comparisons so that e.g. 0.8 - 0.5 >= 0.3 holds in floats.
_PROB_EPS = 1e-12
# Cap on CG iterations per Newton step; a truncated solve is still a descent step.
_MAX_CG = 500


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product without BLAS: OpenBLAS's threaded ddot slowed ~50x on a busy 2-core host."""
    return float(np.einsum("i,i->", a, b))


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


class _EdgeProblem:
    """Penalised BT likelihood on a plain edge list, Newton systems solved densely (small graphs).

    Edge space: one entry per comparison, ``d = s_j - s_i``.
    """

    def __init__(self, i: np.ndarray, j: np.ndarray, p: np.ndarray, w: np.ndarray, n: int, l2: float):
        self.i, self.j, self.n, self.l2 = i, j, n, l2
        self.w = w
        self.wp = w * p

    def differences(self, s: np.ndarray) -> np.ndarray:
        return np.take(s, self.j) - np.take(s, self.i)

    def objective(self, s: np.ndarray, d: np.ndarray) -> float:
        return _dot(self.w, np.logaddexp(0.0, d)) - _dot(self.wp, d) + self.l2 * _dot(s, s)

    def gradient(self, s: np.ndarray, sig: np.ndarray) -> np.ndarray:
        residual = self.w * sig - self.wp
        return np.bincount(self.j, residual, self.n) - np.bincount(self.i, residual, self.n) + (2.0 * self.l2) * s

    def curvature(self, sig: np.ndarray) -> np.ndarray:
        return self.w * sig * (1.0 - sig)

    def newton_step(self, grad: np.ndarray, curvature: np.ndarray) -> np.ndarray:
        n = self.n
        off = np.bincount(self.i * n + self.j, curvature, n * n).reshape(n, n)
        hess = -(off + off.T)
        hess[np.diag_indices(n)] = (
            np.bincount(self.j, curvature, n) + np.bincount(self.i, curvature, n) + 2.0 * self.l2
        )
        # LU rather than Cholesky: OpenBLAS's threaded potrf was far slower on a busy machine.
        return -np.linalg.solve(hess, grad)


class _HalfEdgeProblem:
    """Penalised BT likelihood in adjacency (half-edge) form, Newton systems solved by PCG.

    Every comparison is stored twice, once from each item's side, sorted by that item: a
    half-edge ``h`` rooted at item ``k`` facing ``o`` has ``d_h = s_o - s_k`` and
    ``p_h = P(o beats k)``. The objective is half the sum over half-edges, the gradient of
    ``k`` is a sum over its own (contiguous) half-edges, and the Hessian's off-diagonal is
    a CSR matrix whose data is the per-half-edge curvature in the same order. So a Hessian
    product is one ``csr @ v`` (no per-product scatter of edge values: ~5x faster than
    take/bincount products on 1,000,000 comparisons) and the matrix needs no refill
    gather between Newton steps.
    """

    def __init__(self, i: np.ndarray, j: np.ndarray, p: np.ndarray, w: np.ndarray, n: int, l2: float):
        self.n, self.l2 = n, l2
        m = i.size
        index_dtype = np.int32 if max(n, m) < np.iinfo(np.int32).max // 2 else np.int64
        # Stable counting sort of half-edges by root item, done by scipy's CSR->CSC
        # conversion: column k of the m x n incidence lists the edges touching k; the
        # stored values are half-edge ids (2e: rooted at i_e, 2e+1: rooted at j_e).
        columns = np.empty(2 * m, dtype=index_dtype)
        columns[0::2] = i
        columns[1::2] = j
        half_edge_ids = np.arange(2 * m, dtype=np.float64)
        incidence = scipy.sparse.csr_matrix(
            (half_edge_ids, columns, np.arange(0, 2 * m + 1, 2, dtype=index_dtype)), shape=(m, n)
        ).tocsc()
        order = incidence.data.astype(np.int64)
        indptr = incidence.indptr.astype(index_dtype, copy=False)
        edge = order >> 1
        rooted_at_j = (order & 1).astype(bool)
        del order, incidence, columns, half_edge_ids
        self.root = np.where(rooted_at_j, j[edge], i[edge]).astype(index_dtype)
        self.other = np.where(rooted_at_j, i[edge], j[edge]).astype(index_dtype)
        p_half = np.where(rooted_at_j, 1.0 - p[edge], p[edge])
        # Unit weights (the usual case) skip a multiply per pass over the half-edges.
        self.w = None if np.all(w == 1.0) else w[edge]
        self.wp = p_half if self.w is None else self.w * p_half
        del rooted_at_j, edge
        self.adjacency = scipy.sparse.csr_matrix((np.zeros(2 * m), self.other, indptr), shape=(n, n))

    def differences(self, s: np.ndarray) -> np.ndarray:
        return np.take(s, self.other) - np.take(s, self.root)

    def objective(self, s: np.ndarray, d: np.ndarray) -> float:
        softplus = np.logaddexp(0.0, d)
        loss = softplus.sum() if self.w is None else _dot(self.w, softplus)
        return 0.5 * (float(loss) - _dot(self.wp, d)) + self.l2 * _dot(s, s)

    def gradient(self, s: np.ndarray, sig: np.ndarray) -> np.ndarray:
        residual = (sig if self.w is None else self.w * sig) - self.wp
        return (2.0 * self.l2) * s - np.bincount(self.root, residual, self.n)

    def curvature(self, sig: np.ndarray) -> np.ndarray:
        curvature = sig * (1.0 - sig)
        return curvature if self.w is None else curvature * self.w

    def newton_step(self, grad: np.ndarray, curvature: np.ndarray) -> np.ndarray:
        """Solve H x = -grad by Jacobi-preconditioned conjugate gradients (inexact Newton).

        Every CG iterate from x = 0 is a descent direction, so a truncated solve is still a
        usable step. Forcing term: the relative residual target is 0.1 * sqrt of the
        diagonally scaled gradient, clipped to [1e-4, 0.1]: loose far from the optimum,
        tight near it.
        """
        self.adjacency.data = curvature
        diagonal = np.bincount(self.root, curvature, self.n) + 2.0 * self.l2
        scaled_grad = float(np.max(np.abs(grad) / diagonal))
        rel_tol = 0.1 * min(1.0, max(np.sqrt(scaled_grad), 1e-3))
        inv_diag = 1.0 / diagonal
        x = np.zeros_like(grad)
        r = -grad
        z = r * inv_diag
        direction = z.copy()
        rz = _dot(r, z)
        if rz == 0.0:  # already optimal (e.g. every comparison a tie at equal scores)
            return x
        stop = (rel_tol**2) * rz
        for _ in range(_MAX_CG):
            h_dir = diagonal * direction - self.adjacency @ direction
            alpha = rz / _dot(direction, h_dir)
            x += alpha * direction
            r -= alpha * h_dir
            z = r * inv_diag
            rz_next = _dot(r, z)
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
    l2: float = DEFAULT_L2,
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

    problem: _EdgeProblem | _HalfEdgeProblem
    if n_items <= DENSE_MAX_ITEMS:
        problem = _EdgeProblem(i, j, p, w, n_items, float(l2))
    else:
        problem = _HalfEdgeProblem(i, j, p, w, n_items, float(l2))
        del i, j, p, w  # the half-edge form holds its own copies
    d = problem.differences(s)
    sig = expit(d)
    grad = problem.gradient(s, sig)
    f = None  # objective at s, computed only when a step has to be checked
    converged = False
    for _ in range(max_iter):
        curvature = problem.curvature(sig)
        step = problem.newton_step(grad, curvature)
        if float(np.max(np.abs(step))) <= tol:
            converged = True
            break
        slope = _dot(grad, step)
        if not slope < 0.0:  # no descent left at float precision
            break
        d_step = problem.differences(step)
        t = 1.0
        s_new, d_new = s + step, d + d_step
        sig_new = expit(d_new)
        grad_new = problem.gradient(s_new, sig_new)
        # Convexity: if the slope along the step is still <= 0 at t = 1, the full Newton step
        # has not passed the 1-D minimum and decreases f, so f need not be evaluated.
        if _dot(grad_new, step) > 0.0:
            f_old = problem.objective(s, d) if f is None else f
            slack = 1e-12 * max(1.0, abs(f_old))  # absorbs rounding once decreases reach ~eps * f
            while True:
                f_new = problem.objective(s_new, d_new)
                if f_new <= f_old + 1e-4 * t * slope + slack or t < 1e-10:
                    break
                t *= 0.5
                s_new, d_new = s + t * step, d + t * d_step
            if t < 1.0:
                sig_new = expit(d_new)
                grad_new = problem.gradient(s_new, sig_new)
            f = f_new
        else:
            f = None
        s, d, sig, grad = s_new, d_new, sig_new, grad_new
    if not converged:
        warnings.warn(
            f"fit_bradley_terry stopped after {max_iter} Newton steps before reaching tol={tol}",
            RuntimeWarning,
            stacklevel=2,
        )
    return normalise(s)
