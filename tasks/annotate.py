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
- **Rationale mode (FairEval MEC, off by default).** For each order, ``k`` short evidence
  texts are sampled (temperature 1, as in FairEval's code), then the verdict probability
  is read after each one; the order's probability is the mean over the valid samples.
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
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefcurate.inference.base import ChoiceRequest, Engine, GenerateRequest, SamplingParams
from prefcurate.schemas.ids import content_id
from prefcurate.schemas.tables import JUDGE_CALIBRATION, JUDGMENTS, RATINGS
from prefcurate.tasks.generate import frame_schema
from prefcurate.templates import read_criteria, read_template_text

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each engine batch."""

PAIRWISE_OPTIONS: tuple[str, str] = ("A", "B")
SCORE_OPTIONS: tuple[str, ...] = ("1", "2", "3", "4", "5")
_SCORE_VALUES = np.arange(1.0, 6.0)
_TIE_TOLERANCE = 1e-9

PAIRWISE_FIELDS = frozenset({"prompt", "response_first", "response_second", "criterion_description"})
RUBRIC_FIELDS = frozenset(
    {"prompt", "response", "aspect", "aspect_description"} | {f"score_{s}" for s in SCORE_OPTIONS}
)
RATIONALE_FIELDS = PAIRWISE_FIELDS | {"rationale"}
TEMPLATE_FIELDS: dict[str, frozenset[str]] = {
    "pairwise": PAIRWISE_FIELDS,
    "rubric": RUBRIC_FIELDS,
    "rationale": RATIONALE_FIELDS,
}

#: rationale sampling stops at the next section header, a blank line or a verdict
RATIONALE_STOP = ("\n#", "\n\n", "[[")
TRUNCATION_MARK = " [...]"

JUDGMENT_COLUMNS = frame_schema(JUDGMENTS)
RATING_COLUMNS = frame_schema(RATINGS)
CALIBRATION_COLUMNS = frame_schema(JUDGE_CALIBRATION)
UNJUDGEABLE_COLUMNS = pl.Schema({"prompt_id": pl.String, "reason": pl.String, "message": pl.String})
PAIR_COLUMNS = pl.Schema({"prompt_id": pl.String, "response_a": pl.String, "response_b": pl.String})


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """A validated judge template: its text (as used) and the hash stored with judgments."""

    name: str
    kind: str  # pairwise | rubric | rationale
    text: str
    hash: str

    @property
    def segments(self) -> list[tuple[str, str | None]]:
        """``(literal, field)`` pieces in order; literals already un-escaped."""
        return [(literal, field) for literal, field, _, _ in string.Formatter().parse(self.text)]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(field for _, field in self.segments if field is not None)

    def render(self, **values: str) -> str:
        return self.text.format(**values)

    def render_column(self, frame: pl.DataFrame, stop_before: str | None = None) -> list[str]:
        """Render every row of ``frame`` (one column per field), vectorised with polars.

        With ``stop_before``, the text ends just before that field's first occurrence
        (the rationale-generation prompt of a rationale template).
        """
        parts: list[pl.Expr] = []
        for literal, field in self.segments:
            if literal:
                parts.append(pl.lit(literal))
            if field is None:
                continue
            if field == stop_before:
                break
            parts.append(pl.col(field).cast(pl.String).fill_null(""))
        if not parts:
            return [""] * frame.height
        return frame.select(pl.concat_str(parts).alias("rendered"))["rendered"].to_list()


def _template_kind(stem: str, kind: str | None) -> str:
    if kind is None:
        kind = stem.split("_", 1)[0]
        if kind not in TEMPLATE_FIELDS:
            raise ValueError(
                f"cannot tell the kind of template {stem!r} from its name; name it "
                f"<kind>_vN with kind one of {', '.join(TEMPLATE_FIELDS)}, or pass kind="
            )
    if kind not in TEMPLATE_FIELDS:
        raise ValueError(f"unknown template kind {kind!r}; known: {', '.join(TEMPLATE_FIELDS)}")
    return kind


def load_template(name: str, kind: str | None = None) -> Template:
    """Load and validate a judge template: a packaged name (``pairwise_v1``) or a file path.

    Trailing newlines of the file are dropped (the template must end where the answer
    token is due; editors add a final newline). Raises ``ValueError`` naming the missing
    or unknown placeholders, and when no answer cue follows the last placeholder.
    """
    path = Path(name).expanduser()
    if path.suffix == ".txt" and path.is_file():
        stem, raw = path.stem, path.read_text(encoding="utf-8")
    else:
        stem, raw = (name[:-4] if name.endswith(".txt") else name), read_template_text(name)
    kind = _template_kind(stem, kind)
    text = raw.rstrip("\r\n")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:  # e.g. a single '{' or '}'
        raise ValueError(
            f"template {stem!r} is malformed ({error}); write literal braces as {{{{ }}}}"
        ) from None
    fields = [field for _, field, _, _ in parsed if field is not None]
    odd = sorted({f for f in fields if not f.isidentifier()})
    if odd:
        raise ValueError(f"template {stem!r} has placeholders that are not names: {odd}")
    if any(spec or conversion for _, field, spec, conversion in parsed if field is not None):
        raise ValueError(f"template {stem!r}: placeholders take no format spec or conversion")
    required = TEMPLATE_FIELDS[kind]
    missing = sorted(required - set(fields))
    if missing:
        raise ValueError(
            f"{kind} template {stem!r} is missing placeholder(s) "
            + ", ".join("{" + f + "}" for f in missing)
        )
    unknown = sorted(set(fields) - required)
    if unknown:
        raise ValueError(
            f"{kind} template {stem!r} has unknown placeholder(s) "
            + ", ".join("{" + f + "}" for f in unknown)
            + f"; allowed: {', '.join(sorted(required))}"
        )
    if parsed[-1][1] is not None or not parsed[-1][0].strip():
        raise ValueError(
            f"template {stem!r} ends with a placeholder; it must end with the cue after "
            "which the answer token is due (e.g. 'Verdict: [[')"
        )
    if kind == "rationale":
        if fields.count("rationale") != 1 or fields[-1] != "rationale":
            raise ValueError(
                f"rationale template {stem!r} must hold {{rationale}} once, after every "
                "other placeholder (the rationale is generated there, the verdict follows)"
            )
    return Template(stem, kind, text, content_id("template", text))


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
    model: str | None = Field(
        None, description="optional, for older configs: the pool decides the model; if given it must "
        "name the pool's model. The annotate step sets it to the pool's model identity"
    )
    template: str = Field("pairwise_v3", description="pairwise template (name or .txt path)")
    rubric_template: str = Field("rubric_v1", description="rubric template (name or .txt path)")
    rationale_template: str = Field(
        "rationale_v2", description="template for rationale (MEC) mode (name or .txt path)"
    )


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
    rationale_k: int = Field(0, ge=0, description="MEC: rationales per order; 0 = off")
    rationale_temperature: float = Field(1.0, ge=0.0)
    rationale_max_tokens: int = Field(64, ge=1)
    exclude_truncated: bool = Field(
        False, description="leave responses cut at the token limit out of judging"
    )
    max_prompt_chars: int | None = Field(2000, ge=1, description="longer prompts are cut")
    max_response_chars: int | None = Field(1500, ge=1, description="longer responses are cut")
    batch_size: int = Field(64, ge=2, description="requests per engine call")
    calibration_pairs: int | None = Field(
        None, ge=1, description="gold pairs judged for calibration (the first N); None = all (42)"
    )

    @model_validator(mode="after")
    def _check(self) -> AnnotateParams:
        names = [j.name for j in self.judges]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"judge names must be unique; repeated: {', '.join(repeated)}")
        resolve_criteria(self.criteria, self.custom_criteria)
        resolve_rubrics(self.rubric_aspects, self.custom_rubrics)
        for judge in self.judges:
            load_template(judge.template, "pairwise")
            if self.rubric_aspects:
                load_template(judge.rubric_template, "rubric")
            if self.rationale_k:
                load_template(judge.rationale_template, "rationale")
        return self


def check_judge_pools(judges: Iterable[JudgeSpec], known_pools: Iterable[str]) -> None:
    """Raise naming the judge and pool when a judge's pool is not configured."""
    known = sorted(set(known_pools))
    for judge in judges:
        if judge.pool not in known:
            raise ValueError(
                f"judge {judge.name!r} names pool {judge.pool!r}, which is not configured; "
                f"configured pools: {', '.join(known) or '(none)'}"
            )


def judge_template_hashes(judge: JudgeSpec, params: AnnotateParams, verdicts_only: bool = False) -> dict[str, str]:
    """The hashes of the templates ``judge`` uses under ``params`` (kind -> hash), read from
    the files now: they enter the unit keys, so a template edited in place is judged again.
    ``verdicts_only``: the verdict's template alone, pairwise or rationale (calibration's)."""
    used = {"rationale": judge.rationale_template} if params.rationale_k else {"pairwise": judge.template}
    if params.rubric_aspects and not verdicts_only:
        used["rubric"] = judge.rubric_template
    return {kind: load_template(name, kind).hash for kind, name in used.items()}


# ---------------------------------------------------------------------- scheduling


def _usable(responses: pl.DataFrame, exclude_truncated: bool) -> pl.DataFrame:
    """Responses a judge can read: not failed, with non-blank text."""
    ok = pl.col("text").is_not_null() & (pl.col("text").str.strip_chars().str.len_chars() > 0)
    if "finish_reason" in responses.columns:
        ok = ok & (pl.col("finish_reason").fill_null("error") != "error")
    if exclude_truncated and "truncated" in responses.columns:
        ok = ok & ~pl.col("truncated").fill_null(False)
    return responses.filter(ok)


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {', '.join(missing)}")


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
    _require(responses, ["response_id", "prompt_id", "text"], "responses")
    totals = responses.group_by("prompt_id").agg(pl.len().alias("total"))
    usable = (
        _usable(responses, exclude_truncated).group_by("prompt_id").agg(pl.len().alias("usable"))
    )
    counts = totals.join(usable, on="prompt_id", how="left")
    if prompts is not None:
        _require(prompts, ["prompt_id"], "prompts")
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
    _require(responses, ["response_id", "prompt_id", "text"], "responses")
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


def _valid_probs(probs: Sequence[float], n_options: int) -> np.ndarray | None:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.shape != (n_options,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        return None
    total = arr.sum()
    return arr / total if total > 0 else None


def score_options(
    engine: Engine,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Option probabilities for each prompt: ``(len(prompts), len(options))``, NaN rows on error.

    Consecutive prompts stay in one engine batch in pairs (``batch_size`` is rounded down
    to even), so the two orders of a pair, sent adjacent, are scored together.
    """
    step = max(2, batch_size - batch_size % 2)
    options = tuple(options)
    probs = np.full((len(prompts), len(options)), np.nan)
    errors: list[str | None] = [None] * len(prompts)
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        scores = engine.score_choices([ChoiceRequest(p, options) for p in chunk])
        if len(scores) != len(chunk):
            raise RuntimeError(
                f"engine {engine.model!r} answered {len(scores)} of {len(chunk)} requests"
            )
        for offset, score in enumerate(scores):
            if score.error:
                errors[start + offset] = score.error
                continue
            valid = _valid_probs(score.probs, len(options))
            if valid is None:
                errors[start + offset] = f"no valid probability over {options}: {score.probs}"
            else:
                probs[start + offset] = valid
        if progress is not None:
            progress(min(start + step, len(prompts)), len(prompts))
    return probs, errors


def _order_frames(jobs: pl.DataFrame) -> pl.DataFrame:
    """Both orders of each job, interleaved (ab, ba, ab, ba, ...), as template fields."""
    ab = jobs.select(
        pl.col("job").cast(pl.Int64),
        pl.lit(0).cast(pl.Int8).alias("order"),
        "prompt",
        pl.col("text_a").alias("response_first"),
        pl.col("text_b").alias("response_second"),
        "criterion_description",
    )
    ba = ab.with_columns(
        pl.lit(1).cast(pl.Int8).alias("order"),
        pl.col("response_second").alias("response_first"),
        pl.col("response_first").alias("response_second"),
    )
    return pl.concat([ab, ba]).sort("job", "order")


def _p_first_probability(
    jobs: pl.DataFrame, template: Template, engine: Engine, batch_size: int, progress
) -> tuple[np.ndarray, list[str | None], pl.DataFrame]:
    """P("A") per order row (ab, ba, ab, ...), errors, and the samples: (row, p) per verdict."""
    orders = _order_frames(jobs)
    probs, errors = score_options(
        engine, template.render_column(orders), PAIRWISE_OPTIONS,
        batch_size=batch_size, progress=progress,
    )
    samples = pl.DataFrame({"row": np.arange(orders.height), "p": probs[:, 0]})
    return probs[:, 0], errors, samples


#: a verdict sample within this distance of 0.5 is a tie for BPDE
BPDE_TIE_BAND = 0.1


def balanced_position_entropy(samples: pl.DataFrame, n_jobs: int, tie_band: float = BPDE_TIE_BAND) -> np.ndarray:
    """BPDE per job from its verdict samples: -sum p log p over win/tie/lose (natural log).

    ``samples`` holds (row, p): row ``2 * job`` is the A/B order, ``2 * job + 1`` the B/A
    order, ``p`` the sample's P(first shown is better). Each sample is turned toward
    response_a (B/A samples: 1 - p), then counted as a win (> 0.5 + band), a loss
    (< 0.5 - band) or a tie. NaN for a job without a valid sample.
    """
    outcomes = (
        samples.filter(pl.col("p").is_not_nan() & pl.col("p").is_not_null())
        .with_columns(
            (pl.col("row") // 2).alias("job"),
            pl.when(pl.col("row") % 2 == 0).then(pl.col("p")).otherwise(1.0 - pl.col("p")).alias("p_a"),
        )
        .with_columns(
            pl.when(pl.col("p_a") > 0.5 + tie_band).then(pl.lit("win"))
            .when(pl.col("p_a") < 0.5 - tie_band).then(pl.lit("lose"))
            .otherwise(pl.lit("tie")).alias("outcome")
        )
        .group_by("job", "outcome").len()
        .with_columns((pl.col("len") / pl.col("len").sum().over("job")).alias("share"))
        .group_by("job")
        .agg((-(pl.col("share") * pl.col("share").log())).sum().alias("bpde"))
    )
    entropy = np.full(n_jobs, np.nan)
    entropy[outcomes["job"].to_numpy()] = outcomes["bpde"].to_numpy()
    return entropy


def _p_first_rationale(
    jobs: pl.DataFrame,
    template: Template,
    engine: Engine,
    params: AnnotateParams,
    progress,
) -> tuple[np.ndarray, list[str | None], pl.DataFrame]:
    """MEC: k rationales per order, the verdict probability after each, averaged.

    Also returns every verdict sample as (row, p), for BPDE.
    """
    orders = _order_frames(jobs)
    k = params.rationale_k
    sampling = SamplingParams(
        n=k,
        temperature=params.rationale_temperature,
        top_p=1.0,
        max_tokens=params.rationale_max_tokens,
        stop=RATIONALE_STOP,
    )
    gen_prompts = template.render_column(orders, stop_before="rationale")
    rationales: list[list[str]] = []
    gen_errors: list[str | None] = []
    total_steps = len(gen_prompts) * 2
    step = max(2, params.batch_size - params.batch_size % 2)
    for start in range(0, len(gen_prompts), step):
        chunk = gen_prompts[start : start + step]
        results = engine.generate([GenerateRequest(p, None, sampling, chat=False) for p in chunk])
        for result in results:
            # a blank sample carries no evidence: it is not one of the k valid samples
            texts = [] if result.error else [c.text.strip() for c in result.completions if c.text.strip()]
            rationales.append(texts)
            gen_errors.append(result.error or (None if texts else "no rationale generated"))
        if progress is not None:
            progress(min(start + step, len(gen_prompts)), total_steps)
    expanded = (
        orders.with_row_index("row")
        .with_columns(pl.Series("rationale", rationales, dtype=pl.List(pl.String)))
        .explode("rationale")
        .filter(pl.col("rationale").is_not_null())
    )

    def verdict_progress(done: int, total: int) -> None:
        # the second half of the work: verdicts, reported on the same 0..2N scale
        if progress is not None:
            progress(len(gen_prompts) + done * len(gen_prompts) // max(total, 1), total_steps)

    verdict_probs, verdict_errors = score_options(
        engine,
        template.render_column(expanded),
        PAIRWISE_OPTIONS,
        batch_size=params.batch_size,
        progress=verdict_progress,
    )
    per_row = (
        expanded.select("row")
        .with_columns(pl.Series("p", verdict_probs[:, 0]).fill_nan(None))
        .group_by("row")
        .agg(pl.col("p").mean().alias("p"), pl.col("p").is_not_null().sum().alias("valid"))
    )
    p_first = np.full(orders.height, np.nan)
    rows = per_row["row"].to_numpy()
    means = per_row["p"].to_numpy().astype(np.float64)
    p_first[rows] = np.where(per_row["valid"].to_numpy() > 0, means, np.nan)
    first_error: dict[int, str] = {}
    for row, error in zip(expanded["row"].to_list(), verdict_errors):
        if error and row not in first_error:
            first_error[row] = error
    errors = [
        gen_errors[r] or (first_error.get(r) if np.isnan(p_first[r]) else None)
        for r in range(orders.height)
    ]
    samples = pl.DataFrame({"row": expanded["row"].to_numpy(), "p": verdict_probs[:, 0]})
    return p_first, errors, samples


def _join_errors(first: str | None, second: str | None) -> str | None:
    parts = [f"{label}: {e}" for label, e in (("ab", first), ("ba", second)) if e]
    return "; ".join(parts) or None


def _pair_jobs(
    pairs: pl.DataFrame,
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    criteria: Mapping[str, str],
    params: AnnotateParams,
) -> pl.DataFrame:
    _require(pairs, ["prompt_id", "response_a", "response_b"], "pairs")
    _require(responses, ["response_id", "text"], "responses")
    _require(prompts, ["prompt_id", "prompt"], "prompts")
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


def judgment_id(
    prompt_id: str, response_a: str, response_b: str, judge: str, judge_model: str,
    criterion: str, criterion_description: str, template_hash: str, mode: dict,
) -> str:
    return content_id(
        "judgment", prompt_id, response_a, response_b, judge, judge_model,
        criterion, criterion_description, template_hash, mode,
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

    Both orders of every (pair, criterion) go to the engine in one ``score_choices``
    batch; judgments whose id is in ``existing_ids`` are not asked again.
    """
    params = params or AnnotateParams(judges=[judge], rubric_aspects=[])
    criteria = resolve_criteria(params.criteria, params.custom_criteria)
    rationale = params.rationale_k > 0
    template = (
        load_template(judge.rationale_template, "rationale")
        if rationale
        else load_template(judge.template, "pairwise")
    )
    mode_name = "rationale" if rationale else "probability"
    mode: dict = {"mode": mode_name}
    if rationale:
        mode |= {
            "k": params.rationale_k,
            "temperature": params.rationale_temperature,
            "max_tokens": params.rationale_max_tokens,
        }
    jobs = _pair_jobs(pairs, responses, prompts, criteria, params)
    ids = [
        judgment_id(p, a, b, judge.name, engine.model, c, d, template.hash, mode)
        for p, a, b, c, d in jobs.select(
            "prompt_id", "response_a", "response_b", "criterion", "criterion_description"
        ).iter_rows()
    ]
    jobs = _drop_existing(
        jobs.with_columns(pl.Series("judgment_id", ids, dtype=pl.String)),
        "judgment_id",
        existing_ids,
    ).with_row_index("job")
    if jobs.is_empty():
        return pl.DataFrame(schema=JUDGMENT_COLUMNS)
    if rationale:
        p_first, errors, samples = _p_first_rationale(jobs, template, engine, params, progress)
    else:
        p_first, errors, samples = _p_first_probability(jobs, template, engine, params.batch_size, progress)
    p_ab, p_ba = p_first[0::2], p_first[1::2]
    bpde = balanced_position_entropy(samples, jobs.height)
    valid = np.isfinite(p_ab) & np.isfinite(p_ba)
    p_a = np.where(valid, (p_ab + 1.0 - p_ba) / 2.0, np.nan)
    error = [_join_errors(e1, e2) for e1, e2 in zip(errors[0::2], errors[1::2])]
    out = jobs.select(
        "judgment_id",
        "prompt_id",
        "response_a",
        "response_b",
        pl.lit(judge.name).alias("judge"),
        pl.lit(engine.model).alias("judge_model"),
        "criterion",
        pl.lit(template.name).alias("template"),
        pl.lit(template.hash).alias("template_hash"),
        pl.lit(mode_name).alias("mode"),
    ).with_columns(
        pl.Series("p_first_ab", p_ab).fill_nan(None),
        pl.Series("p_first_ba", p_ba).fill_nan(None),
        pl.Series("p_a", p_a).fill_nan(None),
        pl.Series("bpde", np.where(valid, bpde, np.nan)).fill_nan(None),
        pl.Series("valid", valid),
        pl.Series("error", error, dtype=pl.String),
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
    is ``sum s * p(s)``.
    """
    params = params or AnnotateParams(judges=[judge])
    rubrics = resolve_rubrics(params.rubric_aspects, params.custom_rubrics)
    if not rubrics:
        return pl.DataFrame(schema=RATING_COLUMNS)
    _require(responses, ["response_id", "prompt_id", "text"], "responses")
    _require(prompts, ["prompt_id", "prompt"], "prompts")
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
    ids = [
        content_id("rating", r, judge.name, engine.model, a, definitions[a], template.hash)
        for r, a in jobs.select("response_id", "aspect").iter_rows()
    ]
    jobs = _drop_existing(
        jobs.with_columns(pl.Series("rating_id", ids, dtype=pl.String)), "rating_id", existing_ids
    )
    if jobs.is_empty():
        return pl.DataFrame(schema=RATING_COLUMNS)
    probs, errors = score_options(
        engine, template.render_column(jobs), SCORE_OPTIONS,
        batch_size=params.batch_size, progress=progress,
    )
    valid = np.all(np.isfinite(probs), axis=1)
    expected = np.where(valid, np.nan_to_num(probs) @ _SCORE_VALUES, np.nan)
    prob_lists = [row.tolist() if ok else None for row, ok in zip(probs, valid)]
    out = jobs.select(
        "rating_id",
        "prompt_id",
        "response_id",
        pl.lit(judge.name).alias("judge"),
        pl.lit(engine.model).alias("judge_model"),
        "aspect",
        pl.lit(template.hash).alias("template_hash"),
    ).with_columns(
        pl.Series("probs", prob_lists, dtype=pl.List(pl.Float64)),
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
    _require(gold, needed, f"gold pairs ({source})")
    bad = gold.with_row_index("line", offset=1).filter(
        ~pl.col("winner").is_in(["A", "B"]) | pl.any_horizontal(pl.col(needed).is_null())
    )
    if bad.height:
        raise ValueError(
            f"gold pairs {source}: line(s) {bad['line'].to_list()[:10]} need every field and "
            'winner "A" or "B"'
        )
    return gold.select(needed + (["why"] if "why" in gold.columns else []))


def calibration_metrics(
    p_first_ab: np.ndarray, p_first_ba: np.ndarray, gold_a_wins: np.ndarray
) -> dict[str, float | int]:
    """Accuracy, position-flip rate and first-position preference over valid gold pairs.

    ``p_first_ab`` = P("A") with the gold pair's response_a shown first, ``p_first_ba`` =
    P("A") with response_b shown first; ``gold_a_wins`` = the human picked response_a.
    """
    ab = np.asarray(p_first_ab, dtype=np.float64)
    ba = np.asarray(p_first_ba, dtype=np.float64)
    gold = np.asarray(gold_a_wins, dtype=bool)
    ok = np.isfinite(ab) & np.isfinite(ba)
    ab, ba, gold = ab[ok], ba[ok], gold[ok]
    if ab.size == 0:
        return {"gold_pairs": 0, "accuracy": math.nan, "position_flip_rate": math.nan,
                "first_position_pref": math.nan}
    p_a = (ab + 1.0 - ba) / 2.0
    # a tie (within rounding: 0.9 + 1 - 0.9 is not exactly 1) picks nobody: wrong
    margin = np.where(np.abs(p_a - 0.5) <= _TIE_TOLERANCE, 0.0, p_a - 0.5)
    correct = np.where(gold, margin > 0, margin < 0)
    same_position_wins = (ab > 0.5) == (ba > 0.5)
    return {
        "gold_pairs": int(ab.size),
        "accuracy": float(correct.mean()),
        "position_flip_rate": float(same_position_wins.mean()),
        "first_position_pref": float(np.concatenate([ab, ba]).mean()),
    }


def calibrate_judge(
    gold: pl.DataFrame,
    judge: JudgeSpec,
    engine: Engine,
    params: AnnotateParams | None = None,
    *,
    criterion: str = "overall",
) -> pl.DataFrame:
    """One JUDGE_CALIBRATION row for ``judge`` on the gold pairs (both orders each).

    ``gold_pairs`` counts the pairs with a valid verdict in both orders; the metrics are
    null when there are none.
    """
    params = params or AnnotateParams(judges=[judge], rubric_aspects=[])
    description = resolve_criteria([criterion], params.custom_criteria)[criterion]
    _require(gold, ["id", "prompt", "response_a", "response_b", "winner"], "gold")
    rationale = params.rationale_k > 0
    template = (
        load_template(judge.rationale_template, "rationale")
        if rationale
        else load_template(judge.template, "pairwise")
    )
    jobs = gold.with_row_index("job").select(
        "job",
        _cut("prompt", params.max_prompt_chars).alias("prompt"),
        _cut("response_a", params.max_response_chars).alias("text_a"),
        _cut("response_b", params.max_response_chars).alias("text_b"),
        pl.lit(description).alias("criterion_description"),
    )
    if rationale:
        p_first, _, _ = _p_first_rationale(jobs, template, engine, params, None)
    else:
        p_first, _, _ = _p_first_probability(jobs, template, engine, params.batch_size, None)
    metrics = calibration_metrics(
        p_first[0::2], p_first[1::2], (gold["winner"] == "A").to_numpy()
    )
    row = {
        "judge": judge.name,
        "judge_model": engine.model,
        "template_hash": template.hash,
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
