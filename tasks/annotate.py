"""Annotate: LLM judges compare response pairs (both orders) and rate single responses.

Plain functions over polars frames and an :class:`~prefcurate.inference.base.Engine`. The
verdict is never parsed from text: every template ends exactly where the answer token is
due and :meth:`Engine.score_choices` returns the probability of each option ("A"/"B",
"1".."5"), normalised over the options.

Method choices (details the papers leave open)
- **Pairwise, both orders (FairEval BPC).** Each (pair, criterion) is asked twice in the
  same ``score_choices`` batch: ``p_first_ab`` = P("A") with ``response_a`` shown first,
  ``p_first_ba`` = P("A") with ``response_b`` shown first. The stored verdict is
  ``p_a = (p_first_ab + 1 - p_first_ba) / 2`` (QuRating's average of the two orders), valid
  only when both orders are valid. ``response_a < response_b`` by id.
- **Pair schedule.** ``all`` pairs per prompt, or ``balanced``: a fixed number of pairs per
  prompt chosen greedily from the circulant graph (neighbours at offset 1, then 2, ...),
  always taking the pair whose responses have been used least. Every response then
  appears in as many pairs as any other (+-1), and the first ``n`` pairs form a cycle, so
  the comparison graph is connected as soon as it can be (``m >= n - 1``): Bradley-Terry
  scores downstream stay comparable within a prompt. ``auto`` (default) takes all pairs
  while their number fits ``max_pairs_per_prompt`` and the balanced schedule beyond.
  Responses are ordered by id (ids are hashes, so the order is arbitrary but stable).
- **Rubric (UltraFeedback aspects, Prometheus rubric format).** The expected score
  ``sum s * p(s)`` over the probabilities of "1".."5", without writing feedback first.
- **Judge modes, per judge** (``mode:``, ``tasks/judge_modes.py``). ``probability`` (the
  default) is the both-orders verdict above. ``rationale`` (FairEval MEC): for each order,
  ``k`` short evidence texts are sampled (temperature 1, as in FairEval's code), then the
  verdict probability is read after each one; the order's probability is the mean over the
  valid samples. One jury can mix modes; a mode's templates and settings enter the unit
  keys and judgment ids.
- **Calibration on gold pairs.** The judge answers both orders of each human-labelled
  pair. accuracy = share of pairs whose position-balanced verdict picks the gold winner
  (0.5 exactly counts as wrong); position_flip_rate = share of pairs where the same
  *position* wins in both orders (the verdict follows the slot, not the response, as in
  "Peering Through Preferences"); first_position_pref = mean P("A") over both orders
  (0.5 = no position bias).
- Long texts are cut to ``max_response_chars`` / ``max_prompt_chars`` (with a marker) so
  that a pair fits the judge's context; the cut is part of the judged input, not stored.
- Text inside a response is not escaped: a response that imitates the template's section
  headers can confuse a weak judge. The consistency filters downstream catch the effect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import yaml
from prefcurate.schemas.ids import Column, content_ids
from prefcurate.schemas.tables import JUDGE_CALIBRATION, JUDGMENTS, RATINGS
from prefcurate.tasks.generate import (
    check_pools,
    frame_schema,
    pool_model_field,
    require_columns,
    require_unique_names,
)
from prefcurate.tasks.judge_modes import (  # noqa: F401  (re-exported for callers of this module)
    BPDE_TIE_BAND,
    PAIRWISE_OPTIONS,
    RATIONALE_STOP,
    JudgeMode,
    PairVerdicts,
    Progress,
    balanced_position_entropy,
    mode_class,
    mode_for,
    score_options,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefcurate.errors import InputError
from prefcurate.inference.base import Engine
from prefcurate.templates import (  # noqa: F401  (re-exported)
    PAIRWISE_FIELDS,
    RATIONALE_FIELDS,
    RUBRIC_FIELDS,
    SCORE_OPTIONS,
    TEMPLATE_KINDS,
    Template,
    load_template,
    read_criteria,
)

_SCORE_VALUES = np.arange(1.0, 6.0)
_TIE_TOLERANCE = 1e-9

#: the placeholders of annotate's own template kinds (all kinds: prefcurate.templates)
TEMPLATE_FIELDS: dict[str, frozenset[str]] = {
    kind: TEMPLATE_KINDS[kind].fields for kind in ("pairwise", "rubric", "rationale")
}

TRUNCATION_MARK = " [...]"

JUDGMENT_COLUMNS = frame_schema(JUDGMENTS)
RATING_COLUMNS = frame_schema(RATINGS)
CALIBRATION_COLUMNS = frame_schema(JUDGE_CALIBRATION)
UNJUDGEABLE_COLUMNS = pl.Schema({"prompt_id": pl.String, "reason": pl.String, "message": pl.String})
PAIR_COLUMNS = pl.Schema({"prompt_id": pl.String, "response_a": pl.String, "response_b": pl.String})



# ------------------------------------------------------------------ criteria and rubrics


class RubricSpec(BaseModel):
    """A Prometheus-style rubric for one aspect: what it means, and each score's meaning."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(..., min_length=1)
    score_1: str = Field(..., min_length=1)
    score_2: str = Field(..., min_length=1)
    score_3: str = Field(..., min_length=1)
    score_4: str = Field(..., min_length=1)
    score_5: str = Field(..., min_length=1)


