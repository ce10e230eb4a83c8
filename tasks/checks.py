"""The filter stage's consistency checks: one small class per check, one registry.

Each check (datatrove's filter pattern) is a pydantic model holding its parameters, with

- ``reason``: the reason code it writes to ``filter_drops`` (one per check);
- ``config_key``: the ``filter:`` config field holding its parameters (None: always on, no
  parameters, e.g. a pair with no valid judgment can never be oriented);
- ``drops(candidates, verdicts)``: the FILTER_DROPS rows of the candidates that fail it,
  vectorised polars. ``candidates`` has one row per candidate pair with every per-pair signal
  (see ``tasks.filter._candidate_frame``); ``verdicts`` one row per (pair, judge) with the
  judge's position flags from :func:`judge_positions`.

:data:`CHECKS` is the registry; its order is the *primary-reason order*: a pair that fails
several checks is counted once, under the first of them (reports, ``filter_report``), while
``filter_drops`` keeps a row for every failed check. Adding a check = one class here, added
to :data:`CHECKS`, plus one test; its config field appears in ``FilterParams`` by itself.

Abstention: a judge *took a side* on a pair unless its balanced verdict is a tie
(p_a = 0.5) or it flipped (its verdict followed the slot, not the response). Abstaining
judges do not count as disagreeing in :class:`AgreementCheck`; too many abstentions fail
:class:`AbstentionCheck` (``judge_abstained``), naming each abstaining judge.

Single-order verdicts (a judge with only one presentation order of a pair: imported
judgments, position-free judge modes) are first-class: their verdict is the one order's
probability, and the position checks (flip, flip-abstention) are *not applicable* to them;
the filter report counts them (``position_checks_not_applicable``).
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl
import pyarrow as pa
from prefcurate.schemas import tables
from prefcurate.tasks.jury import flipped_expr
from pydantic import BaseModel, ConfigDict, Field

PAIR_KEY = ["prompt_id", "response_a", "response_b"]
_PROVENANCE = {f.name for f in tables.PROVENANCE}
_TIE_EPS = 1e-12
#: slack on threshold comparisons, so a value at the threshold passes despite rounding
#: (0.6 - 0.5 < 0.1 in floats)
_EPS = 1e-9


# --- FILTER_DROPS rows ------------------------------------------------------------------
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


def _judged(candidates: pl.DataFrame) -> pl.DataFrame:
    return candidates.filter(pl.col("p_a").is_not_null())


_DISTANCE = (pl.col("p_a") - 0.5).abs()


def model_family(model: pl.Expr, families: dict[str, str] | None = None) -> pl.Expr:
    """Model family of a model-name column (see :class:`SelfPreferenceGuard`). Rows record a
    pool's model identity, ``<served name>@<fingerprint>``; the family is the served name's."""
    model = model.str.replace(r"@[0-9a-f]{12}$", "")
    guessed = model.str.to_lowercase().str.split("/").list.last().str.extract(r"^([a-z]+)", 1)
    if not families:
        return guessed
    return pl.coalesce(model.replace_strict(families, default=None, return_dtype=pl.String), guessed)


# --- per-judge position flags -----------------------------------------------------------
def judge_positions(
    verdicts: pl.DataFrame, flip_tolerance: float = 0.0, flips_abstain: bool = True
) -> pl.DataFrame:
    """``verdicts`` (one row per pair and judge, with p_a, p_first_ab, p_first_ba) plus

    - ``both_orders``: the judge answered both presentation orders (else the position checks
      are not applicable to this verdict);
    - ``flipped``: both orders picked the same *slot*, each further than ``flip_tolerance``
      from 0.5 (only with both orders);
    - ``tied``: the balanced p_a is 0.5;
    - ``abstained``: the judge took no side: tied, or flipped when ``flips_abstain`` (the
      filter passes ``position_flip.enabled``: with the position check off, a flipped
      verdict is taken at its balanced value)."""
    both = pl.col("p_first_ab").is_not_null() & pl.col("p_first_ba").is_not_null()
    flipped = both & flipped_expr(flip_tolerance)
    return verdicts.with_columns(
        both_orders=both,
        flipped=flipped.fill_null(False),
        tied=(_DISTANCE <= _TIE_EPS).fill_null(False),
    ).with_columns(abstained=(pl.col("flipped") & flips_abstain) | pl.col("tied"))


# --- the checks -------------------------------------------------------------------------
class Check(BaseModel):
    """A consistency check: parameters (the pydantic fields) and ``drops``."""

    model_config = ConfigDict(extra="forbid")

    reason: ClassVar[str]
    config_key: ClassVar[str | None] = None

    enabled: bool = True

    def drops(self, candidates: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError


class NoValidJudgmentCheck(Check):
    """No valid judgment exists for the candidate (every judge call failed or was invalid)."""

    reason: ClassVar[str] = "no_valid_judgment"

    def drops(self, candidates, verdicts):
        return _drop_rows(
            candidates.filter(pl.col("p_a").is_null()), self.reason, pl.lit(None), None, "no valid judgment"
        )


class MissingResponseCheck(Check):
    """A response of the pair is not in ``responses`` or has no text."""

    reason: ClassVar[str] = "missing_response"

    def drops(self, candidates, verdicts):
        missing = candidates.filter(~pl.col("has_text_a") | ~pl.col("has_text_b"))
        return _drop_rows(
            missing,
            self.reason,
            (~pl.col("has_text_a")).cast(pl.Int32) + (~pl.col("has_text_b")).cast(pl.Int32),
            None,
            pl.when(~pl.col("has_text_a") & ~pl.col("has_text_b"))
            .then(pl.lit("both responses"))
            .when(~pl.col("has_text_a"))
            .then(pl.lit("response_a"))
            .otherwise(pl.lit("response_b")),
        )


class PositionFlipCheck(Check):
    """A judge *flips* when its verdict is on the a-side in one order and the b-side in the
    other (both orders picked the same slot). The pair fails when the share of its judges
    that flip exceeds ``max_flip_share`` (judge-level rows, one per flipping judge). Default
    0.5: a majority of the jury must flip (a lone judge flipping fails its pair; 1 of 2 or 1
    of 3 does not). 0 makes any flip fatal, which under a position bias of 0.2 drops ~2/3 of
    the candidates in bench/filtering.py for no gain in agreement: the balanced p_a already
    cancels an additive position bias. Not applicable to single-order verdicts: the share is
    over the judges that answered both orders."""

    reason: ClassVar[str] = "position_flip"
    config_key: ClassVar[str | None] = "position_flip"

    tolerance: float = Field(
        0.0, ge=0.0, lt=0.5, description="a flip counts only when both orders are further than this from 0.5"
    )
    max_flip_share: float = Field(0.5, ge=0.0, le=1.0)

    def drops(self, candidates, verdicts):
        flagged = verdicts.filter(pl.col("both_orders")).with_columns(
            flip_share=pl.col("flipped").mean().over(PAIR_KEY),
            n_flip=pl.col("flipped").sum().over(PAIR_KEY),
            n_judges=pl.len().over(PAIR_KEY),
        )
        failing = flagged.filter(pl.col("flipped") & (pl.col("flip_share") > self.max_flip_share + _EPS))
        return _drop_rows(
            failing,
            self.reason,
            pl.col("p_first_ab") + pl.col("p_first_ba") - 1.0,
            self.tolerance,
            pl.format(
                "P(A) a-first={} b-first={}; {}/{} judges flipped (max share {})",
                _fmt(pl.col("p_first_ab")),
                _fmt(pl.col("p_first_ba")),
                pl.col("n_flip"),
                pl.col("n_judges"),
                pl.lit(self.max_flip_share),
            ),
            judge=pl.col("judge"),
        )


class AbstentionCheck(Check):
    """A judge *abstains* on a pair when its balanced verdict is a tie or it flipped (see
    :func:`judge_positions`; the flip uses ``position_flip.tolerance``, and counts only while
    the position-flip check is enabled). The pair fails
    ``judge_abstained`` when the share of its judges that abstained exceeds
    ``max_abstain_share`` (one row per abstaining judge). Default 0.5: one consistent judge
    next to one that flipped passes (1 of 2 abstained), a lone judge that flipped does not."""

    reason: ClassVar[str] = "judge_abstained"
    config_key: ClassVar[str | None] = "abstention"

    max_abstain_share: float = Field(0.5, ge=0.0, le=1.0)

    def drops(self, candidates, verdicts):
        flagged = verdicts.with_columns(
            abstain_share=pl.col("abstained").mean().over(PAIR_KEY),
            n_abstained=pl.col("abstained").sum().over(PAIR_KEY),
            n_judges=pl.len().over(PAIR_KEY),
        )
        failing = flagged.filter(
            pl.col("abstained") & (pl.col("abstain_share") > self.max_abstain_share + _EPS)
        )
        why = (
            pl.when(pl.col("flipped"))
            .then(
                pl.format(
                    "flipped (P(A) a-first={} b-first={})",
                    _fmt(pl.col("p_first_ab")),
                    _fmt(pl.col("p_first_ba")),
                )
            )
            .otherwise(pl.lit("balanced p_a is 0.5"))
        )
        return _drop_rows(
            failing,
            self.reason,
            pl.col("abstain_share"),
            self.max_abstain_share,
            pl.format("{}; {}/{} judges abstained", why, pl.col("n_abstained"), pl.col("n_judges")),
            judge=pl.col("judge"),
        )


class TieCheck(Check):
    """The jury's probability is exactly 0.5: the pair cannot be oriented (always on)."""

    reason: ClassVar[str] = "tie"

    def drops(self, candidates, verdicts):
        ties = _judged(candidates).filter(_DISTANCE <= _TIE_EPS)
        return _drop_rows(ties, self.reason, pl.col("p_a"), 0.5, "jury p_a is exactly 0.5")


