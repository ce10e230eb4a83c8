"""Jury aggregation that learns whom to trust: calibrated weights and Dawid-Skene EM.

The equal-weight mean jury (``tasks/filter.py``) is only as good as its median judge. Two
aggregations here weigh each judge by how often it is right, one with labels and one
without. Both work on *votes*, not raw probabilities:

- A judge's **vote** on a pair is +1 (its position-balanced ``p_a`` > 0.5), -1 (< 0.5) or
  0 = abstain: its balanced verdict is a tie, or it *flipped* (the same slot won in both
  presentation orders, so its verdict followed the position, not the response). A flipped
  judge's balanced ``p_a`` is close to 0.5 by construction and carries no reliable side.
- **calibrated** (needs labels: gold pairs and/or human review labels): judge j's weight is
  the log-odds of its accuracy on the labelled pairs, shrunk by a Beta(1, 1) prior,
  ``w_j = logit((correct_j + 1) / (n_j + 2))``, and the jury's ``p_a`` is
  ``sigmoid(sum_j w_j * vote_j)``. Under conditionally independent judges this is the
  Bayes-optimal weighted majority (Nitzan-Paroush); a judge worse than chance gets a
  negative weight (its vote is read inverted), one at chance weight 0. We chose log-odds
  weights over a logistic stacker because the packaged gold set has 42 pairs: one
  parameter per judge, fitted in closed form, cannot over-fit a stacker's interactions.
- **unsupervised** (no labels): the one-coin Dawid-Skene model. Each pair has a latent
  winner (a with prior ``pi``); judge j votes for the true winner with probability
  ``acc_j`` and abstains independently of the truth. EM, vectorised over a (pairs x
  judges) vote matrix: E-step ``logit q_i = logit pi + sum_j vote_ij * logit acc_j``;
  M-step ``acc_j`` = expected correct votes / votes (Beta(2, 2) pseudo-counts keep it off
  0 and 1), ``pi`` = mean q. Fitted separately per criterion when the grouping has one.
  Plain EM started at the majority vote fails when two weak judges copy each other: they
  agree so often that EM rates them near-perfect and follows them (in bench/jury.py it fell
  to 69% precision, 15 points below the mean jury). So EM starts from the triplet
  method-of-moments estimate (median over judge triplets, robust to one correlated pair;
  its sign breaks EM's label-switching symmetry: most judges beat chance), and judges whose
  agreement exceeds what their accuracies predict share one vote's weight (see
  :func:`one_coin_em`). Needs three or more judges to identify accuracies; with two, the
  moment start is 0.5 and EM reduces to an agreement vote.

A pair on which every judge abstains gets ``p_a = 0.5`` exactly (the filter's ``tie``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
from prefcurate.schemas import tables

PAIR_KEY = ["prompt_id", "response_a", "response_b"]
LATENT_METHODS = ("calibrated", "unsupervised")
JuryMethod = Literal["mean", "majority", "weighted", "calibrated", "unsupervised"]
_PROVENANCE = {f.name for f in tables.PROVENANCE}
_TIE_EPS = 1e-12
_CLIP = 1e-4


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def flipped_expr(flip_tolerance: float = 0.0) -> pl.Expr:
    """A verdict row's two presentation orders picked the same *slot*, each further than
    ``flip_tolerance`` from 0.5 (null when an order is missing)."""
    lean_ab = pl.col("p_first_ab") - 0.5  # > 0: a preferred with a shown first
    lean_ba = 0.5 - pl.col("p_first_ba")  # > 0: a preferred with b shown first
    return (lean_ab * lean_ba < 0) & (lean_ab.abs() > flip_tolerance) & (lean_ba.abs() > flip_tolerance)


def vote_expr(flip_tolerance: float = 0.0) -> pl.Expr:
    """+1 / -1 / 0 (abstain) from a verdict row's ``p_a``, ``p_first_ab``, ``p_first_ba``.

    A flip (:func:`flipped_expr`) is an abstention; a verdict without both orders is taken at
    its balanced ``p_a``."""
    flipped = flipped_expr(flip_tolerance)
    side = (
        pl.when(pl.col("p_a") > 0.5 + _TIE_EPS)
        .then(1)
        .when(pl.col("p_a") < 0.5 - _TIE_EPS)
        .then(-1)
        .otherwise(0)
    )
    return pl.when(flipped.fill_null(False)).then(0).otherwise(side).cast(pl.Int8)


@dataclass(frozen=True)
class EMResult:
    accuracy: np.ndarray  # (judges,) estimated P(vote = truth | vote)
    posterior: np.ndarray  # (items,) P(a is better)
    prior: float  # estimated P(a is better) over the items
    n_votes: np.ndarray  # (judges,) non-abstaining votes
    iterations: int
    converged: bool
    blocks: np.ndarray  # (judges,) dependent-block label (judges copying each other share one)
    share: np.ndarray  # (judges,) 1 / block size: the share of a vote each judge's log-odds gets


def moment_accuracy(votes: np.ndarray, min_covotes: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy estimates, (judges x judges) co-vote correlations, usable triplets per
    judge) by the triplet method.

    For conditionally independent judges, E[v_i v_j] = s_i s_j with s = 2 acc - 1, so
    s_i^2 = C_ij C_ik / C_jk for any two other judges j, k. The median over all (j, k) pairs
    keeps one correlated pair from moving the estimate (most triplets do not contain it);
    the sign is the sign of the judge's median correlation with the others (most judges
    beat chance). C is measured over the pairs both judges voted on; a triplet is usable
    when |C_jk| is more than twice its sampling error (about 1 / sqrt(co-votes)), since
    dividing by a noisy near-zero C_jk gives nonsense. NaN where no triplet is usable."""
    cast = (votes != 0).astype(np.float64)
    covotes = cast.T @ cast
    corr = (votes.T @ votes) / np.maximum(covotes, 1.0)
    corr = np.where(covotes >= min_covotes, corr, 0.0)
    floor = np.maximum(0.05, 2.0 / np.sqrt(np.maximum(covotes, 1.0)))
    n = votes.shape[1]
    signal = np.full(n, np.nan)
    usable_count = np.zeros(n, dtype=np.int64)
    judges = np.arange(n)
    for i in range(n):  # judges, not rows: a handful of iterations
        others = judges[judges != i]
        if others.size < 2:
            continue
        j, k = np.triu_indices(others.size, 1)
        j, k = others[j], others[k]
        usable = np.abs(corr[j, k]) > floor[j, k]
        usable_count[i] = int(usable.sum())
        if not usable.any():
            continue
        squared = np.median(corr[i, j[usable]] * corr[i, k[usable]] / corr[j[usable], k[usable]])
        signal[i] = np.sqrt(np.clip(squared, 0.0, 0.96)) * np.sign(np.median(corr[i, others]))
    return (1.0 + signal) / 2.0, corr, usable_count


