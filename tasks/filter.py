"""Consistency filtering of judged pairs, and preference-pair construction.

Input: the ``judgments`` table (every judge, per criterion; both orders, or one), the ``ratings``
table (rubric expected scores) and the ``responses`` table. Output: the ``pairs`` table
(chosen, rejected), the ``filter_drops`` table (one row per candidate pair and failed
check, with the numbers that failed it) and a JSON-able report.

Method (ALGORITHMS.md, "Judging" and "Consistency": consistency is measured, never assumed)

- A *candidate* is an unordered response pair of one prompt that has at least one judgment
  row, keyed by ``(prompt_id, response_a, response_b)`` with ``response_a < response_b``.
- Each judge's verdict on a candidate is the mean of its valid judgments over the selected
  criteria (``FilterParams.criteria``; all by default) and repeated samples (MEC): one
  position-balanced ``p_a`` plus the mean raw ``P("A")`` of each order. A judgment with one
  presentation order (imported, position-free judges) gives its verdict from that order;
  the position checks do not apply to it and the report counts it.
- The jury's verdict (:func:`aggregate_jury`) is the mean, majority share or weighted mean
  of the judges' ``p_a``; ``agreement`` is the share of judges on the majority side.
- Every enabled check of the registry (``tasks/checks.py``, ``CHECKS``) runs on every
  candidate (they are independent, a pair can fail several); a candidate survives only when
  it fails none. Reports count each dropped pair once, under its *primary* reason (the first
  of its reasons in registry order), and list every reason it failed.
- Survivors are oriented by the jury (chosen = the side with ``p > 0.5``), scored by a
  per-prompt Bradley-Terry fit over the jury's soft verdicts (``margin`` = strength of
  chosen minus strength of rejected, in logits), and a strategy picks the emitted pairs.
  Candidates that pass every check but are not emitted get a ``below_margin``,
  ``not_selected`` or ``length_bias`` row, so each candidate is either a ``pairs`` row or
  has at least one ``filter_drops`` row: nothing vanishes unexplained.

Streaming (:func:`apply_filters_sharded`, what the filter step runs): the judgment-derived
quantities (jury, judge positions, Bradley-Terry strengths: :func:`judged_signals`) are
computed once over the dataset from the judgments' numbers; the checks, which read texts and
ratings per pair, run prompt shard by prompt shard; pair construction and the report run once
over the shards' narrow survivors. Same result as :func:`apply_filters`, row for row.

Baselines for the bench: :func:`argmax_baseline_pairs` (distilabel-style binarisation,
argmax/argmin of the rubric score, no checks) and :func:`single_order_pairs` (one judge, one
presentation order, taken at face value); both tie-aware.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from prefcurate.schemas import tables
from prefcurate.schemas.ids import Column, content_ids
from prefcurate.tasks.bradley_terry import fit_bradley_terry
from prefcurate.tasks.calibration import CalibrationParams
from prefcurate.tasks.checks import (  # noqa: F401  (re-exported: the filter's public names)
    _EPS,
    _PROVENANCE,
    _TIE_EPS,
    BELOW_MARGIN,
    CHECK_REASONS,
    CHECKS,
    KEPT,
    LENGTH_BIAS,
    NOT_SELECTED,
    PAIR_KEY,
    REASONS,
    SELECTION_REASONS,
    AbstentionCheck,
    AgreementCheck,
    Check,
    ConfidenceCheck,
    MissingResponseCheck,
    NearDuplicateCheck,
    NoValidJudgmentCheck,
    PositionFlipCheck,
    RatingRankingCheck,
    SelfPreferenceGuard,
    TieCheck,
    TransitivityCheck,
    TruncationCheck,
    _conform,
    _drop_rows,
    _empty,
    configurable_checks,
    judge_positions,
    model_family,
    pair_reasons,
    require_registered_reasons,
)
from prefcurate.tasks.jury import (  # noqa: F401  (the jury lives in tasks/jury.py; re-exported)
    JuryMethod,
    aggregate_jury,
    judge_verdicts,
    override_with_labels,
)
from prefcurate.tasks.jury import jury_from_verdicts as _jury_from_verdicts
from pydantic import BaseModel, ConfigDict, Field, create_model
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# --- reason codes (FILTER_DROPS.reason): the check registry in tasks/checks.py -----------
NO_VALID_JUDGMENT = NoValidJudgmentCheck.reason
MISSING_RESPONSE = MissingResponseCheck.reason
POSITION_FLIP = PositionFlipCheck.reason
JUDGE_ABSTAINED = AbstentionCheck.reason
LOW_CONFIDENCE = ConfidenceCheck.reason
TIE = TieCheck.reason
JURY_DISAGREEMENT = AgreementCheck.reason
RATING_VS_RANKING = RatingRankingCheck.reason
INTRANSITIVE = TransitivityCheck.reason
NEAR_DUPLICATE = NearDuplicateCheck.reason
TRUNCATED = TruncationCheck.reason
SELF_PREFERENCE = SelfPreferenceGuard.reason

PairStrategy = Literal["best_vs_worst", "best_vs_random", "all_above_margin", "judged"]


# --- parameters -------------------------------------------------------------------------
class LengthBiasGuard(BaseModel):
    """Caps, over the emitted pairs of the run, the share of pairs whose chosen text is at
    least ``ratio`` times longer (characters) than the rejected one at ``max_share``; the
    excess long-chosen pairs with the smallest margins are removed (no refill). A guard of
    pair construction (it runs on the picked pairs), not a check."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    ratio: float = Field(1.5, ge=1.0)
    max_share: float = Field(0.5, ge=0.0, le=1.0)