class ConfidenceCheck(Check):
    """Fails when |jury p_a - 0.5| < min_margin."""

    reason: ClassVar[str] = "low_confidence"
    config_key: ClassVar[str | None] = "confidence"

    min_margin: float = Field(0.1, ge=0.0, le=0.5)

    def drops(self, candidates, verdicts):
        low = _judged(candidates).filter(_DISTANCE < self.min_margin - _EPS)
        return _drop_rows(low, self.reason, _DISTANCE, self.min_margin, "|jury p_a - 0.5|")


class AgreementCheck(Check):
    """Fails when fewer than ``min_agreement`` of the judges that took a side are on the
    majority side (only with two or more such judges; abstaining judges, see
    :class:`AbstentionCheck`, are no disagreement). 0.6: 2 of 3 or 3 of 4 pass, a 1-1 or 2-2
    split fails."""

    reason: ClassVar[str] = "jury_disagreement"
    config_key: ClassVar[str | None] = "agreement"

    min_agreement: float = Field(0.6, ge=0.0, le=1.0)

    def drops(self, candidates, verdicts):
        voting = ~pl.col("abstained")
        sides = verdicts.group_by(PAIR_KEY).agg(
            (voting & (pl.col("p_a") > 0.5)).sum().alias("n_a"),
            (voting & (pl.col("p_a") < 0.5)).sum().alias("n_b"),
            pl.col("abstained").sum().alias("n_abstained"),
        )
        n_voters = pl.col("n_a") + pl.col("n_b")
        agreement = pl.max_horizontal("n_a", "n_b") / n_voters
        split = sides.filter((n_voters >= 2) & (agreement < self.min_agreement - _EPS))
        split = split.join(_judged(candidates).select(PAIR_KEY), on=PAIR_KEY, how="semi")
        abstained = pl.when(pl.col("n_abstained") > 0).then(
            pl.format("; {} abstained", pl.col("n_abstained"))
        ).otherwise(pl.lit(""))
        return _drop_rows(
            split,
            self.reason,
            agreement,
            self.min_agreement,
            pl.format(
                "{} for a, {} for b, of {} judges{}", pl.col("n_a"), pl.col("n_b"), n_voters, abstained
            ),
        )