def majority_accuracy(votes: np.ndarray) -> np.ndarray:
    """Each judge's agreement with the majority of the *other* judges (where both exist)."""
    total = votes.sum(axis=1, keepdims=True)
    others = np.sign(total - votes)
    both = (votes != 0) & (others != 0)
    agree = ((votes == others) & both).sum(axis=0)
    return (agree + 1.0) / (both.sum(axis=0) + 2.0)


def dependent_blocks(accuracy: np.ndarray, corr: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Block label per judge: judges whose co-vote correlation exceeds what their
    accuracies predict under independence by more than ``threshold`` share a block."""
    from scipy.sparse.csgraph import connected_components

    signal = 2.0 * accuracy - 1.0
    excess = corr - np.outer(signal, signal)
    np.fill_diagonal(excess, 0.0)
    _, labels = connected_components(excess > threshold, directed=False)
    return labels


def one_coin_em(
    votes: np.ndarray, max_iter: int = 500, tol: float = 1e-6, pseudo_count: float = 2.0
) -> EMResult:
    """One-coin Dawid-Skene EM over a (items x judges) matrix of +1 / -1 / 0 votes.

    Started from :func:`moment_accuracy` (not the majority vote: a majority of weak or
    copying judges would pick the start, and EM rarely leaves it); a judge the moments do
    not determine starts at :func:`majority_accuracy`. Judges that
    :func:`dependent_blocks` finds copying each other share one vote's weight (each
    member's log-odds divided by the block size), so a correlated block does not
    outvote an accurate judge and EM does not drift to the block's fixed point."""
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 2:
        raise ValueError(f"votes must be a 2-d (items x judges) matrix, got shape {votes.shape}")
    n_items, n_judges = votes.shape
    cast = votes != 0
    n_votes = cast.sum(axis=0)
    for_a = (votes > 0).astype(np.float64)
    for_b = (votes < 0).astype(np.float64)
    counted = cast.sum(axis=1)
    moments, corr, usable = moment_accuracy(votes)
    # a judge without a usable triplet starts at its agreement with the others' majority
    accuracy = np.where(np.isfinite(moments), moments, majority_accuracy(votes)) if n_judges else moments
    # copying is only told apart from accuracy with 4+ judges, from well-measured moments
    measured = usable >= 2
    blocks = np.arange(n_judges)
    if n_judges >= 4 and measured.sum() >= 2:
        blocks = dependent_blocks(np.where(measured, accuracy, 0.5), np.where(np.outer(measured, measured), corr, 0.0))
    share = 1.0 / np.bincount(blocks)[blocks] if n_judges else np.ones(0)
    prior = 0.5
    q = _sigmoid(votes @ (share * _logit(accuracy)))
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        correct = q @ for_a + (1.0 - q) @ for_b
        new_accuracy = (correct + pseudo_count) / (n_votes + 2.0 * pseudo_count)
        prior = float(np.clip(q.mean(), 0.05, 0.95)) if n_items else 0.5
        new_q = _sigmoid(np.log(prior / (1.0 - prior)) + votes @ (share * _logit(new_accuracy)))
        delta = max(np.abs(new_accuracy - accuracy).max(initial=0.0), np.abs(new_q - q).max(initial=0.0))
        accuracy, q = new_accuracy, new_q
        if delta < tol:
            converged = True
            break
    q = np.where(counted > 0, q, 0.5)
    return EMResult(accuracy, q, prior, n_votes.astype(np.int64), iteration, converged, blocks, share)


def weighted_vote_posterior(votes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sigmoid(votes @ weights)``; exactly 0.5 where no judge voted."""
    votes = np.asarray(votes, dtype=np.float64)
    posterior = _sigmoid(votes @ np.asarray(weights, dtype=np.float64))
    return np.where((votes != 0).any(axis=1), posterior, 0.5)


def accuracy_weight(correct: np.ndarray | float, n: np.ndarray | float) -> np.ndarray:
    """Log-odds weight of a judge's labelled accuracy, shrunk by a Beta(1, 1) prior."""
    return _logit((np.asarray(correct, dtype=np.float64) + 1.0) / (np.asarray(n, dtype=np.float64) + 2.0))


def _vote_matrix(verdicts: pl.DataFrame, group: list[str]) -> tuple[pl.DataFrame, list[str], np.ndarray]:
    """(items frame with ``_item``, judge names, votes matrix) for one fit."""
    items = verdicts.select(group).unique(maintain_order=False).sort(group).with_row_index("_item")
    judges = sorted(verdicts["judge"].unique().to_list())
    indexed = verdicts.join(items, on=group).with_columns(
        _judge=pl.col("judge").replace_strict(judges, list(range(len(judges))), return_dtype=pl.Int64)
    )
    votes = np.zeros((items.height, len(judges)), dtype=np.float64)
    votes[indexed["_item"].to_numpy(), indexed["_judge"].to_numpy()] = indexed["_vote"].to_numpy()
    return items, judges, votes


def _fits(verdicts: pl.DataFrame, group: list[str]) -> list[tuple[str | None, pl.DataFrame]]:
    if "criterion" in group and "criterion" in verdicts.columns:
        return [(c, verdicts.filter(pl.col("criterion") == c)) for c in sorted(verdicts["criterion"].unique())]
    return [(None, verdicts)]


def latent_jury(
    verdicts: pl.DataFrame,
    group: list[str],
    method: str,
    judge_weights: dict[str, float] | None = None,
    flip_tolerance: float = 0.0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(jury, judge accuracy) for ``method`` in :data:`LATENT_METHODS`.

    ``verdicts``: one row per (group, judge) with ``p_a``, ``p_first_ab``, ``p_first_ba``
    (``tasks.filter.judge_verdicts``). ``judge_weights`` (calibrated): judge -> log-odds
    weight (:func:`accuracy_weight`); a judge without one gets weight 0 (uncalibrated
    judges do not vote). Jury columns: group, p_a, n_judges, n_for_a, n_for_b, n_abstain,
    agreement (judges on the majority side / judges). Accuracy columns: [criterion], judge,
    votes, accuracy (EM estimate, or null for calibrated), weight."""
    if method not in LATENT_METHODS:
        raise ValueError(f"unknown latent jury method {method!r}; expected one of {LATENT_METHODS}")
    if method == "calibrated" and not judge_weights:
        raise ValueError("jury aggregation 'calibrated' needs judge weights from labelled pairs; none given")
    framed = verdicts.with_columns(_vote=vote_expr(flip_tolerance))
    juries, accuracies = [], []
    for criterion, part in _fits(framed, group):
        if part.height == 0:
            continue
        items, judges, votes = _vote_matrix(part, group)
        if method == "unsupervised":
            fit = one_coin_em(votes)
            posterior, weights, accuracy = fit.posterior, fit.share * _logit(fit.accuracy), fit.accuracy
        else:
            weights = np.array([float(judge_weights.get(j, 0.0)) for j in judges])
            posterior, accuracy = weighted_vote_posterior(votes, weights), np.full(len(judges), np.nan)
        juries.append(items.with_columns(p_a=pl.Series(posterior, dtype=pl.Float64)).drop("_item"))
        accuracies.append(
            pl.DataFrame(
                {
                    "criterion": [criterion] * len(judges),
                    "judge": judges,
                    "votes": (votes != 0).sum(axis=0).astype(np.int64),
                    "accuracy": accuracy,
                    "weight": weights,
                },
                schema={"criterion": pl.String, "judge": pl.String, "votes": pl.Int64,
                        "accuracy": pl.Float64, "weight": pl.Float64},
            ).with_columns(pl.col("accuracy").fill_nan(None))
        )
    counts = framed.group_by(group).agg(
        pl.len().cast(pl.Int32).alias("n_judges"),
        (pl.col("_vote") > 0).sum().cast(pl.Int32).alias("n_for_a"),
        (pl.col("_vote") < 0).sum().cast(pl.Int32).alias("n_for_b"),
        (pl.col("_vote") == 0).sum().cast(pl.Int32).alias("n_abstain"),
    )
    empty_jury = verdicts.select(group).clear().with_columns(p_a=pl.lit(None, dtype=pl.Float64))
    jury = (pl.concat(juries) if juries else empty_jury).join(counts, on=group, how="left")
    jury = jury.with_columns(
        agreement=(pl.max_horizontal("n_for_a", "n_for_b") / pl.col("n_judges")).cast(pl.Float64)
    ).sort(group)
    accuracy_table = pl.concat(accuracies) if accuracies else pl.DataFrame(
        schema={"criterion": pl.String, "judge": pl.String, "votes": pl.Int64,
                "accuracy": pl.Float64, "weight": pl.Float64}
    )
    return jury, accuracy_table


def override_with_labels(
    jury: pl.DataFrame, verdicts: pl.DataFrame, labels: pl.DataFrame | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Human labels replace the jury's verdict on their pairs.

    ``labels``: pair key + ``winner`` ("A" = response_a, "B", "tie"). A labelled pair's
    ``p_a`` becomes 1, 0 or 0.5 (a tie is then dropped as ``tie``), its agreement 1, and its
    judges' verdicts leave ``verdicts`` so that no judge-level check (position flip,
    self-preference) second-guesses the person. Unlabelled pairs are unchanged."""
    if labels is None or labels.height == 0 or jury.height == 0:
        return jury, verdicts
    human = labels.select(
        *PAIR_KEY,
        pl.col("winner").replace_strict({"A": 1.0, "B": 0.0, "tie": 0.5}, return_dtype=pl.Float64).alias("_human"),
    ).unique(PAIR_KEY, keep="last")
    joined = jury.join(human, on=PAIR_KEY, how="left")
    labelled = pl.col("_human").is_not_null()
    jury = joined.with_columns(
        p_a=pl.when(labelled).then(pl.col("_human")).otherwise(pl.col("p_a")),
        agreement=pl.when(labelled).then(pl.lit(1.0)).otherwise(pl.col("agreement")),
    ).drop("_human")
    verdicts = verdicts.join(human.select(PAIR_KEY), on=PAIR_KEY, how="anti")
    return jury, verdicts


def binary_entropy(p: pl.Expr) -> pl.Expr:
    """Entropy (nats) of a Bernoulli(p): 0 when sure, ln 2 at 0.5."""
    q = p.clip(1e-12, 1 - 1e-12)
    return -(q * q.log() + (1 - q) * (1 - q).log())


# --- the jury over judges' verdicts (used by tasks/filter.py) ----------------------------
def judge_verdicts(
    judgments: pl.DataFrame, criteria: list[str] | None = None, by_criterion: bool = True
) -> pl.DataFrame:
    """One row per (pair[, criterion], judge): the mean of the judge's valid judgments.

    Columns: pair key, [criterion], judge, judge_model, p_a, p_first_ab, p_first_ba,
    n_judgments. With ``by_criterion=False`` the selected criteria are averaged."""
    rows = judgments.filter(pl.col("valid") & pl.col("p_a").is_not_null() & pl.col("p_a").is_not_nan())
    if criteria is not None:
        rows = rows.filter(pl.col("criterion").is_in(criteria))
    group = PAIR_KEY + (["criterion"] if by_criterion else []) + ["judge"]
    return (
        rows.group_by(group)
        .agg(
            pl.col("judge_model").first(),
            pl.col("p_a").cast(pl.Float64).mean(),
            pl.col("p_first_ab").cast(pl.Float64).mean(),
            pl.col("p_first_ba").cast(pl.Float64).mean(),
            pl.len().alias("n_judgments"),
        )
        .sort(group)
    )


def jury_from_verdicts(
    verdicts: pl.DataFrame, group: list[str], method: str, judge_weights: dict[str, float] | None
) -> pl.DataFrame:
    """The jury's ``p_a``, ``n_judges``, ``n_for_a``, ``n_for_b`` and ``agreement`` per group.

    ``mean`` / ``majority`` / ``weighted`` as in :func:`aggregate_jury`; ``calibrated`` /
    ``unsupervised`` see the module docstring (``judge_weights`` = log-odds weights for
    ``calibrated``)."""
    if method in LATENT_METHODS:
        jury, _ = latent_jury(verdicts, group, method, judge_weights)
        return jury.select(*group, "p_a", "n_judges", "n_for_a", "n_for_b", "agreement")
    side_a = (pl.col("p_a") > 0.5 + _TIE_EPS).cast(pl.Int32)
    side_b = (pl.col("p_a") < 0.5 - _TIE_EPS).cast(pl.Int32)
    if method == "mean":
        p_expr = pl.col("p_a").mean()
    elif method == "majority":
        # share of judges voting a; a judge exactly at 0.5 counts half to each side
        p_expr = (
            (pl.col("_side_a") + 0.5 * (1 - pl.col("_side_a") - pl.col("_side_b"))).sum() / pl.len()
        ).cast(pl.Float64)
    elif method == "weighted":
        p_expr = (pl.col("_w") * pl.col("p_a")).sum() / pl.col("_w").sum()
    else:
        raise ValueError(
            f"unknown jury method {method!r}; expected mean, majority, weighted, calibrated or unsupervised"
        )
    weights = judge_weights or {}
    frame = verdicts.with_columns(
        _side_a=side_a,
        _side_b=side_b,
        _w=pl.col("judge").replace_strict(weights, default=1.0, return_dtype=pl.Float64),
    )
    return (
        frame.group_by(group)
        .agg(
            p_expr.alias("p_a"),
            pl.len().cast(pl.Int32).alias("n_judges"),
            pl.col("_side_a").sum().alias("n_for_a"),
            pl.col("_side_b").sum().alias("n_for_b"),
        )
        .with_columns(
            agreement=(pl.max_horizontal("n_for_a", "n_for_b") / pl.col("n_judges")).cast(pl.Float64),
            p_a=pl.when(pl.col("p_a").is_nan()).then(None).otherwise(pl.col("p_a")),
        )
        .sort(group)
    )


def _conform_jury(frame: pl.DataFrame) -> pl.DataFrame:
    fields = [f for f in tables.JURY if f.name not in _PROVENANCE]
    target = pl.from_arrow(pa.schema(fields).empty_table()).schema
    return frame.select(
        [
            pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in target.items()
        ]
    )


def aggregate_jury(
    judgments: pl.DataFrame,
    method: JuryMethod = "mean",
    judge_weights: dict[str, float] | None = None,
    human_labels: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The JURY table: the jury's verdict per (prompt, response pair, criterion).

    Only valid judgments count; a judge's repeated judgments of one pair and criterion are
    averaged first, so each judge has one vote. ``mean``: mean of the judges' position-
    balanced ``p_a``; ``majority``: share of judges with ``p_a > 0.5`` (a judge at exactly 0.5
    counts half); ``weighted``: mean weighted by ``judge_weights`` (judge name -> weight,
    default 1); ``calibrated`` (``judge_weights`` = log-odds weights) and ``unsupervised``
    (one-coin EM per criterion): see the module docstring. ``agreement`` = judges on the
    majority side / judges (ties on neither). Pairs in ``human_labels`` carry the person's
    verdict and method ``human``."""
    verdicts = judge_verdicts(judgments, by_criterion=True)
    group = PAIR_KEY + ["criterion"]
    jury = jury_from_verdicts(verdicts, group, method, judge_weights).with_columns(method=pl.lit(method))
    if human_labels is not None and human_labels.height:
        labelled = human_labels.select(PAIR_KEY).unique().with_columns(_h=pl.lit(True))
        jury, _ = override_with_labels(jury, verdicts, human_labels)
        jury = jury.join(labelled, on=PAIR_KEY, how="left").with_columns(
            method=pl.when(pl.col("_h").is_not_null()).then(pl.lit("human")).otherwise(pl.col("method"))
        )
    return _conform_jury(jury)