class _FilterParamsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    criteria: list[str] | None = Field(None, description="judge criteria that vote; all when None")
    jury_method: JuryMethod = Field(
        "mean",
        description="mean | majority | weighted | calibrated (log-odds weights from labelled pairs) | "
        "unsupervised (one-coin Dawid-Skene EM); see tasks/jury.py",
    )
    judge_weights: dict[str, float] | None = Field(
        None, description="for jury_method='weighted'; missing = 1 (calibrated: set from the labels)"
    )
    calibration: CalibrationParams = Field(
        default_factory=CalibrationParams, description="the gate on judges' labelled accuracy (tasks/calibration.py)"
    )
    length_bias: LengthBiasGuard = Field(default_factory=LengthBiasGuard)

    strategy: PairStrategy = Field(
        "best_vs_worst",
        description=(
            "best_vs_worst: surviving pairs by Bradley-Terry margin, largest first (the "
            "(best, worst) pair when it survived); best_vs_random: the prompt's strongest "
            "chosen against random surviving rejected ones (UltraFeedback-style); "
            "all_above_margin: every surviving pair, largest margin first; judged: every "
            "judged pair that passed the checks, as judged (oriented by the jury; no "
            "pairs_per_prompt cap, no margin cut): for curating given pairs"
        ),
    )
    pairs_per_prompt: int | None = Field(1, ge=1, description="None: no cap (ignored by strategy judged)")
    margin: float = Field(
        0.0,
        description="minimum Bradley-Terry margin (logits) of an emitted pair (ignored by strategy judged)",
    )
    seed: int = 0

    def checks(self) -> list[Check]:
        """The enabled checks, in registry (primary-reason) order."""
        instances = [getattr(self, c.config_key) if c.config_key else c() for c in CHECKS]
        return [check for check in instances if check.enabled]


#: Parameters of the filter stage: the checks (one field per configurable check of the
#: registry, named by its ``config_key``), the jury, and pair construction.
FilterParams = create_model(
    "FilterParams",
    __base__=_FilterParamsBase,
    __module__=__name__,
    __doc__="Parameters of the filter stage: the checks (one field per configurable check in "
    "prefcurate.tasks.checks.CHECKS), the jury, and pair construction.",
    **{c.config_key: (c, Field(default_factory=c)) for c in configurable_checks()},
)


# --- jury: judge_verdicts, _jury_from_verdicts, aggregate_jury are in tasks/jury.py -------
def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an (items x categories) matrix of rater counts.

    Every item must have the same number of raters (>= 2), as in Fleiss (1971). Returns NaN
    when expected agreement is 1 (all ratings in one category: kappa is undefined)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("counts must be a non-empty (items x categories) matrix")
    raters = counts.sum(axis=1)
    n = raters[0]
    if not np.allclose(raters, n):
        raise ValueError("Fleiss' kappa needs the same number of raters for every item")
    if n < 2:
        raise ValueError("Fleiss' kappa needs at least two raters per item")
    p_item = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_item.mean()
    p_category = counts.sum(axis=0) / counts.sum()
    p_expected = float((p_category**2).sum())
    if np.isclose(p_expected, 1.0):
        return float("nan")
    return float((p_bar - p_expected) / (1.0 - p_expected))


def verdict_fleiss_kappa(verdicts: pl.DataFrame, group: list[str] | None = None) -> dict:
    """Fleiss' kappa of the judges' verdicts (a better / b better / exactly 0.5).

    Items are the groups (default: the pair key) of a :func:`judge_verdicts` frame. Fleiss'
    kappa needs a constant number of raters, so only items rated by the most common number
    of judges (>= 2; the larger count on a tie) enter; ``items`` and ``raters`` say which."""
    group = group or PAIR_KEY
    empty = {"fleiss_kappa": None, "items": 0, "raters": 0}
    if verdicts.height == 0:
        return empty
    per_item = verdicts.group_by(group).agg(
        (pl.col("p_a") > 0.5 + _TIE_EPS).sum().alias("a"),
        (pl.col("p_a") < 0.5 - _TIE_EPS).sum().alias("b"),
        pl.len().alias("n"),
    )
    per_item = per_item.filter(pl.col("n") >= 2)
    if per_item.height == 0:
        return empty
    modal = (
        per_item.group_by("n").agg(pl.len().alias("items")).sort(["items", "n"], descending=True).item(0, "n")
    )
    # sorted: group_by's order is arbitrary, and the sums below would differ in the last bits
    chosen = per_item.filter(pl.col("n") == modal).sort(group)
    counts = chosen.select("a", "b", (pl.col("n") - pl.col("a") - pl.col("b")).alias("tie")).to_numpy()
    kappa = fleiss_kappa(counts)
    return {"fleiss_kappa": None if np.isnan(kappa) else kappa, "items": chosen.height, "raters": int(modal)}


# --- per-response features --------------------------------------------------------------
def response_scores(ratings: pl.DataFrame, aspects: list[str] | None = None) -> pl.DataFrame:
    """Mean valid rubric expected score per response, over judges and aspects."""
    rows = ratings.filter(
        pl.col("valid") & pl.col("expected_score").is_not_null() & pl.col("expected_score").is_not_nan()
    )
    if aspects is not None:
        rows = rows.filter(pl.col("aspect").is_in(aspects))
    return rows.group_by("response_id").agg(pl.col("expected_score").cast(pl.Float64).mean().alias("score"))