class RatingRankingCheck(Check):
    """Peering Through Preferences: the rating-implied order against the pairwise verdict.
    Fails when the rejected side's mean rubric score exceeds the chosen side's by more than
    ``tolerance`` (scores 1-5; equal ratings count as agreement). Skipped when a score is
    missing."""

    reason: ClassVar[str] = "rating_vs_ranking"
    config_key: ClassVar[str | None] = "rating_vs_ranking"

    tolerance: float = Field(0.5, ge=0.0)
    aspects: list[str] | None = Field(None, description="rubric aspects to average; all when None")

    def drops(self, candidates, verdicts):
        gap = pl.col("chosen_score") - pl.col("rejected_score")
        against = _judged(candidates).filter(
            (_DISTANCE > _TIE_EPS) & gap.is_not_null() & (gap < -self.tolerance - _EPS)
        )
        return _drop_rows(
            against,
            self.reason,
            gap,
            -self.tolerance,
            pl.format(
                "rubric chosen={} rejected={}", _fmt(pl.col("chosen_score")), _fmt(pl.col("rejected_score"))
            ),
        )


class TransitivityCheck(Check):
    """A pair is on a preference cycle when both responses lie in one strongly connected
    component of the prompt's verdict graph (winner -> loser, ties left out). Such a pair
    fails when the prompt's Bradley-Terry strengths do not support the jury's verdict by at
    least ``margin`` logits; on an unequal cycle this drops the weakest edge(s), on a
    symmetric cycle (equal strengths) every edge."""

    reason: ClassVar[str] = "intransitive"
    config_key: ClassVar[str | None] = "intransitivity"

    margin: float = Field(0.1, ge=0.0)
    l2: float = Field(
        1e-3, gt=0.0, description="L2 penalty of the per-prompt Bradley-Terry fit (see bradley_terry)"
    )

    def drops(self, candidates, verdicts):
        on_cycle = _judged(candidates).filter(
            (_DISTANCE > _TIE_EPS)
            & (pl.col("component_a") == pl.col("component_b"))
            & (pl.col("margin") < self.margin - _EPS)
        )
        return _drop_rows(
            on_cycle,
            self.reason,
            pl.col("margin"),
            self.margin,
            pl.format(
                "on a preference cycle; Bradley-Terry margin of the jury's verdict {}", _fmt(pl.col("margin"))
            ),
        )


