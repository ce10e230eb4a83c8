"""Consistency filtering of judged pairs, and preference-pair construction.

Input: the ``judgments`` table (every judge, both orders, per criterion), the ``ratings``
table (rubric expected scores) and the ``responses`` table. Output: the ``pairs`` table
(chosen, rejected), the ``filter_drops`` table (one row per candidate pair and failed
check, with the numbers that failed it) and a JSON-able report.

Method (ALGORITHMS.md, "Judging" and "Consistency": consistency is measured, never assumed)

- A *candidate* is an unordered response pair of one prompt that has at least one judgment
  row, keyed by ``(prompt_id, response_a, response_b)`` with ``response_a < response_b``.
- Each judge's verdict on a candidate is the mean of its valid judgments over the selected
  criteria (``FilterParams.criteria``; all by default) and repeated samples (MEC): one
  position-balanced ``p_a`` plus the mean raw ``P("A")`` of each order.
- The jury's verdict (:func:`aggregate_jury`) is the mean, majority share or weighted mean
  of the judges' ``p_a``; ``agreement`` is the share of judges on the majority side.
- Every check below runs on every candidate (they are independent, a pair can fail several);
  a candidate survives only when it fails none. Reason codes are the module constants.
- Survivors are oriented by the jury (chosen = the side with ``p > 0.5``), scored by a
  per-prompt Bradley-Terry fit over the jury's soft verdicts (``margin`` = strength of
  chosen minus strength of rejected, in logits), and a strategy picks the emitted pairs.
  Candidates that pass every check but are not emitted get a ``below_margin``,
  ``not_selected`` or ``length_bias`` row, so each candidate is either a ``pairs`` row or
  has at least one ``filter_drops`` row: nothing vanishes unexplained.

Baselines for the bench: :func:`argmax_baseline_pairs` (distilabel-style binarisation,
argmax/argmin of the rubric score, no checks) and :func:`single_order_pairs` (one judge, one
presentation order, taken at face value).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from prefcurate.schemas import tables
from prefcurate.schemas.ids import content_id
from prefcurate.tasks.bradley_terry import fit_bradley_terry

# --- reason codes (FILTER_DROPS.reason) -------------------------------------------------
#: no valid judgment exists for the candidate (every judge call failed or was invalid)
NO_VALID_JUDGMENT = "no_valid_judgment"
#: a response of the pair is not in ``responses`` or has no text
MISSING_RESPONSE = "missing_response"
#: a judge's verdict changes side between the a-first and the b-first order (judge-level)
POSITION_FLIP = "position_flip"
#: the jury's position-balanced probability lies within a margin of 0.5
LOW_CONFIDENCE = "low_confidence"
#: the jury's probability is exactly 0.5: the pair cannot be oriented
TIE = "tie"
#: too few judges on the majority side
JURY_DISAGREEMENT = "jury_disagreement"
#: the rubric scores order the pair against the jury's pairwise verdict
RATING_VS_RANKING = "rating_vs_ranking"
#: the pair lies on a preference cycle and the prompt's Bradley-Terry fit does not support it
INTRANSITIVE = "intransitive"
#: chosen and rejected are (near-)identical texts
NEAR_DUPLICATE = "near_duplicate"
#: a response was cut at the token limit (RESPONSES.truncated)
TRUNCATED = "truncated"
#: a judge of the chosen response's model family voted for it (judge-level, optional)
SELF_PREFERENCE = "self_preference"
#: passed every check, but the Bradley-Terry margin is below ``FilterParams.margin``
BELOW_MARGIN = "below_margin"
#: passed every check, but the pair strategy / pairs_per_prompt did not pick it
NOT_SELECTED = "not_selected"
#: picked, then removed by the length-bias guard (share of much-longer chosen capped)
LENGTH_BIAS = "length_bias"

#: the consistency checks, in the order they are reported
CHECK_REASONS = (
    NO_VALID_JUDGMENT,
    MISSING_RESPONSE,
    POSITION_FLIP,
    LOW_CONFIDENCE,
    TIE,
    JURY_DISAGREEMENT,
    RATING_VS_RANKING,
    INTRANSITIVE,
    NEAR_DUPLICATE,
    TRUNCATED,
    SELF_PREFERENCE,
)
#: reasons given by pair construction to candidates that passed every check
SELECTION_REASONS = (BELOW_MARGIN, NOT_SELECTED, LENGTH_BIAS)
REASONS = CHECK_REASONS + SELECTION_REASONS

PAIR_KEY = ["prompt_id", "response_a", "response_b"]
_PROVENANCE = {f.name for f in tables.PROVENANCE}
_TIE_EPS = 1e-12
#: slack on threshold comparisons, so a value at the threshold passes despite rounding
#: (0.6 - 0.5 < 0.1 in floats)
_EPS = 1e-9

JuryMethod = Literal["mean", "majority", "weighted"]
PairStrategy = Literal["best_vs_worst", "best_vs_random", "all_above_margin"]


# --- parameters -------------------------------------------------------------------------
class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


class PositionFlipCheck(_Check):
    """A judge *flips* when its verdict is on the a-side in one order and the b-side in the
    other (both orders picked the same slot). The pair fails when the share of its judges
    that flip exceeds ``max_flip_share``. Default 0.5: a majority of the jury must flip (a
    lone judge flipping fails its pair; 1 of 2 or 1 of 3 does not). 0 makes any flip fatal,
    which under a position bias of 0.2 drops ~2/3 of the candidates in bench/filtering.py
    for no gain in agreement: the balanced p_a already cancels an additive position bias."""

    tolerance: float = Field(
        0.0, ge=0.0, lt=0.5, description="a flip counts only when both orders are further than this from 0.5"
    )
    max_flip_share: float = Field(0.5, ge=0.0, le=1.0)


class ConfidenceCheck(_Check):
    """Fails when |jury p_a - 0.5| < min_margin."""

    min_margin: float = Field(0.1, ge=0.0, le=0.5)


class AgreementCheck(_Check):
    """Fails when fewer than ``min_agreement`` of the judges are on the majority side
    (only with two or more judges). 0.6: 2 of 3 or 3 of 4 pass, a 1-1 or 2-2 split fails."""

    min_agreement: float = Field(0.6, ge=0.0, le=1.0)


class RatingRankingCheck(_Check):
    """Peering Through Preferences: the rating-implied order against the pairwise verdict.
    Fails when the rejected side's mean rubric score exceeds the chosen side's by more than
    ``tolerance`` (scores 1-5; equal ratings count as agreement). Skipped when a score is
    missing."""

    tolerance: float = Field(0.5, ge=0.0)
    aspects: list[str] | None = Field(None, description="rubric aspects to average; all when None")


class TransitivityCheck(_Check):
    """A pair is on a preference cycle when both responses lie in one strongly connected
    component of the prompt's verdict graph (winner -> loser, ties left out). Such a pair
    fails when the prompt's Bradley-Terry strengths do not support the jury's verdict by at
    least ``margin`` logits; on an unequal cycle this drops the weakest edge(s), on a
    symmetric cycle (equal strengths) every edge."""

    margin: float = Field(0.1, ge=0.0)
    l2: float = Field(
        1e-3, gt=0.0, description="L2 penalty of the per-prompt Bradley-Terry fit (see bradley_terry)"
    )


class NearDuplicateCheck(_Check):
    """Similarity = 1 for equal texts after normalisation (case-folded, whitespace
    collapsed), else the Jaccard index of the texts' sets of ``ngram``-byte shingles (UTF-8;
    character n-grams for ASCII). Cheap, vectorised (numpy packing, polars list set
    operations) and good at 'same text, small edits'; not a semantic similarity."""

    threshold: float = Field(0.9, ge=0.0, le=1.0)
    ngram: int = Field(5, ge=1, le=8)


class TruncationCheck(_Check):
    """Fails when either response stopped at the token limit."""


class LengthBiasGuard(_Check):
    """Caps, over the emitted pairs of the run, the share of pairs whose chosen text is at
    least ``ratio`` times longer (characters) than the rejected one at ``max_share``; the
    excess long-chosen pairs with the smallest margins are removed (no refill)."""

    enabled: bool = False
    ratio: float = Field(1.5, ge=1.0)
    max_share: float = Field(0.5, ge=0.0, le=1.0)


class SelfPreferenceGuard(_Check):
    """Fails a pair when a judge of the same model family as the chosen response's
    generator voted for it. Family = ``families[model]`` when given, else the leading
    letters of the model name's last path part, lower-cased ("Qwen/Qwen2.5-0.5B" -> "qwen",
    "google/gemma-3-270m" -> "gemma")."""

    enabled: bool = False
    families: dict[str, str] = Field(default_factory=dict)


class FilterParams(BaseModel):
    """Parameters of the filter stage: the checks, the jury, and pair construction."""

    model_config = ConfigDict(extra="forbid")

    criteria: list[str] | None = Field(None, description="judge criteria that vote; all when None")
    jury_method: JuryMethod = "mean"
    judge_weights: dict[str, float] | None = Field(
        None, description="for jury_method='weighted'; missing = 1"
    )

    position_flip: PositionFlipCheck = Field(default_factory=PositionFlipCheck)
    confidence: ConfidenceCheck = Field(default_factory=ConfidenceCheck)
    agreement: AgreementCheck = Field(default_factory=AgreementCheck)
    rating_vs_ranking: RatingRankingCheck = Field(default_factory=RatingRankingCheck)
    intransitivity: TransitivityCheck = Field(default_factory=TransitivityCheck)
    near_duplicate: NearDuplicateCheck = Field(default_factory=NearDuplicateCheck)
    truncation: TruncationCheck = Field(default_factory=TruncationCheck)
    length_bias: LengthBiasGuard = Field(default_factory=LengthBiasGuard)
    self_preference: SelfPreferenceGuard = Field(default_factory=SelfPreferenceGuard)

    strategy: PairStrategy = Field(
        "best_vs_worst",
        description=(
            "best_vs_worst: surviving pairs by Bradley-Terry margin, largest first (the "
            "(best, worst) pair when it survived); best_vs_random: the prompt's strongest "
            "chosen against random surviving rejected ones (UltraFeedback-style); "
            "all_above_margin: every surviving pair, largest margin first"
        ),
    )
    pairs_per_prompt: int | None = Field(1, ge=1, description="None: no cap")
    margin: float = Field(0.0, description="minimum Bradley-Terry margin (logits) of an emitted pair")
    seed: int = 0


# --- frame helpers ----------------------------------------------------------------------
def _polars_schema(schema: pa.Schema) -> pl.Schema:
    fields = [f for f in schema if f.name not in _PROVENANCE]
    return pl.from_arrow(pa.schema(fields).empty_table()).schema


def _conform(frame: pl.DataFrame, schema: pa.Schema) -> pl.DataFrame:
    """The table's non-provenance columns, in order, with the table's dtypes."""
    target = _polars_schema(schema)
    return frame.select(
        [
            pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in target.items()
        ]
    )


def _empty(schema: pa.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=_polars_schema(schema))


def _drop_rows(
    frame: pl.DataFrame,
    reason: str,
    value: pl.Expr,
    threshold: float | pl.Expr | None,
    detail: pl.Expr | str | None = None,
    judge: pl.Expr | None = None,
) -> pl.DataFrame:
    """FILTER_DROPS rows for every row of ``frame`` (which holds the pair key)."""
    if frame.height == 0:
        return _empty(tables.FILTER_DROPS)
    threshold_expr = threshold if isinstance(threshold, pl.Expr) else pl.lit(threshold, dtype=pl.Float64)
    detail_expr = detail if isinstance(detail, pl.Expr) else pl.lit(detail, dtype=pl.String)
    out = frame.select(
        *PAIR_KEY,
        (judge if judge is not None else pl.lit(None, dtype=pl.String)).alias("judge"),
        pl.lit(reason).alias("reason"),
        value.cast(pl.Float64).alias("value"),
        threshold_expr.cast(pl.Float64).alias("threshold"),
        detail_expr.cast(pl.String).alias("detail"),
    )
    return _conform(out, tables.FILTER_DROPS)


def _fmt(expr: pl.Expr, decimals: int = 3) -> pl.Expr:
    return expr.round(decimals).cast(pl.String)


def model_family(model: pl.Expr, families: dict[str, str] | None = None) -> pl.Expr:
    """Model family of a model-name column (see :class:`SelfPreferenceGuard`). Rows record a
    pool's model identity, ``<served name>@<fingerprint>``; the family is the served name's."""
    model = model.str.replace(r"@[0-9a-f]{12}$", "")
    guessed = model.str.to_lowercase().str.split("/").list.last().str.extract(r"^([a-z]+)", 1)
    if not families:
        return guessed
    return pl.coalesce(model.replace_strict(families, default=None, return_dtype=pl.String), guessed)


# --- jury -------------------------------------------------------------------------------
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


def _jury_from_verdicts(
    verdicts: pl.DataFrame, group: list[str], method: str, judge_weights: dict[str, float] | None
) -> pl.DataFrame:
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
        raise ValueError(f"unknown jury method {method!r}; expected mean, majority or weighted")
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


def aggregate_jury(
    judgments: pl.DataFrame, method: JuryMethod = "mean", judge_weights: dict[str, float] | None = None
) -> pl.DataFrame:
    """The JURY table: the jury's verdict per (prompt, response pair, criterion).

    Only valid judgments count; a judge's repeated judgments of one pair and criterion are
    averaged first, so each judge has one vote. ``mean``: mean of the judges' position-
    balanced ``p_a``; ``majority``: share of judges with ``p_a > 0.5`` (a judge at exactly 0.5
    counts half); ``weighted``: mean weighted by ``judge_weights`` (judge name -> weight,
    default 1). ``agreement`` = judges on the majority side / judges (ties on neither)."""
    verdicts = judge_verdicts(judgments, by_criterion=True)
    group = PAIR_KEY + ["criterion"]
    jury = _jury_from_verdicts(verdicts, group, method, judge_weights)
    return _conform(jury.with_columns(method=pl.lit(method)), tables.JURY)


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
    chosen = per_item.filter(pl.col("n") == modal)
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
def _candidate_frame(
    judgments: pl.DataFrame, ratings: pl.DataFrame, responses: pl.DataFrame, params: FilterParams
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(candidates with every per-pair signal, per-judge verdicts)."""
    rows = (
        judgments if params.criteria is None else judgments.filter(pl.col("criterion").is_in(params.criteria))
    )
    candidates = rows.select(PAIR_KEY).unique().sort(PAIR_KEY)
    verdicts = judge_verdicts(rows, by_criterion=False)
    jury = _jury_from_verdicts(verdicts, PAIR_KEY, params.jury_method, params.judge_weights)

    features = _response_features(responses, params.self_preference.families)
    scores = response_scores(ratings, params.rating_vs_ranking.aspects)
    strengths = prompt_strengths(jury, l2=params.intransitivity.l2)
    per_response = (
        features.join(scores, on="response_id", how="full", coalesce=True)
        .join(strengths, on="response_id", how="full", coalesce=True)
        .with_columns(pl.col("has_text").fill_null(False))
    )

    frame = candidates.join(jury, on=PAIR_KEY, how="left")
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
    return frame, verdicts