def _normalised_text(text: pl.Expr) -> pl.Expr:
    return text.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def _shingles(responses: pl.DataFrame, ngram: int) -> pl.DataFrame:
    """response_id -> set (as a list) of the byte n-grams of the normalised UTF-8 text.

    An n-gram of n <= 8 bytes is packed exactly into a uint64 (no hashing, no collisions),
    with windows computed as n shifted views of one concatenated byte buffer; a text
    shorter than n is one shingle. Only the encoding loops over responses in Python."""
    with_text = responses.filter(pl.col("text").is_not_null()).select(
        "response_id", _normalised_text(pl.col("text")).alias("_norm")
    )
    if with_text.height == 0:
        return pl.DataFrame(schema={"response_id": pl.String, "shingles": pl.List(pl.UInt64)})
    encoded = [text.encode("utf-8") for text in with_text["_norm"].to_list()]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    buffer = np.frombuffer(b"".join(encoded) + bytes(ngram), dtype=np.uint8).astype(np.uint64)
    total = int(lengths.sum())
    packed = np.zeros(total, dtype=np.uint64)
    for shift in range(ngram):
        packed |= buffer[shift : shift + total] << np.uint64(8 * shift)
    owner = np.repeat(np.arange(lengths.size), lengths)
    offset = np.arange(total) - starts[owner]
    # a window is whole when it ends inside its text; a short text keeps its one (partial) window
    whole = (offset <= lengths[owner] - ngram) | ((offset == 0) & (lengths[owner] < ngram))
    if (lengths[owner] < ngram).any():
        # mask the bytes of the next text out of a short text's single window
        short = whole & (lengths[owner] < ngram)
        keep_bits = (np.uint64(1) << (np.uint64(8) * lengths[owner][short].astype(np.uint64))) - np.uint64(1)
        packed[short] &= keep_bits
    sets = (
        pl.DataFrame({"_row": owner[whole].astype(np.uint32), "_shingle": packed[whole]})
        .group_by("_row")
        .agg(pl.col("_shingle").unique().alias("shingles"))
    )
    ids = with_text.select("response_id").with_row_index("_row")
    return ids.join(sets, on="_row", how="left").select(
        "response_id", pl.col("shingles").fill_null(pl.lit([], dtype=pl.List(pl.UInt64)))
    )


def pair_text_similarity(pairs: pl.DataFrame, responses: pl.DataFrame, ngram: int = 5) -> pl.DataFrame:
    """``pairs`` (with response_a, response_b) plus a ``similarity`` column in [0, 1]; null
    when a text is missing. See :class:`NearDuplicateCheck`."""
    needed = pl.concat(
        [pairs.select(pl.col(side).alias("response_id")) for side in ("response_a", "response_b")]
    )
    responses = responses.join(needed.unique(), on="response_id", how="semi")
    texts = responses.select("response_id", _normalised_text(pl.col("text")).alias("_norm"))
    shingles = _shingles(responses, ngram)
    joined = pairs
    for side in ("a", "b"):
        joined = joined.join(
            texts.rename({"response_id": f"response_{side}", "_norm": f"_norm_{side}"}),
            on=f"response_{side}",
            how="left",
        ).join(
            shingles.rename({"response_id": f"response_{side}", "shingles": f"_sh_{side}"}),
            on=f"response_{side}",
            how="left",
        )
    inter = pl.col("_sh_a").list.set_intersection("_sh_b").list.len()
    union = pl.col("_sh_a").list.set_union("_sh_b").list.len()
    similarity = (
        pl.when(pl.col("_norm_a").is_null() | pl.col("_norm_b").is_null())
        .then(None)
        .when(pl.col("_norm_a") == pl.col("_norm_b"))
        .then(1.0)
        .otherwise(inter / pl.max_horizontal(union, pl.lit(1)))
    )
    return joined.with_columns(similarity=similarity.cast(pl.Float64)).drop(
        "_norm_a", "_norm_b", "_sh_a", "_sh_b"
    )


def _response_features(responses: pl.DataFrame, families: dict[str, str] | None) -> pl.DataFrame:
    return responses.select(
        "response_id",
        "generator",
        "model",
        model_family(pl.col("model"), families).alias("family"),
        pl.col("text").str.len_chars().alias("char_len"),
        pl.col("truncated").fill_null(False),
        pl.col("text").is_not_null().alias("has_text"),
    ).unique("response_id", keep="first")