def available_criteria(custom: Mapping[str, str] | None = None) -> dict[str, str]:
    """Built-in pairwise criteria (``templates/criteria.yaml``) updated with ``custom``."""
    return {**read_criteria(), **dict(custom or {})}


def resolve_criteria(names: Sequence[str], custom: Mapping[str, str] | None = None) -> dict[str, str]:
    """``name -> description`` for ``names``; raises naming an unknown criterion."""
    known = available_criteria(custom)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown criterion {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
            " (define your own under custom_criteria)"
        )
    if not names:
        raise ValueError("at least one criterion is needed for pairwise judging")
    return {n: known[n] for n in names}


def builtin_rubrics() -> dict[str, RubricSpec]:
    """The packaged rubrics (``prefcurate/data/rubrics.yaml``): UltraFeedback's aspects."""
    entry = resources.files("prefcurate.data").joinpath("rubrics.yaml")
    if not entry.is_file():
        return {}
    raw = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
    if isinstance(raw, dict) and isinstance(raw.get("aspects"), (dict, list)):
        raw = raw["aspects"]
    if isinstance(raw, list):  # [{name: ..., description: ..., score_1: ...}, ...]
        raw = {item["name"]: {k: v for k, v in item.items() if k != "name"} for item in raw}
    return {
        name: RubricSpec(**{k: " ".join(str(v).split()) for k, v in spec.items()})
        for name, spec in raw.items()
    }


def resolve_rubrics(
    aspects: Sequence[str], custom: Mapping[str, RubricSpec] | None = None
) -> dict[str, RubricSpec]:
    """``aspect -> rubric`` for ``aspects``; raises naming an unknown aspect."""
    known = {**builtin_rubrics(), **dict(custom or {})}
    unknown = [a for a in aspects if a not in known]
    if unknown:
        raise ValueError(
            f"unknown rubric aspect {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(sorted(known)) or '(none)'} (define your own under custom_rubrics)"
        )
    return {a: known[a] for a in aspects}


# ------------------------------------------------------------------------- parameters