class NearDuplicateCheck(Check):
    """Similarity = 1 for equal texts after normalisation (case-folded, whitespace
    collapsed), else the Jaccard index of the texts' sets of ``ngram``-byte shingles (UTF-8;
    character n-grams for ASCII). Cheap, vectorised (numpy packing, polars list set
    operations) and good at 'same text, small edits'; not a semantic similarity."""

    reason: ClassVar[str] = "near_duplicate"
    config_key: ClassVar[str | None] = "near_duplicate"

    threshold: float = Field(0.9, ge=0.0, le=1.0)
    ngram: int = Field(5, ge=1, le=8)

    def drops(self, candidates, verdicts):
        dup = candidates.filter(pl.col("similarity") >= self.threshold - _EPS)
        return _drop_rows(dup, self.reason, pl.col("similarity"), self.threshold, "text similarity")


class TruncationCheck(Check):
    """Fails when either response stopped at the token limit."""

    reason: ClassVar[str] = "truncated"
    config_key: ClassVar[str | None] = "truncation"

    def drops(self, candidates, verdicts):
        trunc_a = pl.col("truncated_a").fill_null(False)
        trunc_b = pl.col("truncated_b").fill_null(False)
        return _drop_rows(
            candidates.filter(trunc_a | trunc_b),
            self.reason,
            trunc_a.cast(pl.Int32) + trunc_b.cast(pl.Int32),
            None,
            pl.when(trunc_a & trunc_b)
            .then(pl.lit("both responses"))
            .when(trunc_a)
            .then(pl.lit("response_a"))
            .otherwise(pl.lit("response_b")),
        )


class SelfPreferenceGuard(Check):
    """Fails a pair when a judge of the same model family as the chosen response's
    generator voted for it. Family = ``families[model]`` when given, else the leading
    letters of the model name's last path part, lower-cased ("Qwen/Qwen2.5-0.5B" -> "qwen",
    "google/gemma-3-270m" -> "gemma")."""

    reason: ClassVar[str] = "self_preference"
    config_key: ClassVar[str | None] = "self_preference"

    enabled: bool = False
    families: dict[str, str] = Field(default_factory=dict)

    def drops(self, candidates, verdicts):
        decided = _judged(candidates).filter(_DISTANCE > _TIE_EPS)
        voters = verdicts.join(
            decided.select(*PAIR_KEY, "a_wins", "chosen_family"), on=PAIR_KEY
        ).with_columns(
            judge_family=model_family(pl.col("judge_model"), self.families),
            judge_p_chosen=pl.when(pl.col("a_wins")).then(pl.col("p_a")).otherwise(1.0 - pl.col("p_a")),
        )
        own = voters.filter(
            (pl.col("judge_family") == pl.col("chosen_family")) & (pl.col("judge_p_chosen") > 0.5)
        )
        return _drop_rows(
            own,
            self.reason,
            pl.col("judge_p_chosen"),
            0.5,
            pl.format("judge family {} voted for its own family's response", pl.col("judge_family")),
            judge=pl.col("judge"),
        )