def _with_sides(frame: pl.DataFrame, features: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Join per-response ``columns`` for response_a and response_b as ``<col>_a``/``<col>_b``."""
    for side in ("a", "b"):
        renamed = features.select(
            pl.col("response_id").alias(f"response_{side}"),
            *[pl.col(c).alias(f"{c}_{side}") for c in columns],
        )
        frame = frame.join(renamed, on=f"response_{side}", how="left")
    return frame


# --- Bradley-Terry and cycles -----------------------------------------------------------
def prompt_strengths(jury: pl.DataFrame, l2: float = 1e-3) -> pl.DataFrame:
    """Per response: Bradley-Terry strength within its prompt, and its strongly connected
    component in the prompt's verdict graph (winner -> loser; ties add no edge).

    ``jury`` holds the pair key and the jury's ``p_a``. Prompts share no comparisons, so
    one fit over the block-diagonal problem (global item indices) equals one fit per prompt:
    the penalised likelihood separates over prompts. Strengths compare only within a prompt.
    """
    rows = jury.filter(pl.col("p_a").is_not_null()).select(*PAIR_KEY, "p_a")
    items = (
        pl.concat(
            [
                rows.select("prompt_id", pl.col("response_a").alias("response_id")),
                rows.select("prompt_id", pl.col("response_b").alias("response_id")),
            ]
        )
        .unique(["response_id"])
        .sort(["prompt_id", "response_id"])
        .with_row_index("_item")
    )
    if items.height == 0:
        return pl.DataFrame(schema={"response_id": pl.String, "strength": pl.Float64, "component": pl.Int64})
    index = items.select("response_id", "_item")
    indexed = rows.join(index.rename({"response_id": "response_a", "_item": "_ia"}), on="response_a").join(
        index.rename({"response_id": "response_b", "_item": "_ib"}), on="response_b"
    )
    item_a = indexed["_ia"].to_numpy().astype(np.int64)
    item_b = indexed["_ib"].to_numpy().astype(np.int64)
    p_a = indexed["p_a"].to_numpy().astype(np.float64)
    strengths = np.asarray(
        fit_bradley_terry(item_a, item_b, 1.0 - p_a, items.height, l2=l2), dtype=np.float64
    )

    decided = np.abs(p_a - 0.5) > _TIE_EPS
    winner = np.where(p_a > 0.5, item_a, item_b)[decided]
    loser = np.where(p_a > 0.5, item_b, item_a)[decided]
    graph = coo_matrix((np.ones(winner.size), (winner, loser)), shape=(items.height, items.height)).tocsr()
    _, component = connected_components(graph, directed=True, connection="strong")
    return items.select("response_id").with_columns(
        strength=pl.Series(strengths), component=pl.Series(component.astype(np.int64))
    )


# --- the filter -------------------------------------------------------------------------
#: the columns of a survivor that pair construction reads (:func:`_select_pairs`, the PAIRS
#: table): what the sharded filter keeps of each shard's survivors
_SURVIVOR_COLUMNS = [
    *PAIR_KEY, "chosen_id", "rejected_id", "p_chosen", "margin", "agreement", "chosen_score",
    "rejected_score", "chosen_generator", "rejected_generator", "chosen_strength", "chosen_char_len",
    "rejected_char_len",
]
#: the columns of a candidate the report reads (:func:`_report`)
_REPORT_COLUMNS = [*PAIR_KEY, "generator_a", "generator_b"]


@dataclass(frozen=True)
class JudgedSignals:
    """What the filter derives from the judgments alone, over the whole dataset: narrow
    (ids and numbers, no text), so it is held at once while the texts are streamed by shard.

    These are the filter's dataset-wide quantities: a latent jury (Dawid-Skene EM, calibrated
    weights) and the Bradley-Terry fit are global fits, whose numbers a fit per shard would
    not reproduce exactly. Everything else the checks read is per pair (see :meth:`shard`)."""

    candidates: pl.DataFrame  # pair key, sorted
    jury: pl.DataFrame  # pair key, p_a, n_judges, n_for_a, n_for_b, agreement
    verdicts: pl.DataFrame  # one row per (pair, judge), with judge_positions' flags
    strengths: pl.DataFrame  # response_id, strength, component

    def response_ids(self) -> pl.Series:
        """Every response a candidate names (its texts and ratings are the shard's inputs)."""
        return pl.concat([self.candidates["response_a"], self.candidates["response_b"]]).unique().sort()

    def shard(self, prompt_ids: pl.Series) -> JudgedSignals:
        """The signals of the candidates of ``prompt_ids`` (a pair belongs to one prompt)."""
        wanted = pl.DataFrame({"prompt_id": prompt_ids.cast(pl.String)})
        candidates = self.candidates.join(wanted, on="prompt_id", how="semi", maintain_order="left")
        sides = pl.concat([candidates["response_a"], candidates["response_b"]])
        responses = pl.DataFrame({"response_id": sides})
        return JudgedSignals(
            candidates,
            self.jury.join(wanted, on="prompt_id", how="semi", maintain_order="left"),
            self.verdicts.join(wanted, on="prompt_id", how="semi", maintain_order="left"),
            self.strengths.join(responses, on="response_id", how="semi", maintain_order="left"),
        )


def judged_signals(
    judgments: pl.DataFrame, params: FilterParams, human_labels: pl.DataFrame | None = None
) -> JudgedSignals:
    """Pass 1 of the filter: candidates, the jury, each judge's verdict and position flags,
    and the per-prompt Bradley-Terry strengths, from the judgments (see :class:`JudgedSignals`)."""
    rows = (
        judgments if params.criteria is None else judgments.filter(pl.col("criterion").is_in(params.criteria))
    )
    candidates = rows.select(PAIR_KEY).unique().sort(PAIR_KEY)
    rows = rows.with_columns(p_a=_single_order_p_a())
    verdicts = judge_verdicts(rows, by_criterion=False)
    jury = _jury_from_verdicts(verdicts, PAIR_KEY, params.jury_method, params.judge_weights)
    # a person's label replaces the jury on its pair (tasks/review.py)
    jury, verdicts = override_with_labels(jury, verdicts, human_labels)
    strengths = prompt_strengths(jury, l2=params.intransitivity.l2)
    positions = judge_positions(verdicts, params.position_flip.tolerance, params.position_flip.enabled)
    return JudgedSignals(candidates, jury, positions, strengths)


def _candidate_frame(
    judgments: pl.DataFrame,
    ratings: pl.DataFrame,
    responses: pl.DataFrame,
    params: FilterParams,
    human_labels: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(candidates with every per-pair signal, per-judge verdicts)."""
    signals = judged_signals(judgments, params, human_labels)
    return _pair_frame(signals, ratings, responses, params), signals.verdicts


def _pair_frame(
    signals: JudgedSignals, ratings: pl.DataFrame, responses: pl.DataFrame, params: FilterParams
) -> pl.DataFrame:
    """One row per candidate of ``signals`` with every per-pair signal the checks read: the
    jury, both responses' features, rubric scores and strengths, and the text similarity.
    Per pair only, so a shard of candidates with its responses gives the shard's rows."""
    features = _response_features(responses, params.self_preference.families)
    scores = response_scores(ratings, params.rating_vs_ranking.aspects)
    per_response = (
        features.join(scores, on="response_id", how="full", coalesce=True)
        .join(signals.strengths, on="response_id", how="full", coalesce=True)
        .with_columns(pl.col("has_text").fill_null(False))
    )

    frame = signals.candidates.join(signals.jury, on=PAIR_KEY, how="left")
    frame = _with_sides(
        frame,
        per_response,
        [
            "generator",
            "model",
            "family",
            "char_len",
            "truncated",
            "has_text",
            "score",
            "strength",
            "component",
        ],
    )
    a_wins = pl.col("p_a") > 0.5
    frame = frame.with_columns(
        pl.col("has_text_a").fill_null(False),
        pl.col("has_text_b").fill_null(False),
        a_wins=a_wins,
        p_chosen=pl.when(a_wins).then(pl.col("p_a")).otherwise(1.0 - pl.col("p_a")),
        chosen_id=pl.when(a_wins).then(pl.col("response_a")).otherwise(pl.col("response_b")),
        rejected_id=pl.when(a_wins).then(pl.col("response_b")).otherwise(pl.col("response_a")),
    )

    def pick(column: str, chosen: bool) -> pl.Expr:
        first, second = (f"{column}_a", f"{column}_b") if chosen else (f"{column}_b", f"{column}_a")
        return pl.when(pl.col("a_wins")).then(pl.col(first)).otherwise(pl.col(second))

    frame = frame.with_columns(
        *[
            pick(c, True).alias(f"chosen_{c}")
            for c in ("generator", "family", "char_len", "score", "strength")
        ],
        *[pick(c, False).alias(f"rejected_{c}") for c in ("generator", "char_len", "score", "strength")],
    ).with_columns(margin=pl.col("chosen_strength") - pl.col("rejected_strength"))

    if params.near_duplicate.enabled:
        frame = pair_text_similarity(frame, responses, params.near_duplicate.ngram)
    return frame


def _single_order_p_a() -> pl.Expr:
    """A judgment's p_a, or, for a single-order judgment stored without one, that order's
    verdict taken as is (P(a better) = P("A") a-first, or 1 - P("A") b-first)."""
    p_a = pl.col("p_a").cast(pl.Float64).fill_nan(None)
    ab = pl.col("p_first_ab").cast(pl.Float64).fill_nan(None)
    ba = pl.col("p_first_ba").cast(pl.Float64).fill_nan(None)
    return (
        pl.when(p_a.is_not_null())
        .then(p_a)
        .when(ab.is_not_null() & ba.is_null())
        .then(ab)
        .when(ba.is_not_null() & ab.is_null())
        .then(1.0 - ba)
        .otherwise(None)
    )


def _check_drops(frame: pl.DataFrame, verdicts: pl.DataFrame, params: FilterParams) -> list[pl.DataFrame]:
    """Every enabled check's drop rows (``verdicts`` carries :func:`judge_positions` flags)."""
    return [check.drops(frame, verdicts) for check in params.checks()]


def _select_pairs(survivors: pl.DataFrame, params: FilterParams) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """(emitted pairs, drop frames for below_margin / not_selected / length_bias)."""
    drops: list[pl.DataFrame] = []
    # judged keeps each judged pair as the jury oriented it: no margin cut, no cap
    min_margin = float("-inf") if params.strategy == "judged" else params.margin
    below = survivors.filter(pl.col("margin") < min_margin)
    drops.append(
        _drop_rows(
            below, BELOW_MARGIN, pl.col("margin"), params.margin, "Bradley-Terry margin below the minimum"
        )
    )
    eligible = survivors.filter(~(pl.col("margin") < min_margin).fill_null(False))
    by_margin = ["prompt_id", "margin", "p_chosen", "chosen_id", "rejected_id"]
    by_margin_desc = [False, True, True, False, False]

    if params.strategy in ("best_vs_worst", "all_above_margin", "judged"):
        ranked = eligible.sort(by_margin, descending=by_margin_desc, nulls_last=True)
    elif params.strategy == "best_vs_random":
        rng = np.random.default_rng(params.seed)
        keyed = eligible.sort(PAIR_KEY).with_columns(_random=pl.Series(rng.random(eligible.height)))
        best = (
            keyed.sort(["prompt_id", "chosen_strength", "chosen_id"], descending=[False, True, False])
            .group_by("prompt_id", maintain_order=True)
            .agg(pl.col("chosen_id").first().alias("_best"))
        )
        ranked = (
            keyed.join(best, on="prompt_id")
            .filter(pl.col("chosen_id") == pl.col("_best"))
            .sort(["prompt_id", "_random"])
            .drop("_best", "_random")
        )
    else:  # pragma: no cover - pydantic restricts the literal
        raise ValueError(params.strategy)
    ranked = ranked.with_columns(_rank=pl.int_range(pl.len()).over("prompt_id"))
    if params.pairs_per_prompt is not None and params.strategy != "judged":
        ranked = ranked.filter(pl.col("_rank") < params.pairs_per_prompt)
    selected = ranked.drop("_rank")

    if params.length_bias.enabled and selected.height:
        guard = params.length_bias
        ratio = pl.col("chosen_char_len") / pl.max_horizontal(pl.col("rejected_char_len"), pl.lit(1))
        selected = selected.with_columns(_len_ratio=ratio.cast(pl.Float64))
        long = selected.filter(pl.col("_len_ratio") >= guard.ratio)
        n_total, n_long = selected.height, long.height
        allowed = (
            n_long
            if guard.max_share >= 1.0
            else int(np.floor(guard.max_share * (n_total - n_long) / (1.0 - guard.max_share) + 1e-9))
        )
        if n_long > allowed:
            removed = long.sort(["margin", "prompt_id", "chosen_id"]).head(n_long - allowed)
            drops.append(
                _drop_rows(
                    removed,
                    LENGTH_BIAS,
                    pl.col("_len_ratio"),
                    guard.ratio,
                    pl.lit(f"long-chosen share {n_long / n_total:.3f} above {guard.max_share}"),
                )
            )
            selected = selected.join(removed.select(PAIR_KEY), on=PAIR_KEY, how="anti")
        selected = selected.drop("_len_ratio")

    not_selected = eligible.join(ranked.select(PAIR_KEY), on=PAIR_KEY, how="anti")
    drops.append(
        _drop_rows(
            not_selected,
            NOT_SELECTED,
            pl.col("margin"),
            None,
            pl.lit(f"strategy {params.strategy}, pairs_per_prompt {params.pairs_per_prompt}"),
        )
    )
    return selected.sort(PAIR_KEY), drops


def _pairs_table(selected: pl.DataFrame, strategy: str) -> pl.DataFrame:
    pair_ids = content_ids(selected, Column("prompt_id"), Column("chosen_id"), Column("rejected_id"))
    out = selected.with_columns(
        pair_id=pair_ids,
        strategy=pl.lit(strategy),
    )
    return _conform(out, tables.PAIRS)


def _count_map(frame: pl.DataFrame, key: str) -> dict:
    """{key value: {reason: distinct pairs}} from a drops frame with ``key`` and reason."""
    if frame.height == 0:
        return {}
    counts = (
        frame.unique([key, "reason", *PAIR_KEY])
        .group_by(key, "reason")
        .agg(pl.len().alias("n"))
        .sort(key, "reason")
    )
    result: dict = {}
    for value, reason, n in counts.iter_rows():
        result.setdefault(value, {})[reason] = int(n)
    return result


def apply_filters(
    judgments: pl.DataFrame,
    ratings: pl.DataFrame,
    responses: pl.DataFrame,
    params: FilterParams | None = None,
    human_labels: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Run every enabled check, then build pairs from the survivors.

    ``human_labels`` (pair key + winner A | B | tie) override the jury on their pairs.

    Returns ``(pairs, drops, report)``: ``pairs`` with the PAIRS columns, ``drops`` with the
    FILTER_DROPS columns (one row per candidate and failed check; judge-level checks name
    the judge), and a JSON-able report: candidate / survivor / pair counts, ``kept_share``
    (candidates that passed every consistency check / candidates), ``prompt_coverage``
    (prompts with at least one pair / prompts with candidates), distinct pairs per *primary*
    reason (``drops_per_reason``: each dropped pair once, under the first of its reasons in
    registry order; also per judge and per generator) and per reason failed at all
    (``failed_per_reason``), judge abstentions, the verdicts the position checks do not
    apply to (single order), each judge's flip rate and first-position preference, and the
    jury's Fleiss' kappa (see :func:`verdict_fleiss_kappa`)."""
    params = params or FilterParams()
    signals = judged_signals(judgments, params, human_labels)
    return _finish_filters(signals, [_shard_checks(signals, ratings, responses, params)], params)


#: reads a shard's inputs: response ids -> (their ratings, their responses)
ShardReader = Callable[[pl.Series], tuple[pl.DataFrame, pl.DataFrame]]


def apply_filters_sharded(
    judgments: pl.DataFrame,
    read_shard: ShardReader,
    params: FilterParams | None = None,
    human_labels: pl.DataFrame | None = None,
    shard_prompts: int = 5000,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """:func:`apply_filters` with the texts streamed by prompt shard: the same result, row for
    row, with at most ``shard_prompts`` prompts' responses, ratings and shingles held at once.

    ``judgments`` need only the columns the jury reads (pair key, judge, judge_model,
    criterion, valid, p_a, p_first_ab, p_first_ba): pass 1 (:func:`judged_signals`) computes
    the dataset-wide quantities from them; pass 2 runs every check shard by shard with those
    fixed, reading each shard's ratings and responses through ``read_shard``; pair
    construction (a run-wide length-bias cap, a seeded draw) and the report run once over
    the shards' narrow survivors and drops."""
    params = params or FilterParams()
    signals = judged_signals(judgments, params, human_labels)
    shards = []
    for prompt_ids in prompt_shards(signals.candidates["prompt_id"], shard_prompts):
        part = signals.shard(prompt_ids)
        ratings, responses = read_shard(part.response_ids())
        shards.append(_shard_checks(part, ratings, responses, params))
    if not shards:  # no candidate: one empty shard gives the empty tables and report
        shards.append(_shard_checks(signals, *read_shard(signals.response_ids()), params))
    return _finish_filters(signals, shards, params)


def prompt_shards(prompt_ids: pl.Series, size: int) -> Iterable[pl.Series]:
    """The distinct prompt ids, sorted, in consecutive chunks of ``size``."""
    if size < 1:
        raise ValueError(f"shard_prompts must be >= 1, got {size}")
    distinct = prompt_ids.unique().sort()
    for offset in range(0, distinct.len(), size):
        yield distinct.slice(offset, size)


@dataclass(frozen=True)
class _ShardResult:
    check_drops: pl.DataFrame  # FILTER_DROPS rows of the checks
    survivors: pl.DataFrame  # candidates that passed every check, _SURVIVOR_COLUMNS
    candidates: pl.DataFrame  # every candidate, _REPORT_COLUMNS


def _shard_checks(
    signals: JudgedSignals, ratings: pl.DataFrame, responses: pl.DataFrame, params: FilterParams
) -> _ShardResult:
    """Pass 2 on one shard: every enabled check, and what pair construction and the report
    need of the shard (narrow: no text)."""
    frame = _pair_frame(signals, ratings, responses, params)
    check_drops = pl.concat(_check_drops(frame, signals.verdicts, params), how="vertical")
    survivors = frame.join(check_drops.select(PAIR_KEY).unique(), on=PAIR_KEY, how="anti")
    return _ShardResult(check_drops, survivors.select(_SURVIVOR_COLUMNS), frame.select(_REPORT_COLUMNS))


def _finish_filters(
    signals: JudgedSignals, shards: list[_ShardResult], params: FilterParams
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Pair construction over every shard's survivors, the sorted drops, and the report."""
    check_drops = pl.concat([s.check_drops for s in shards], how="vertical")
    # shards are consecutive prompt ranges of the sorted candidates: concatenated, they are in
    # the order one whole-dataset frame has
    survivors = pl.concat([s.survivors for s in shards], how="vertical")
    frame = pl.concat([s.candidates for s in shards], how="vertical")
    selected, selection_drops = _select_pairs(survivors, params)
    drops = pl.concat([check_drops, *selection_drops], how="vertical").sort(
        [*PAIR_KEY, "reason", "judge"], nulls_last=True
    )
    require_registered_reasons(drops)
    pairs = _pairs_table(selected, params.strategy)
    report = _report(frame, signals.verdicts, drops, pairs, survivors, params)
    return pairs, drops, report


def _primary_rows(drops: pl.DataFrame) -> pl.DataFrame:
    """The drop rows of each pair's primary reason (several when a judge-level reason
    names several judges)."""
    primary = pair_reasons(drops).select(*PAIR_KEY, "primary_reason")
    return drops.join(primary, on=PAIR_KEY).filter(pl.col("reason") == pl.col("primary_reason"))


def _report(
    frame: pl.DataFrame,
    verdicts: pl.DataFrame,
    drops: pl.DataFrame,
    pairs: pl.DataFrame,
    survivors: pl.DataFrame,
    params: FilterParams,
) -> dict:
    n_candidates = frame.height
    n_prompts = frame["prompt_id"].n_unique() if n_candidates else 0
    primary = _primary_rows(drops)

    def per_reason(rows: pl.DataFrame) -> dict[str, int]:
        counts = rows.unique(["reason", *PAIR_KEY]).group_by("reason").agg(pl.len().alias("n"))
        return {r: 0 for r in REASONS} | {r: int(n) for r, n in counts.iter_rows()}

    generators = pl.concat(
        [
            frame.select(*PAIR_KEY, pl.col("generator_a").alias("generator")),
            frame.select(*PAIR_KEY, pl.col("generator_b").alias("generator")),
        ]
    )
    primary_gen = primary.join(generators, on=PAIR_KEY, how="left").with_columns(
        pl.col("generator").fill_null("?")
    )

    judges: dict = {}
    if verdicts.height:
        lean_ab = pl.col("p_first_ab") - 0.5
        lean_ba = 0.5 - pl.col("p_first_ba")
        both = pl.col("both_orders")
        stats = (
            verdicts.group_by("judge")
            .agg(
                pl.len().alias("verdicts"),
                (~both).sum().alias("single_order_verdicts"),
                pl.col("abstained").sum().alias("abstained"),
                (lean_ab * lean_ba < 0).filter(both).mean().alias("position_flip_rate"),
                ((pl.col("p_first_ab") + pl.col("p_first_ba")) / 2)
                .filter(both)
                .mean()
                .alias("first_position_pref"),
            )
            .sort("judge")
        )
        judges = {
            row["judge"]: {
                "verdicts": int(row["verdicts"]),
                "single_order_verdicts": int(row["single_order_verdicts"]),
                "abstained": int(row["abstained"]),
                # None: no verdict of this judge had both orders (position stats not applicable)
                "position_flip_rate": _float_or_none(row["position_flip_rate"]),
                "first_position_pref": _float_or_none(row["first_position_pref"]),
            }
            for row in stats.iter_rows(named=True)
        }
    per_pair = verdicts.group_by(PAIR_KEY).agg(
        pl.col("both_orders").any().alias("any_both"), pl.col("abstained").any().alias("any_abstained")
    )
    kappa = verdict_fleiss_kappa(verdicts)
    return {
        "candidates": n_candidates,
        "passed_checks": survivors.height,
        "pairs": pairs.height,
        "prompts": n_prompts,
        "prompts_with_pairs": pairs["prompt_id"].n_unique() if pairs.height else 0,
        "kept_share": survivors.height / n_candidates if n_candidates else 0.0,
        "prompt_coverage": (pairs["prompt_id"].n_unique() / n_prompts) if n_prompts and pairs.height else 0.0,
        "strategy": params.strategy,
        "jury_method": params.jury_method,
        "drops_per_reason": per_reason(primary),
        "failed_per_reason": per_reason(drops),
        "drops_per_judge": _count_map(primary.filter(pl.col("judge").is_not_null()), "judge"),
        "drops_per_generator": _count_map(primary_gen, "generator"),
        "abstentions": {
            "verdicts": int(verdicts["abstained"].sum()) if verdicts.height else 0,
            "flipped": int((verdicts["abstained"] & verdicts["flipped"]).sum()) if verdicts.height else 0,
            # balanced ties that were no (counted) flip; a hard-verdict flip is both
            "tied": int((verdicts["abstained"] & ~verdicts["flipped"]).sum()) if verdicts.height else 0,
            "pairs": int(per_pair["any_abstained"].sum()) if per_pair.height else 0,
        },
        "position_checks_not_applicable": {
            # judge verdicts from one presentation order only (imported, position-free)
            "verdicts": int((~verdicts["both_orders"]).sum()) if verdicts.height else 0,
            # judged pairs on which no judge answered both orders: no position check ran
            "pairs": int((~per_pair["any_both"]).sum()) if per_pair.height else 0,
        },
        "judges": judges,
        "fleiss_kappa": kappa["fleiss_kappa"],
        "fleiss_items": kappa["items"],
        "fleiss_raters": kappa["raters"],
    }


def _float_or_none(value) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def filter_report_frame(drops: pl.DataFrame, pairs: pl.DataFrame, responses: pl.DataFrame) -> pl.DataFrame:
    """The ``filter_report`` view's rows, computed from frames (the view's SQL in
    ``schemas/views.py`` implements the same definition; a test holds them equal).

    One row per (reason, judge, generator): ``n_pairs`` = distinct candidate pairs whose
    *primary* reason (the first of their reasons in registry order) this is, ``n_pairs_any``
    = distinct pairs that failed this reason at all. A pair counts under each of its two
    responses' generators (once when both share one; ``?`` when unknown); ``judge`` is null
    for jury-level reasons and names each judge for judge-level ones; emitted pairs appear
    as reason ``kept``. Columns: reason, judge, generator, n_pairs, n_pairs_any."""
    gen = responses.select("response_id", "generator").unique("response_id")
    primary = pair_reasons(drops).select(*PAIR_KEY, "primary_reason")
    drop_rows = (
        drops.select(*PAIR_KEY, "judge", "reason")
        .join(primary, on=PAIR_KEY, how="left")
        .with_columns(is_primary=pl.col("reason") == pl.col("primary_reason"))
        .drop("primary_reason")
    )
    kept = pairs.select(
        "prompt_id",
        pl.min_horizontal("chosen_id", "rejected_id").alias("response_a"),
        pl.max_horizontal("chosen_id", "rejected_id").alias("response_b"),
        pl.lit(None, dtype=pl.String).alias("judge"),
        pl.lit(KEPT).alias("reason"),
        pl.lit(True).alias("is_primary"),
    )
    rows = pl.concat([drop_rows, kept.select(drop_rows.columns)], how="vertical")
    by_side = pl.concat(
        [rows.with_columns(pl.col(side).alias("response_id")) for side in ("response_a", "response_b")]
    )
    return (
        by_side.join(gen, on="response_id", how="left")
        .with_columns(pl.col("generator").fill_null("?"))
        .unique([*PAIR_KEY, "judge", "reason", "generator"])
        .group_by("reason", "judge", "generator")
        .agg(
            pl.col("is_primary").sum().cast(pl.Int64).alias("n_pairs"),
            pl.len().cast(pl.Int64).alias("n_pairs_any"),
        )
        .sort(["reason", "judge", "generator"], nulls_last=True)
    )


# --- baselines --------------------------------------------------------------------------
def argmax_baseline_pairs(ratings: pl.DataFrame, responses: pl.DataFrame) -> pl.DataFrame:
    """Distilabel-style binarisation: per prompt, the response with the highest mean rubric
    score against the one with the lowest, with no margin or position check. Tie-aware: a
    prompt whose best and worst scores are equal emits no pair (a tied rating is a tie, not a
    win for one side); among responses sharing the best (worst) score the smaller (larger)
    id is taken. PAIRS columns; ``p_chosen`` is NaN (no jury) and ``margin`` the rubric
    score difference."""
    scores = response_scores(ratings).join(
        responses.select("response_id", "prompt_id", "generator").unique("response_id"), on="response_id"
    )

    def extreme(side: str, highest: bool) -> pl.DataFrame:
        return (
            scores.sort(["prompt_id", "score", "response_id"], descending=[False, highest, not highest])
            .group_by("prompt_id", maintain_order=True)
            .agg(
                pl.col("response_id").first().alias(f"{side}_id"),
                pl.col("score").first().alias(f"{side}_score"),
                pl.col("generator").first().alias(f"{side}_generator"),
            )
        )

    selected = (
        extreme("chosen", highest=True).join(extreme("rejected", highest=False), on="prompt_id")
        .filter(
            (pl.col("chosen_id") != pl.col("rejected_id")) & (pl.col("chosen_score") > pl.col("rejected_score"))
        )
        .with_columns(
            p_chosen=pl.lit(float("nan")),
            margin=pl.col("chosen_score") - pl.col("rejected_score"),
            agreement=pl.lit(None, dtype=pl.Float64),
        )
        .sort("prompt_id")
    )
    return _pairs_table(selected, "argmax_baseline")


def single_order_pairs(
    judgments: pl.DataFrame,
    judge: str | None = None,
    per_prompt: Literal["best_vs_worst", "all"] = "best_vs_worst",
) -> pl.DataFrame:
    """A naive single-order pairwise judge: one judge (``judge``; default the first by name),
    only the a-first presentation (``p_first_ab``), verdicts taken at face value. Tie-aware:
    a verdict of exactly 0.5 orients nothing (it is a tie, not a win for b).

    ``all``: every judged pair, oriented by that verdict. ``best_vs_worst``: per prompt,
    responses ranked by Copeland score (wins - losses) and the judged pair with the largest
    Copeland gap emitted (ties: the more confident verdict). PAIRS columns; ``margin`` is
    the Copeland gap (0 for ``all``)."""
    rows = judgments.filter(pl.col("valid") & pl.col("p_first_ab").is_not_null())
    if judge is None:
        judge = rows["judge"].min() if rows.height else None
    rows = rows.filter(pl.col("judge") == judge)
    verdicts = (
        rows.group_by(PAIR_KEY)
        .agg(pl.col("p_first_ab").cast(pl.Float64).mean().alias("p"))
        .filter((pl.col("p") - 0.5).abs() > _TIE_EPS)
    )
    a_wins = pl.col("p") > 0.5
    oriented = verdicts.with_columns(
        chosen_id=pl.when(a_wins).then(pl.col("response_a")).otherwise(pl.col("response_b")),
        rejected_id=pl.when(a_wins).then(pl.col("response_b")).otherwise(pl.col("response_a")),
        p_chosen=pl.when(a_wins).then(pl.col("p")).otherwise(1.0 - pl.col("p")),
        agreement=pl.lit(None, dtype=pl.Float64),
    )
    if per_prompt == "all":
        return _pairs_table(oriented.with_columns(margin=pl.lit(0.0)).sort(PAIR_KEY), "single_order")
    copeland = (
        pl.concat(
            [
                oriented.select("prompt_id", pl.col("chosen_id").alias("response_id"), pl.lit(1).alias("w")),
                oriented.select(
                    "prompt_id", pl.col("rejected_id").alias("response_id"), pl.lit(-1).alias("w")
                ),
            ]
        )
        .group_by("response_id")
        .agg(pl.col("w").sum().alias("copeland"))
    )
    scored = (
        oriented.join(copeland.rename({"response_id": "chosen_id", "copeland": "_c"}), on="chosen_id")
        .join(copeland.rename({"response_id": "rejected_id", "copeland": "_r"}), on="rejected_id")
        .with_columns(margin=(pl.col("_c") - pl.col("_r")).cast(pl.Float64))
    )
    selected = (
        scored.sort(["prompt_id", "margin", "p_chosen", "chosen_id"], descending=[False, True, True, False])
        .group_by("prompt_id", maintain_order=True)
        .first()
        .sort("prompt_id")
    )
    return _pairs_table(selected, "single_order")