def _check_drops(frame: pl.DataFrame, verdicts: pl.DataFrame, params: FilterParams) -> list[pl.DataFrame]:
    drops: list[pl.DataFrame] = []
    judged = frame.filter(pl.col("p_a").is_not_null())
    distance = (pl.col("p_a") - 0.5).abs()

    drops.append(
        _drop_rows(
            frame.filter(pl.col("p_a").is_null()), NO_VALID_JUDGMENT, pl.lit(None), None, "no valid judgment"
        )
    )
    missing = frame.filter(~pl.col("has_text_a") | ~pl.col("has_text_b"))
    drops.append(
        _drop_rows(
            missing,
            MISSING_RESPONSE,
            (~pl.col("has_text_a")).cast(pl.Int32) + (~pl.col("has_text_b")).cast(pl.Int32),
            None,
            pl.when(~pl.col("has_text_a") & ~pl.col("has_text_b"))
            .then(pl.lit("both responses"))
            .when(~pl.col("has_text_a"))
            .then(pl.lit("response_a"))
            .otherwise(pl.lit("response_b")),
        )
    )

    ties = judged.filter(distance <= _TIE_EPS)
    drops.append(_drop_rows(ties, TIE, pl.col("p_a"), 0.5, "jury p_a is exactly 0.5"))

    if params.position_flip.enabled:
        tol = params.position_flip.tolerance
        both_orders = verdicts.filter(pl.col("p_first_ab").is_not_null() & pl.col("p_first_ba").is_not_null())
        lean_ab = pl.col("p_first_ab") - 0.5  # > 0: a preferred with a shown first
        lean_ba = 0.5 - pl.col("p_first_ba")  # > 0: a preferred with b shown first
        flagged = both_orders.with_columns(
            flip=(lean_ab * lean_ba < 0) & (lean_ab.abs() > tol) & (lean_ba.abs() > tol)
        ).with_columns(
            flip_share=pl.col("flip").mean().over(PAIR_KEY),
            n_flip=pl.col("flip").sum().over(PAIR_KEY),
            n_judges=pl.len().over(PAIR_KEY),
        )
        failing = flagged.filter(
            pl.col("flip") & (pl.col("flip_share") > params.position_flip.max_flip_share + _EPS)
        )
        drops.append(
            _drop_rows(
                failing,
                POSITION_FLIP,
                pl.col("p_first_ab") + pl.col("p_first_ba") - 1.0,
                tol,
                pl.format(
                    "P(A) a-first={} b-first={}; {}/{} judges flipped (max share {})",
                    _fmt(pl.col("p_first_ab")),
                    _fmt(pl.col("p_first_ba")),
                    pl.col("n_flip"),
                    pl.col("n_judges"),
                    pl.lit(params.position_flip.max_flip_share),
                ),
                judge=pl.col("judge"),
            )
        )

    if params.confidence.enabled:
        low = judged.filter(distance < params.confidence.min_margin - _EPS)
        drops.append(
            _drop_rows(low, LOW_CONFIDENCE, distance, params.confidence.min_margin, "|jury p_a - 0.5|")
        )

    if params.agreement.enabled:
        split = judged.filter(
            (pl.col("n_judges") >= 2) & (pl.col("agreement") < params.agreement.min_agreement - _EPS)
        )
        drops.append(
            _drop_rows(
                split,
                JURY_DISAGREEMENT,
                pl.col("agreement"),
                params.agreement.min_agreement,
                pl.format(
                    "{} for a, {} for b, of {} judges",
                    pl.col("n_for_a"),
                    pl.col("n_for_b"),
                    pl.col("n_judges"),
                ),
            )
        )

    if params.rating_vs_ranking.enabled:
        gap = pl.col("chosen_score") - pl.col("rejected_score")
        tol = params.rating_vs_ranking.tolerance
        against = judged.filter((distance > _TIE_EPS) & gap.is_not_null() & (gap < -tol - _EPS))
        drops.append(
            _drop_rows(
                against,
                RATING_VS_RANKING,
                gap,
                -tol,
                pl.format(
                    "rubric chosen={} rejected={}",
                    _fmt(pl.col("chosen_score")),
                    _fmt(pl.col("rejected_score")),
                ),
            )
        )

    if params.intransitivity.enabled:
        on_cycle = judged.filter(
            (distance > _TIE_EPS)
            & (pl.col("component_a") == pl.col("component_b"))
            & (pl.col("margin") < params.intransitivity.margin - _EPS)
        )
        drops.append(
            _drop_rows(
                on_cycle,
                INTRANSITIVE,
                pl.col("margin"),
                params.intransitivity.margin,
                pl.format(
                    "on a preference cycle; Bradley-Terry margin of the jury's verdict {}",
                    _fmt(pl.col("margin")),
                ),
            )
        )

    if params.near_duplicate.enabled:
        dup = frame.filter(pl.col("similarity") >= params.near_duplicate.threshold - _EPS)
        drops.append(
            _drop_rows(
                dup, NEAR_DUPLICATE, pl.col("similarity"), params.near_duplicate.threshold, "text similarity"
            )
        )

    if params.truncation.enabled:
        trunc_a = pl.col("truncated_a").fill_null(False)
        trunc_b = pl.col("truncated_b").fill_null(False)
        cut = frame.filter(trunc_a | trunc_b)
        drops.append(
            _drop_rows(
                cut,
                TRUNCATED,
                trunc_a.cast(pl.Int32) + trunc_b.cast(pl.Int32),
                None,
                pl.when(trunc_a & trunc_b)
                .then(pl.lit("both responses"))
                .when(trunc_a)
                .then(pl.lit("response_a"))
                .otherwise(pl.lit("response_b")),
            )
        )

    if params.self_preference.enabled:
        voters = verdicts.join(
            judged.filter(distance > _TIE_EPS).select(*PAIR_KEY, "a_wins", "chosen_family"), on=PAIR_KEY
        ).with_columns(
            judge_family=model_family(pl.col("judge_model"), params.self_preference.families),
            judge_p_chosen=pl.when(pl.col("a_wins")).then(pl.col("p_a")).otherwise(1.0 - pl.col("p_a")),
        )
        own = voters.filter(
            (pl.col("judge_family") == pl.col("chosen_family")) & (pl.col("judge_p_chosen") > 0.5)
        )
        drops.append(
            _drop_rows(
                own,
                SELF_PREFERENCE,
                pl.col("judge_p_chosen"),
                0.5,
                pl.format("judge family {} voted for its own family's response", pl.col("judge_family")),
                judge=pl.col("judge"),
            )
        )
    return drops