#: the registry, in primary-reason order: a pair failing several checks counts under the
#: first (the more specific cause first: with hard verdicts a flip explains the tie, the
#: abstention and the low confidence it leaves behind; a jury tie explains its judges'
#: abstentions and the low confidence)
CHECKS: tuple[type[Check], ...] = (
    NoValidJudgmentCheck,
    MissingResponseCheck,
    PositionFlipCheck,
    TieCheck,
    AbstentionCheck,
    ConfidenceCheck,
    AgreementCheck,
    RatingRankingCheck,
    TransitivityCheck,
    NearDuplicateCheck,
    TruncationCheck,
    SelfPreferenceGuard,
)

#: passed every check, but the Bradley-Terry margin is below ``FilterParams.margin``
BELOW_MARGIN = "below_margin"
#: passed every check, but the pair strategy / pairs_per_prompt did not pick it
NOT_SELECTED = "not_selected"
#: picked, then removed by the length-bias guard (share of much-longer chosen capped)
LENGTH_BIAS = "length_bias"

CHECK_REASONS: tuple[str, ...] = tuple(check.reason for check in CHECKS)
#: reasons given by pair construction to candidates that passed every check
SELECTION_REASONS: tuple[str, ...] = (BELOW_MARGIN, NOT_SELECTED, LENGTH_BIAS)
#: every reason a ``filter_drops`` row may carry, in primary-reason order
REASONS: tuple[str, ...] = CHECK_REASONS + SELECTION_REASONS
#: the pseudo-reason of emitted pairs in filter reports
KEPT = "kept"

assert len(set(REASONS)) == len(REASONS), "reason codes must be unique"
assert len({c.config_key for c in CHECKS if c.config_key}) == sum(1 for c in CHECKS if c.config_key)


def configurable_checks() -> tuple[type[Check], ...]:
    return tuple(c for c in CHECKS if c.config_key is not None)


def unregistered_reasons(drops: pl.DataFrame) -> list[str]:
    """The reason codes in ``drops`` that no registered check or selection step gives."""
    if drops.height == 0:
        return []
    return sorted(set(drops["reason"].unique().to_list()) - set(REASONS))


def require_registered_reasons(drops: pl.DataFrame) -> None:
    """Raise when a drop row carries a reason that is not registered (the filter stage
    calls this before it returns; the ``filter_drops`` contract checks stored rows)."""
    unknown = unregistered_reasons(drops)
    if unknown:
        raise ValueError(
            f"filter_drops.reason: unregistered reason code(s) {unknown}; register a check in "
            "prefcurate.tasks.checks.CHECKS"
        )


# --- primary reasons (the one definition behind reports and the filter_report view) --------
def reason_rank_sql() -> str:
    """The registry order as a SQL VALUES list ``(reason, rank)`` for the report views."""
    rows = ", ".join(f"('{reason}', {rank})" for rank, reason in enumerate(REASONS))
    return f"(VALUES {rows}) AS reason_rank(reason, rank)"


#: rank given to a reason that is not registered (sorts last; the contract flags it)
UNREGISTERED_RANK = len(REASONS)


def pair_reasons(drops: pl.DataFrame) -> pl.DataFrame:
    """One row per dropped pair: pair key, ``primary_reason`` (the first of its reasons in
    registry order) and ``all_reasons`` (every distinct reason it failed, in that order)."""
    ranks = pl.DataFrame({"reason": list(REASONS), "_rank": list(range(len(REASONS)))})
    rows = (
        drops.select(*PAIR_KEY, "reason")
        .unique()
        .join(ranks, on="reason", how="left")
        .with_columns(pl.col("_rank").fill_null(UNREGISTERED_RANK))
        .sort([*PAIR_KEY, "_rank", "reason"])
    )
    return (
        rows.group_by(PAIR_KEY, maintain_order=True)
        .agg(pl.col("reason").first().alias("primary_reason"), pl.col("reason").alias("all_reasons"))
        .sort(PAIR_KEY)
    )