class JudgeSpec(BaseModel):
    """One judge: a model of the ``judges`` pool with its versioned templates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="unique name; stored with each judgment")
    pool: str = Field("judges", description="inference pool that serves this model")
    model: str | None = pool_model_field("annotate")
    template: str = Field("pairwise_v3", description="pairwise template (name or .txt path)")
    rubric_template: str = Field("rubric_v1", description="rubric template (name or .txt path)")
    rationale_template: str = Field(
        "rationale_v2", description="template for rationale (MEC) mode (name or .txt path)"
    )
    mode: str | None = Field(
        None, description="how this judge reaches a verdict: a judge mode of tasks/judge_modes.py "
        "(probability, rationale, ...); unset = probability (or rationale when the older "
        "annotate.rationale_k > 0)"
    )
    mode_options: dict[str, Any] = Field(
        default_factory=dict, description="settings of the judge's mode, e.g. {k: 3} for rationale"
    )

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        if value is not None:
            mode_class(value)  # raises listing the known modes
        return value

    @model_validator(mode="after")
    def _mode_options(self) -> JudgeSpec:
        if self.mode is None and self.mode_options:
            raise ValueError(f"judge {self.name!r}: mode_options given without a mode")
        if self.mode is not None:
            mode_class(self.mode).parse_options(self.mode_options, self.name)
        return self


class AnnotateParams(BaseModel):
    """Parameters of the annotate stage."""

    model_config = ConfigDict(extra="forbid")

    judges: list[JudgeSpec] = Field(
        default_factory=lambda: [JudgeSpec(name="gemma3-270m-judge")],
        description="the jury; each judge judges every scheduled pair",
    )
    pairing: Literal["auto", "all", "balanced"] = Field(
        "auto", description="all pairs, a balanced schedule, or all while they fit the cap"
    )
    max_pairs_per_prompt: int = Field(
        12, ge=1, description="cap on pairs per prompt for balanced/auto pairing"
    )
    criteria: list[str] = Field(default_factory=lambda: ["overall"], min_length=1)
    custom_criteria: dict[str, str] = Field(
        default_factory=dict, description="extra pairwise criteria: name -> description"
    )
    rubric_aspects: list[str] = Field(
        default_factory=lambda: ["helpfulness", "honesty", "instruction_following", "truthfulness"],
        description="aspects rated 1-5 per response; empty = no rubric ratings",
    )
    custom_rubrics: dict[str, RubricSpec] = Field(default_factory=dict)
    rationale_k: int = Field(
        0, ge=0, description="older configs: > 0 puts every judge without its own `mode` in "
        "rationale mode with k rationales per order; prefer `mode: rationale` per judge"
    )
    rationale_temperature: float = Field(1.0, ge=0.0, description="with rationale_k: sampling temperature")
    rationale_max_tokens: int = Field(64, ge=1, description="with rationale_k: longest rationale")
    exclude_truncated: bool = Field(
        False, description="leave responses cut at the token limit out of judging"
    )
    max_prompt_chars: int | None = Field(2000, ge=1, description="longer prompts are cut")
    max_response_chars: int | None = Field(1500, ge=1, description="longer responses are cut")
    batch_size: int = Field(64, ge=2, description="requests per engine call")
    calibration_pairs: int | None = Field(
        None, ge=1, description="gold pairs judged for calibration (the first N); None = all (42)"
    )
    gold_path: str | None = Field(
        None,
        description="your labelled pairs (prompt, response_a, response_b, winner A/B/tie; JSONL, JSON, "
        "CSV with its separator found, TSV or Parquet, .gz too) to calibrate the judges on instead of "
        "the packaged 42; bad rows are quarantined (tasks/calibration.py)",
    )

    @model_validator(mode="after")
    def _check(self) -> AnnotateParams:
        require_unique_names([j.name for j in self.judges], "judge")
        resolve_criteria(self.criteria, self.custom_criteria)
        resolve_rubrics(self.rubric_aspects, self.custom_rubrics)
        for judge in self.judges:
            mode = judge_mode(judge, self)
            mode.templates()  # loads and validates them
            if self.rubric_aspects and mode.rates_responses:
                load_template(judge.rubric_template, "rubric")
        return self


def judge_mode(judge: JudgeSpec, params: AnnotateParams) -> JudgeMode:
    """The judge's mode object: its own ``mode`` and ``mode_options``; without one, the
    default, which the older stage-wide ``rationale_k > 0`` makes rationale (with the
    stage's rationale settings). The one place that reads that switch."""
    if judge.mode is not None:
        return mode_for(judge.mode, judge.mode_options, judge)
    if params.rationale_k > 0:
        legacy = {"k": params.rationale_k, "temperature": params.rationale_temperature,
                  "max_tokens": params.rationale_max_tokens}
        return mode_for("rationale", legacy, judge)
    return mode_for("probability", {}, judge)


def check_judge_pools(
    judges: Iterable[JudgeSpec], known_pools: Iterable[str] | Mapping[str, Any],
    params: AnnotateParams | None = None,
) -> None:
    """Raise naming the judge and pool when a judge's pool is not configured, and (given
    the pools' configs and ``params``) when its mode cannot run on that pool
    (:meth:`JudgeMode.check_pool`): at plan time, before any engine is opened."""
    check_pools(judges, known_pools, "judge")
    if params is not None and isinstance(known_pools, Mapping):
        from prefcurate.inference.pools import parse_pool

        for judge in judges:
            judge_mode(judge, params).check_pool(judge.pool, parse_pool(known_pools[judge.pool]), judge.name)


def judge_template_hashes(judge: JudgeSpec, params: AnnotateParams, verdicts_only: bool = False) -> dict[str, str]:
    """The hashes of the templates ``judge`` uses under ``params`` (role -> hash), read from
    the files now: they enter the unit keys, so a template edited in place is judged again.
    Every template of the judge's mode, and the rubric template when the judge rates
    aspects; ``verdicts_only``: the mode's templates alone (calibration's)."""
    mode = judge_mode(judge, params)
    hashes = mode.template_hashes()
    if params.rubric_aspects and mode.rates_responses and not verdicts_only:
        hashes["rubric"] = load_template(judge.rubric_template, "rubric").hash
    return hashes


def check_judge_engines(judges: Iterable[JudgeSpec], params: AnnotateParams, engines: Mapping[str, Engine]) -> None:
    """Raise naming the judge when its engine cannot serve its mode (before any work)."""
    for judge in judges:
        judge_mode(judge, params).check_engine(engines[judge.name], judge.name)


# ---------------------------------------------------------------------- scheduling


def _usable(responses: pl.DataFrame, exclude_truncated: bool) -> pl.DataFrame:
    """Responses a judge can read: not failed, with non-blank text."""
    ok = pl.col("text").is_not_null() & (pl.col("text").str.strip_chars().str.len_chars() > 0)
    if "finish_reason" in responses.columns:
        ok = ok & (pl.col("finish_reason").fill_null("error") != "error")
    if exclude_truncated and "truncated" in responses.columns:
        ok = ok & ~pl.col("truncated").fill_null(False)
    return responses.filter(ok)


def find_unjudgeable(
    responses: pl.DataFrame,
    prompts: pl.DataFrame | None = None,
    *,
    exclude_truncated: bool = False,
) -> pl.DataFrame:
    """Prompts that cannot be judged pairwise, with a reason: ``(prompt_id, reason, message)``.

    Reasons: ``fewer_than_two_responses`` (counting usable responses only) and
    ``prompt_missing`` (responses whose prompt is not in ``prompts``). For quarantine.
    """
    require_columns(responses, ["response_id", "prompt_id", "text"], "responses")
    totals = responses.group_by("prompt_id").agg(pl.len().alias("total"))
    usable = (
        _usable(responses, exclude_truncated).group_by("prompt_id").agg(pl.len().alias("usable"))
    )
    counts = totals.join(usable, on="prompt_id", how="left")
    if prompts is not None:
        require_columns(prompts, ["prompt_id"], "prompts")
        counts = prompts.select("prompt_id").unique().join(counts, on="prompt_id", how="full",
                                                           coalesce=True)
    counts = counts.with_columns(pl.col("total", "usable").fill_null(0))
    few = counts.filter(pl.col("usable") < 2).select(
        "prompt_id",
        pl.lit("fewer_than_two_responses").alias("reason"),
        pl.format(
            "{} usable response(s) of {}; pairwise judging needs at least two",
            "usable",
            "total",
        ).alias("message"),
    )
    frames = [few]
    if prompts is not None:
        orphan = (
            responses.select("prompt_id")
            .unique()
            .join(prompts.select("prompt_id"), on="prompt_id", how="anti")
            .select(
                "prompt_id",
                pl.lit("prompt_missing").alias("reason"),
                pl.lit("responses refer to a prompt that is not in the prompts table").alias(
                    "message"
                ),
            )
        )
        frames.append(orphan)
    return pl.concat(frames).cast(UNJUDGEABLE_COLUMNS).sort("prompt_id", "reason")


@lru_cache(maxsize=256)
def balanced_pattern(n: int, pairs: int) -> tuple[tuple[int, int], ...]:
    """``pairs`` index pairs (i < j) over ``n`` items, each item used equally often (+-1).

    Hand-written because no library offers "m edges with near-equal degrees": a greedy
    over the circulant candidates (offset 1 first) takes the pair whose items are used
    least, then a repair pass moves edges from the most- to the least-used item while
    their uses differ by 2 or more. A move always exists: if deg(u) >= deg(v) + 2, some
    neighbour w of u is not a neighbour of v (pigeonhole), and (u, w) -> (v, w) narrows the
    gap without touching w. With ``pairs >= n`` the moves keep the offset-1 ring, so the
    graph stays connected (checked exhaustively for n <= 40 in development).
    """
    total = n * (n - 1) // 2
    if pairs >= total:
        return tuple((i, j) for i in range(n) for j in range(i + 1, n))
    candidates: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for offset in range(1, n // 2 + 1):
        for start in range(n):
            edge = (min(start, (start + offset) % n), max(start, (start + offset) % n))
            if edge not in seen:
                seen.add(edge)
                candidates.append(edge)
    first = np.array([c[0] for c in candidates])
    second = np.array([c[1] for c in candidates])
    uses = np.zeros(n, dtype=np.int64)
    taken = np.zeros(len(candidates), dtype=bool)
    rank = np.arange(len(candidates))
    for _ in range(pairs):
        high = np.maximum(uses[first], uses[second])
        low = np.minimum(uses[first], uses[second])
        key = np.where(taken, np.iinfo(np.int64).max, (high * (n + 1) + low) * len(rank) + rank)
        best = int(np.argmin(key))
        taken[best] = True
        uses[first[best]] += 1
        uses[second[best]] += 1
    chosen = np.zeros((n, n), dtype=bool)
    chosen[first[taken], second[taken]] = True
    chosen |= chosen.T
    ring = np.zeros((n, n), dtype=bool)
    items = np.arange(n)
    ring[items, (items + 1) % n] = True
    ring |= ring.T
    keep_ring = pairs >= n
    while True:
        degree = chosen.sum(axis=1)
        u, v = int(np.argmax(degree)), int(np.argmin(degree))
        if degree[u] - degree[v] <= 1:
            break
        movable = chosen[u] & ~chosen[v]
        movable[[u, v]] = False
        preferred = movable & ~ring[u] if keep_ring else movable
        w = int(np.flatnonzero(preferred if preferred.any() else movable)[0])
        chosen[u, w] = chosen[w, u] = False
        chosen[v, w] = chosen[w, v] = True
    i, j = np.nonzero(np.triu(chosen))
    position = {edge: k for k, edge in enumerate(candidates)}
    return tuple(sorted(zip(i.tolist(), j.tolist()), key=position.__getitem__))


def schedule_pairs(
    responses: pl.DataFrame,
    pairing: Literal["auto", "all", "balanced"] = "auto",
    max_pairs_per_prompt: int = 12,
    *,
    exclude_truncated: bool = False,
) -> pl.DataFrame:
    """The response pairs to judge: ``(prompt_id, response_a, response_b)``, a < b by id.

    Only usable responses count (see :func:`find_unjudgeable` for the prompts left out).
    """
    require_columns(responses, ["response_id", "prompt_id", "text"], "responses")
    if pairing not in ("auto", "all", "balanced"):
        raise ValueError(f"unknown pairing {pairing!r}; use all, balanced or auto")
    ranked = (
        _usable(responses, exclude_truncated)
        .select("prompt_id", "response_id")
        .unique()
        .sort("prompt_id", "response_id")
        .with_columns(
            pl.int_range(pl.len()).over("prompt_id").cast(pl.Int64).alias("i"),
            pl.len().over("prompt_id").cast(pl.Int64).alias("n"),
        )
        .filter(pl.col("n") >= 2)
    )
    if ranked.is_empty():
        return pl.DataFrame(schema=PAIR_COLUMNS)
    patterns = []
    for n in ranked["n"].unique().to_list():
        all_pairs = n * (n - 1) // 2
        if pairing == "all" or (pairing == "auto" and all_pairs <= max_pairs_per_prompt):
            budget = all_pairs
        else:
            budget = min(max_pairs_per_prompt, all_pairs)
        pattern = balanced_pattern(n, budget)
        patterns.append(
            pl.DataFrame(
                {"n": [n] * len(pattern), "i": [p[0] for p in pattern], "j": [p[1] for p in pattern]},
                schema={"n": pl.Int64, "i": pl.Int64, "j": pl.Int64},
            )
        )
    pattern_frame = pl.concat(patterns)
    first = ranked.join(pattern_frame, on=["n", "i"]).rename({"response_id": "response_a"})
    second = ranked.select("prompt_id", pl.col("i").alias("j"), pl.col("response_id").alias("response_b"))
    # indices follow id order, so i < j already gives response_a < response_b
    return (
        first.join(second, on=["prompt_id", "j"])
        .select("prompt_id", "response_a", "response_b")
        .sort("prompt_id", "response_a", "response_b")
        .cast(PAIR_COLUMNS)
    )


# -------------------------------------------------------------------------- scoring


def _cut(column: str, limit: int | None) -> pl.Expr:
    text = pl.col(column).cast(pl.String).fill_null("")
    if limit is None:
        return text
    return (
        pl.when(text.str.len_chars() > limit)
        .then(pl.concat_str(text.str.slice(0, limit), pl.lit(TRUNCATION_MARK)))
        .otherwise(text)
    )


def _pair_jobs(
    pairs: pl.DataFrame,
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    criteria: Mapping[str, str],
    params: AnnotateParams,
) -> pl.DataFrame:
    require_columns(pairs, ["prompt_id", "response_a", "response_b"], "pairs")
    require_columns(responses, ["response_id", "text"], "responses")
    require_columns(prompts, ["prompt_id", "prompt"], "prompts")
    same = pairs.filter(pl.col("response_a") == pl.col("response_b"))
    if same.height:
        raise ValueError(f"a pair compares response {same['response_a'][0]!r} with itself")
    texts = responses.select("response_id", _cut("text", params.max_response_chars).alias("t"))
    known = set(texts["response_id"].to_list())
    unknown = sorted(
        (set(pairs["response_a"].to_list()) | set(pairs["response_b"].to_list())) - known
    )
    if unknown:
        raise ValueError(f"pairs name response(s) not in responses: {', '.join(unknown[:5])}")
    prompt_texts = prompts.select("prompt_id", _cut("prompt", params.max_prompt_chars).alias("prompt"))
    missing = pairs.join(prompt_texts, on="prompt_id", how="anti")
    if missing.height:
        raise ValueError(
            f"pairs name prompt(s) not in prompts: {', '.join(missing['prompt_id'].unique().to_list()[:5])}"
        )
    canonical = pairs.select(
        "prompt_id",
        pl.min_horizontal("response_a", "response_b").alias("response_a"),
        pl.max_horizontal("response_a", "response_b").alias("response_b"),
    ).unique(maintain_order=True)
    criteria_frame = pl.DataFrame(
        {"criterion": list(criteria), "criterion_description": list(criteria.values())},
        schema={"criterion": pl.String, "criterion_description": pl.String},
    )
    return (
        canonical.join(criteria_frame, how="cross")
        .join(prompt_texts, on="prompt_id")
        .join(texts.rename({"response_id": "response_a", "t": "text_a"}), on="response_a")
        .join(texts.rename({"response_id": "response_b", "t": "text_b"}), on="response_b")
    )


def judge_pairs(
    pairs: pl.DataFrame,
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    judge: JudgeSpec,
    engine: Engine,
    params: AnnotateParams | None = None,
    *,
    existing_ids: Iterable[str] = (),
    progress: Progress | None = None,
) -> pl.DataFrame:
    """One judge's verdicts on ``pairs`` for every criterion of ``params``: JUDGMENTS rows.

    The judge's mode (:func:`judge_mode`) asks the engine; a both-orders mode sends both
    orders of every (pair, criterion) in the same ``score_choices`` batch. Judgments whose
    id is in ``existing_ids`` are not asked again.
    """
    params = params or AnnotateParams(judges=[judge], rubric_aspects=[])
    criteria = resolve_criteria(params.criteria, params.custom_criteria)
    mode = judge_mode(judge, params)
    template_name, template_hash = mode.stored_template(mode.templates())
    identity = mode.identity()
    jobs = _pair_jobs(pairs, responses, prompts, criteria, params)
    ids = content_ids(
        jobs, "judgment", Column("prompt_id"), Column("response_a"), Column("response_b"), judge.name,
        engine.model, Column("criterion"), Column("criterion_description"), template_hash, identity,
    )
    jobs = _drop_existing(
        jobs.with_columns(ids.alias("judgment_id")),
        "judgment_id",
        existing_ids,
    ).with_row_index("job")
    if jobs.is_empty():
        return pl.DataFrame(schema=JUDGMENT_COLUMNS)
    verdicts = mode.judge(jobs, engine, batch_size=params.batch_size, progress=progress)
    out = jobs.select(
        "judgment_id",
        "prompt_id",
        "response_a",
        "response_b",
        pl.lit(judge.name).alias("judge"),
        pl.lit(engine.model).alias("judge_model"),
        "criterion",
        pl.lit(template_name).alias("template"),
        pl.lit(template_hash).alias("template_hash"),
        pl.lit(mode.name).alias("mode"),
    ).with_columns(
        pl.Series("p_first_ab", verdicts.p_first_ab).fill_nan(None),
        pl.Series("p_first_ba", verdicts.p_first_ba).fill_nan(None),
        pl.Series("p_a", verdicts.p_a).fill_nan(None),
        pl.Series("bpde", verdicts.bpde).fill_nan(None),
        pl.Series("valid", verdicts.valid),
        pl.Series("error", verdicts.errors, dtype=pl.String),
        # provenance of imported judgments (tasks/import_judgments.py); a judge's own have none
        pl.lit(None, pl.String).alias("source_file"),
        pl.lit(None, pl.Int64).alias("source_record"),
    )
    return out.cast(JUDGMENT_COLUMNS).select(list(JUDGMENT_COLUMNS))


def _drop_existing(frame: pl.DataFrame, column: str, existing_ids: Iterable[str]) -> pl.DataFrame:
    existing = pl.DataFrame({column: list(existing_ids)}, schema={column: pl.String})
    return frame.join(existing, on=column, how="anti", maintain_order="left")


def rate_responses(
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    judge: JudgeSpec,
    engine: Engine,
    params: AnnotateParams | None = None,
    *,
    existing_ids: Iterable[str] = (),
    progress: Progress | None = None,
) -> pl.DataFrame:
    """Rubric scores 1-5 per (usable response, aspect): RATINGS rows.

    ``probs`` are P("1") .. P("5") normalised over the five digits and ``expected_score``
    is ``sum s * p(s)``. A judge whose mode does not rate responses
    (``JudgeMode.rates_responses``) gives none.
    """
    params = params or AnnotateParams(judges=[judge])
    rubrics = resolve_rubrics(params.rubric_aspects, params.custom_rubrics)
    if not rubrics or not judge_mode(judge, params).rates_responses:
        return pl.DataFrame(schema=RATING_COLUMNS)
    require_columns(responses, ["response_id", "prompt_id", "text"], "responses")
    require_columns(prompts, ["prompt_id", "prompt"], "prompts")
    template = load_template(judge.rubric_template, "rubric")
    rubric_frame = pl.DataFrame(
        [{"aspect": name, "aspect_description": spec.description,
          **{f"score_{s}": getattr(spec, f"score_{s}") for s in SCORE_OPTIONS}}
         for name, spec in rubrics.items()]
    )
    jobs = (
        _usable(responses, params.exclude_truncated)
        .select("response_id", "prompt_id", _cut("text", params.max_response_chars).alias("response"))
        .unique("response_id", maintain_order=True)
        .join(
            prompts.select("prompt_id", _cut("prompt", params.max_prompt_chars).alias("prompt")),
            on="prompt_id",
        )
        .join(rubric_frame, how="cross")
    )
    definitions = {name: spec.model_dump() for name, spec in rubrics.items()}
    # content_id("rating", response_id, judge, model, aspect, its definition, template hash)
    ids = content_ids(jobs, "rating", Column("response_id"), judge.name, engine.model,
                      Column("aspect", lambda aspect: (aspect, definitions[aspect])), template.hash)
    jobs = _drop_existing(jobs.with_columns(ids.alias("rating_id")), "rating_id", existing_ids)
    if jobs.is_empty():
        return pl.DataFrame(schema=RATING_COLUMNS)
    probs, errors = score_options(
        engine, template.render_column(jobs), SCORE_OPTIONS,
        batch_size=params.batch_size, progress=progress,
    )
    valid = np.all(np.isfinite(probs), axis=1)
    expected = np.where(valid, np.nan_to_num(probs) @ _SCORE_VALUES, np.nan)
    prob_lists = pl.select(pl.when(pl.Series(valid)).then(pl.Series(probs).arr.to_list())).to_series()
    out = jobs.select(
        "rating_id",
        "prompt_id",
        "response_id",
        pl.lit(judge.name).alias("judge"),
        pl.lit(engine.model).alias("judge_model"),
        "aspect",
        pl.lit(template.hash).alias("template_hash"),
    ).with_columns(
        prob_lists.alias("probs"),
        pl.Series("expected_score", expected).fill_nan(None),
        pl.Series("valid", valid),
        pl.Series("error", errors, dtype=pl.String),
    )
    return out.cast(RATING_COLUMNS).select(list(RATING_COLUMNS))


# ---------------------------------------------------------------------- calibration


def load_gold_pairs(path: str | Path | None = None) -> pl.DataFrame:
    """Human-labelled pairs ``(id, prompt, response_a, response_b, winner, why)``.

    Default: the packaged ``prefcurate/data/gold_pairs.jsonl``. Raises naming the records
    whose winner is not "A" or "B" or that lack a field.
    """
    if path is None:
        text = resources.files("prefcurate.data").joinpath("gold_pairs.jsonl").read_text("utf-8")
        source = "prefcurate/data/gold_pairs.jsonl"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    import io

    gold = pl.read_ndjson(io.StringIO(text)) if text.strip() else pl.DataFrame()
    needed = ["id", "prompt", "response_a", "response_b", "winner"]
    require_columns(gold, needed, f"gold pairs ({source})")
    bad = gold.with_row_index("line", offset=1).filter(
        ~pl.col("winner").is_in(["A", "B"]) | pl.any_horizontal(pl.col(needed).is_null())
    )
    if bad.height:
        raise InputError(
            f"gold pairs {source}: line(s) {bad['line'].to_list()[:10]} need every field and "
            'winner "A" or "B"'
        )
    return gold.select(needed + (["why"] if "why" in gold.columns else []))


def calibration_gold_pairs(params: AnnotateParams, with_quarantine: bool = False):
    """The gold pairs the judges are calibrated on: the user's ``gold_path`` (its A/B pairs;
    with ``with_quarantine``, also its bad rows, for the quarantine) or the packaged set,
    cut to ``calibration_pairs``."""
    from prefcurate.tasks.calibration import decisive, load_gold_file

    quarantine = None
    if params.gold_path:
        gold, quarantine = load_gold_file(params.gold_path)
        gold = decisive(gold)
    else:
        gold = load_gold_pairs()
    gold = gold if params.calibration_pairs is None else gold.head(params.calibration_pairs)
    return (gold, quarantine) if with_quarantine else gold


def calibration_metrics(
    p_first_ab: np.ndarray, p_first_ba: np.ndarray, gold_a_wins: np.ndarray, p_a: np.ndarray | None = None
) -> dict[str, float | int]:
    """Accuracy, position-flip rate and first-position preference over valid gold pairs.

    ``p_first_ab`` = P("A") with the gold pair's response_a shown first, ``p_first_ba`` =
    P("A") with response_b shown first; ``gold_a_wins`` = the human picked response_a.
    ``p_a``: the verdicts when they do not come from two orders (a position-free judge
    mode); the accuracy is then over its valid entries, and the flip rate and first-position
    preference are NaN (there is no position to prefer).
    """
    gold = np.asarray(gold_a_wins, dtype=bool)
    nan = {"position_flip_rate": math.nan, "first_position_pref": math.nan}
    if p_a is not None:
        verdict = np.asarray(p_a, dtype=np.float64)
        ok = np.isfinite(verdict)
        if not ok.any():
            return {"gold_pairs": 0, "accuracy": math.nan, **nan}
        return {"gold_pairs": int(ok.sum()), "accuracy": _accuracy(verdict[ok], gold[ok]), **nan}
    ab = np.asarray(p_first_ab, dtype=np.float64)
    ba = np.asarray(p_first_ba, dtype=np.float64)
    ok = np.isfinite(ab) & np.isfinite(ba)
    ab, ba, gold = ab[ok], ba[ok], gold[ok]
    if ab.size == 0:
        return {"gold_pairs": 0, "accuracy": math.nan, **nan}
    same_position_wins = (ab > 0.5) == (ba > 0.5)
    return {
        "gold_pairs": int(ab.size),
        "accuracy": _accuracy((ab + 1.0 - ba) / 2.0, gold),
        "position_flip_rate": float(same_position_wins.mean()),
        "first_position_pref": float(np.concatenate([ab, ba]).mean()),
    }


def _accuracy(p_a: np.ndarray, gold_a_wins: np.ndarray) -> float:
    # a tie (within rounding: 0.9 + 1 - 0.9 is not exactly 1) picks nobody: wrong
    margin = np.where(np.abs(p_a - 0.5) <= _TIE_TOLERANCE, 0.0, p_a - 0.5)
    return float(np.where(gold_a_wins, margin > 0, margin < 0).mean())


def calibrate_judge(
    gold: pl.DataFrame,
    judge: JudgeSpec,
    engine: Engine,
    params: AnnotateParams | None = None,
    *,
    criterion: str = "overall",
) -> pl.DataFrame:
    """One JUDGE_CALIBRATION row for ``judge`` on the gold pairs, judged by its mode (both
    orders each for a both-orders mode).

    ``gold_pairs`` counts the pairs with a valid verdict (in both orders); the metrics are
    null when there are none.
    """
    params = params or AnnotateParams(judges=[judge], rubric_aspects=[])
    description = resolve_criteria([criterion], params.custom_criteria)[criterion]
    require_columns(gold, ["id", "prompt", "response_a", "response_b", "winner"], "gold")
    mode = judge_mode(judge, params)
    _, template_hash = mode.stored_template(mode.templates())
    jobs = gold.with_row_index("job").select(
        "job",
        _cut("prompt", params.max_prompt_chars).alias("prompt"),
        _cut("response_a", params.max_response_chars).alias("text_a"),
        _cut("response_b", params.max_response_chars).alias("text_b"),
        pl.lit(criterion).alias("criterion"),
        pl.lit(description).alias("criterion_description"),
    )
    verdicts = mode.judge(jobs, engine, batch_size=params.batch_size)
    gold_a_wins = (gold["winner"] == "A").to_numpy()
    if mode.needs_both_orders:
        metrics = calibration_metrics(verdicts.p_first_ab, verdicts.p_first_ba, gold_a_wins)
    else:
        metrics = calibration_metrics(verdicts.p_first_ab, verdicts.p_first_ba, gold_a_wins, p_a=verdicts.p_a)
    row = {
        "judge": judge.name,
        "judge_model": engine.model,
        "template_hash": template_hash,
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
    }
    return pl.DataFrame([row], schema=CALIBRATION_COLUMNS)


# ------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class AnnotateResult:
    judgments: pl.DataFrame  # JUDGMENTS rows, one per (judge, pair, criterion)
    ratings: pl.DataFrame  # RATINGS rows, one per (judge, response, aspect)
    unjudgeable: pl.DataFrame  # (prompt_id, reason, message) for quarantine


def annotate(
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    params: AnnotateParams,
    engines: Mapping[str, Engine],
    *,
    existing_judgment_ids: Iterable[str] = (),
    existing_rating_ids: Iterable[str] = (),
    progress: Progress | None = None,
) -> AnnotateResult:
    """The whole stage: schedule pairs, every judge judges them and rates the responses.

    ``engines`` maps judge name -> engine (the flow opens one per judge's pool/model).
    """
    absent = [j.name for j in params.judges if j.name not in engines]
    if absent:
        raise ValueError(f"no engine given for judge(s) {', '.join(absent)}")
    check_judge_engines(params.judges, params, engines)
    unjudgeable = find_unjudgeable(responses, prompts, exclude_truncated=params.exclude_truncated)
    pairs = schedule_pairs(
        responses.join(prompts.select("prompt_id"), on="prompt_id", how="semi"),
        params.pairing,
        params.max_pairs_per_prompt,
        exclude_truncated=params.exclude_truncated,
    )
    judged_ids, rated_ids = set(existing_judgment_ids), set(existing_rating_ids)
    judgments, ratings = [], []
    for judge in params.judges:
        engine = engines[judge.name]
        judgments.append(
            judge_pairs(pairs, responses, prompts, judge, engine, params,
                        existing_ids=judged_ids, progress=progress)
        )
        ratings.append(
            rate_responses(responses, prompts, judge, engine, params,
                           existing_ids=rated_ids, progress=progress)
        )
    return AnnotateResult(
        pl.concat(judgments) if judgments else pl.DataFrame(schema=JUDGMENT_COLUMNS),
        pl.concat(ratings) if ratings else pl.DataFrame(schema=RATING_COLUMNS),
        unjudgeable,
    )