def _select_pairs(survivors: pl.DataFrame, params: FilterParams) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """(emitted pairs, drop frames for below_margin / not_selected / length_bias)."""
    drops: list[pl.DataFrame] = []
    below = survivors.filter(pl.col("margin") < params.margin)
    drops.append(
        _drop_rows(
            below, BELOW_MARGIN, pl.col("margin"), params.margin, "Bradley-Terry margin below the minimum"
        )
    )
    eligible = survivors.filter(pl.col("margin") >= params.margin)
    by_margin = ["prompt_id", "margin", "p_chosen", "chosen_id", "rejected_id"]
    by_margin_desc = [False, True, True, False, False]

    if params.strategy in ("best_vs_worst", "all_above_margin"):
        ranked = eligible.sort(by_margin, descending=by_margin_desc)
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
    if params.pairs_per_prompt is not None:
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
    pair_ids = [
        content_id(prompt, chosen, rejected)
        for prompt, chosen, rejected in zip(
            selected["prompt_id"].to_list(),
            selected["chosen_id"].to_list(),
            selected["rejected_id"].to_list(),
        )
    ]
    out = selected.with_columns(
        pair_id=pl.Series(pair_ids, dtype=pl.String),
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
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Run every enabled check, then build pairs from the survivors.

    Returns ``(pairs, drops, report)``: ``pairs`` with the PAIRS columns, ``drops`` with the
    FILTER_DROPS columns (one row per candidate and failed check; judge-level checks name
    the judge), and a JSON-able report: candidate / survivor / pair counts, ``kept_share``
    (candidates that passed every consistency check / candidates), ``prompt_coverage``
    (prompts with at least one pair / prompts with candidates), distinct pairs per reason,
    per judge and per generator, each judge's flip rate and first-position preference, and
    the jury's Fleiss' kappa (see :func:`verdict_fleiss_kappa`)."""
    params = params or FilterParams()
    frame, verdicts = _candidate_frame(judgments, ratings, responses, params)
    check_drops = pl.concat(_check_drops(frame, verdicts, params), how="vertical")
    survivors = frame.join(check_drops.select(PAIR_KEY).unique(), on=PAIR_KEY, how="anti")
    selected, selection_drops = _select_pairs(survivors, params)
    drops = pl.concat([check_drops, *selection_drops], how="vertical").sort(
        [*PAIR_KEY, "reason", "judge"], nulls_last=True
    )
    pairs = _pairs_table(selected, params.strategy)
    report = _report(frame, verdicts, drops, pairs, survivors, params)
    return pairs, drops, report


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
    per_reason = drops.unique(["reason", *PAIR_KEY]).group_by("reason").agg(pl.len().alias("n"))
    reason_counts = {r: 0 for r in REASONS} | {r: int(n) for r, n in per_reason.iter_rows()}

    generators = pl.concat(
        [
            frame.select(*PAIR_KEY, pl.col("generator_a").alias("generator")),
            frame.select(*PAIR_KEY, pl.col("generator_b").alias("generator")),
        ]
    )
    drops_gen = drops.join(generators, on=PAIR_KEY, how="left").with_columns(
        pl.col("generator").fill_null("?")
    )

    judges: dict = {}
    if verdicts.height:
        lean_ab = pl.col("p_first_ab") - 0.5
        lean_ba = 0.5 - pl.col("p_first_ba")
        stats = (
            verdicts.filter(pl.col("p_first_ab").is_not_null() & pl.col("p_first_ba").is_not_null())
            .group_by("judge")
            .agg(
                pl.len().alias("verdicts"),
                (lean_ab * lean_ba < 0).mean().alias("position_flip_rate"),
                ((pl.col("p_first_ab") + pl.col("p_first_ba")) / 2).mean().alias("first_position_pref"),
            )
            .sort("judge")
        )
        judges = {
            j: {"verdicts": int(n), "position_flip_rate": float(f), "first_position_pref": float(p)}
            for j, n, f, p in stats.iter_rows()
        }
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
        "drops_per_reason": reason_counts,
        "drops_per_judge": _count_map(drops.filter(pl.col("judge").is_not_null()), "judge"),
        "drops_per_generator": _count_map(drops_gen, "generator"),
        "judges": judges,
        "fleiss_kappa": kappa["fleiss_kappa"],
        "fleiss_items": kappa["items"],
        "fleiss_raters": kappa["raters"],
    }


def filter_report_frame(drops: pl.DataFrame, pairs: pl.DataFrame, responses: pl.DataFrame) -> pl.DataFrame:
    """Counts of distinct candidate pairs per (reason, judge, generator), for a table or
    ``status``. A pair counts under each of its two responses' generators (once when both
    share one); ``judge`` is null for jury-level reasons; emitted pairs appear as reason
    ``kept``. Columns: reason, judge, generator, n_pairs."""
    gen = responses.select("response_id", "generator").unique("response_id")
    drop_rows = pl.concat(
        [
            drops.select(*PAIR_KEY, "judge", "reason", pl.col(side).alias("response_id"))
            for side in ("response_a", "response_b")
        ]
    )
    kept = pairs.select(
        "prompt_id",
        pl.min_horizontal("chosen_id", "rejected_id").alias("response_a"),
        pl.max_horizontal("chosen_id", "rejected_id").alias("response_b"),
        pl.lit(None, dtype=pl.String).alias("judge"),
        pl.lit("kept").alias("reason"),
    )
    kept_rows = pl.concat(
        [kept.with_columns(pl.col(side).alias("response_id")) for side in ("response_a", "response_b")]
    )
    rows = pl.concat([drop_rows, kept_rows.select(drop_rows.columns)], how="vertical")
    return (
        rows.join(gen, on="response_id", how="left")
        .with_columns(pl.col("generator").fill_null("?"))
        .unique([*PAIR_KEY, "judge", "reason", "generator"])
        .group_by("reason", "judge", "generator")
        .agg(pl.len().cast(pl.Int64).alias("n_pairs"))
        .sort(["reason", "judge", "generator"], nulls_last=True)
    )


# --- baselines --------------------------------------------------------------------------
def argmax_baseline_pairs(ratings: pl.DataFrame, responses: pl.DataFrame) -> pl.DataFrame:
    """Distilabel-style binarisation: per prompt, the response with the highest mean rubric
    score against the one with the lowest, with no margin, tie or position check (ties go to
    the smaller response id for chosen, the larger for rejected, so they still emit a pair
    when the prompt has two responses). PAIRS columns; ``p_chosen`` is NaN (no jury) and
    ``margin`` the rubric score difference."""
    scores = response_scores(ratings).join(
        responses.select("response_id", "prompt_id", "generator").unique("response_id"), on="response_id"
    )
    best = (
        scores.sort(["prompt_id", "score", "response_id"], descending=[False, True, False])
        .group_by("prompt_id", maintain_order=True)
        .agg(
            pl.col("response_id").first().alias("chosen_id"),
            pl.col("score").first().alias("chosen_score"),
            pl.col("generator").first().alias("chosen_generator"),
        )
    )
    worst = (
        scores.sort(["prompt_id", "score", "response_id"], descending=[False, False, True])
        .group_by("prompt_id", maintain_order=True)
        .agg(
            pl.col("response_id").first().alias("rejected_id"),
            pl.col("score").first().alias("rejected_score"),
            pl.col("generator").first().alias("rejected_generator"),
        )
    )
    selected = (
        best.join(worst, on="prompt_id")
        .filter(pl.col("chosen_id") != pl.col("rejected_id"))
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
    only the a-first presentation (``p_first_ab``), verdicts taken at face value.

    ``all``: every judged pair, oriented by that verdict. ``best_vs_worst``: per prompt,
    responses ranked by Copeland score (wins - losses) and the judged pair with the largest
    Copeland gap emitted (ties: the more confident verdict). PAIRS columns; ``margin`` is
    the Copeland gap (0 for ``all``)."""
    rows = judgments.filter(pl.col("valid") & pl.col("p_first_ab").is_not_null())
    if judge is None:
        judge = rows["judge"].min() if rows.height else None
    rows = rows.filter(pl.col("judge") == judge)
    verdicts = rows.group_by(PAIR_KEY).agg(pl.col("p_first_ab").cast(pl.Float64).mean().alias("p"))
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
