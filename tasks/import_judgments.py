"""Import judgments made elsewhere (API judges, human labels, another tool's output).

``prefcurate import judgments FILE -d DIR`` reads JSONL, JSON (an array of objects),
Parquet or CSV and writes prompts, responses, judgments and ratings into the dataset, so
that ``prefcurate run filter|score|select|export`` curate them like judgments prefcurate
made itself. Nothing needs code: a field mapping (``--map``/``--const``/``--value`` flags,
or a YAML file, see :class:`ImportMapping` and ``examples/import_pandalm.yaml``) says which
source field holds what.

Schema (the native field names; a mapping renames source fields onto them)
--------------------------------------------------------------------------
One record = one judge's judgment of one pair of responses to one prompt.

==================== ======== ===========================================================
field                required meaning
==================== ======== ===========================================================
prompt               yes      the user prompt (normalised as ``ingest`` does: same prompt_id)
system_prompt        no       system prompt
response_1           yes      text of the response shown first in order 12
response_2           yes      text of the other response
response_1_id, _2_id no       the responses' ids in the source (kept in ``responses.sampling``)
response_1_model,    no       the models that wrote them (``responses.generator``/``model``;
response_2_model              default "imported"/"unknown")
id                   no       the record's own id (``prompts.source_id``)
judge                yes      judge name (e.g. gpt-4o-mini, annotator1)
judge_model          no       the judge's model (default: the judge name)
criterion            no       what was judged (default ``overall``)
sample_index         no       integer >= 0: several samples per order (MEC); default 0
verdict_12           one of   order 12 (response_1 shown first, as "A"): ``A``, ``B`` or
                     these    ``tie`` (case-insensitive), A/B naming *positions*
p_12                 per      order 12: probability that A (response_1) is better, in [0, 1]
score_12_a, _12_b    order    order 12: the scores of A and B on the declared score scale
verdict_21, p_21,    no       the second order (response_2 shown first, so "A" = response_2);
score_21_a, _21_b             optional: a record with one order is a single-order judgment
rating_1, rating_2   no       per-response ratings on the declared rating scale
==================== ======== ===========================================================

A record needs a verdict in at least one order, given in exactly one form per order. Scores
need ``score_scale`` (LO, HI) and ratings ``rating_scale``; a pair of scores becomes
``P(A better) = 0.5 + (score_a - score_b) / (2 (HI - LO))``, a side A/B/tie becomes 1/0/0.5,
and ratings map linearly onto the rubric scale 1-5 the filter's rating check uses.

What lands in the store
-----------------------
- Judgment ids hash (prompt, pair, judge, judge model, criterion, sample index, and the
  record's ``id`` when one is mapped): without ids, a judge's second record of the same pair
  and sample is a duplicate; with ids, distinct records stay distinct judgments (the filter
  averages a judge's judgments of a pair). An empty response text is imported as it is
  (the export's integrity check drops empty completions); a missing one is quarantined.
- Response ids are content hashes of (prompt_id, text) and each pair is stored in the
  canonical order ``response_a < response_b``; when response_1 is the larger id the orders
  swap: order 12 (response_1 = b shown first) becomes ``p_first_ba`` and order 21 becomes
  ``p_first_ab`` (both are raw P("first shown is better")), so ``p_a`` always means
  P(response_a better). Both orders: ``p_a = (p_first_ab + 1 - p_first_ba) / 2``; one order:
  the other column stays null and ``p_a`` is that order's verdict (a single-order judgment).
- ``judgments.mode`` is ``imported``, ``template`` ``imported:<side|probability|scores>``,
  ``source_file``/``source_record`` the file and 1-based record (line, array element, row).
- Bad rows go to ``quarantine`` with the record, the native field and a reason code (the
  module constants); the rest are imported. ``records x judges = judgments + quarantined +
  duplicates``. Re-importing a file with the same mapping adds nothing (the unit is keyed
  by the files' bytes and the mapping), and rows whose ids are already stored are counted
  as duplicates, so overlapping files add only what is new.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
from prefcurate.tasks.ingest import (
    CONTROL_CHARACTER,
    CONTROL_CHARACTERS,
    _hash_ids,
    _normalise,
    _quarantine_frame,
    record_format,
)
from prefcurate.tasks.ingest import read_records as read_record_file
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefcurate.errors import InputError

# ---- the native schema ---------------------------------------------------------------------
ORDERS = ("12", "21")
TEXT_FIELDS = (
    "prompt", "system_prompt", "response_1", "response_2", "response_1_id", "response_2_id",
    "response_1_model", "response_2_model", "id", "judge", "judge_model", "criterion",
)
VERDICT_FIELDS = tuple(f"{kind}_{order}{side}" for order in ORDERS
                       for kind, side in (("verdict", ""), ("p", ""), ("score", "_a"), ("score", "_b")))
NATIVE_FIELDS = TEXT_FIELDS + ("sample_index",) + VERDICT_FIELDS + ("rating_1", "rating_2")
DEFAULT_CRITERION = "overall"
RUBRIC_SCALE = (1.0, 5.0)  # RATINGS.expected_score, what the filter's rating check compares

# ---- quarantine reason codes ---------------------------------------------------------------
MISSING_FIELD = "missing_field"  # a required field is absent or null
EMPTY_TEXT = "empty_text"  # prompt or judge empty after normalisation (an empty response is kept)
IDENTICAL_RESPONSES = "identical_responses"  # response_1 and response_2 are the same text
MISSING_VERDICT = "missing_verdict"  # no verdict in either order
AMBIGUOUS_VERDICT = "ambiguous_verdict"  # one order given in two forms (side and probability...)
INVALID_VERDICT = "invalid_verdict"  # a side that is not A, B or tie
NOT_A_NUMBER = "not_a_number"  # a probability, score, rating or sample index that is no number
OUT_OF_RANGE = "out_of_range"  # a probability outside [0, 1], a score outside the declared scale
MISSING_SCORE = "missing_score"  # one score of an order's pair without the other
UNREADABLE = "unreadable"  # reported by the reader: malformed JSON, invalid UTF-8...

_SIDES = {"a": 1.0, "b": 0.0, "tie": 0.5}


class JudgmentImportError(InputError):
    """The whole input is unusable (missing file, unknown format, no such field...)."""


class JudgeOverlay(BaseModel):
    """One judge's part of a wide record (several judges' verdicts side by side): its
    fields, constants and value maps are laid over the mapping's, one long row per judge."""

    model_config = ConfigDict(extra="forbid")
    fields: dict[str, str] = Field(default_factory=dict)
    constants: dict[str, str | int | float] = Field(default_factory=dict)
    values: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("values", mode="before")
    @classmethod
    def _keys_as_text(cls, value):
        # YAML reads `1: A` with an integer key; source values are compared as text
        if isinstance(value, dict):
            return {k: {str(a): str(b) for a, b in (v or {}).items()} for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _known_fields(self):
        for name in [*self.fields, *self.constants, *self.values]:
            if name not in NATIVE_FIELDS:
                raise ValueError(f"{name!r} is not a field of the import schema; known: {', '.join(NATIVE_FIELDS)}")
        return self


class JoinFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="path; relative paths are relative to the imported file's folder")
    key: str = Field(description="field present in both files (`on` would read as true in YAML)")


class ImportMapping(JudgeOverlay):
    """How a source file maps onto the import schema.

    ``fields``: native field -> source field, or a template such as ``"{instruction}\\n\\n{input}"``
    (missing parts read as empty). Unmapped native fields are read from a source field of
    the same name when there is one. ``constants``: native field -> fixed value (e.g. the
    judge's name). ``values``: native field -> {source value: native value}, e.g. ``{"1": A,
    "2": B, "0": tie}``; values not listed pass unchanged (and fail validation if invalid).
    ``judges``: one overlay per judge of a wide record. ``join``: files whose fields join
    the main file's records on a key.
    """

    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    judges: list[JudgeOverlay] | None = None
    join: list[JoinFile] = Field(default_factory=list)
    score_scale: tuple[float, float] | None = None
    rating_scale: tuple[float, float] | None = None

    @field_validator("score_scale", "rating_scale")
    @classmethod
    def _increasing(cls, value):
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"a scale is (LO, HI) with LO < HI, got {value}")
        return value


def load_mapping(path: str | Path | None, overrides: dict | None = None) -> ImportMapping:
    """A mapping from YAML (or none) with CLI overrides laid over it."""
    import yaml

    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise JudgmentImportError(f"cannot read the mapping {path}: {error}") from error
        if not isinstance(data, dict):
            raise JudgmentImportError(f"the mapping {path} must be a YAML mapping")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            merged = dict(data.get(key) or {})
            for inner, inner_value in value.items():
                if isinstance(inner_value, dict):
                    merged[inner] = {**(merged.get(inner) or {}), **inner_value}
                else:
                    merged[inner] = inner_value
            data[key] = merged
        elif value is not None:
            data[key] = value
    try:
        return ImportMapping.model_validate(data)
    except ValueError as error:
        raise JudgmentImportError(f"invalid import mapping{f' {path}' if path else ''}: {error}") from error


# ---- reading -------------------------------------------------------------------------------
def detect_format(path: Path, declared: str = "auto") -> str:
    if not path.exists():
        raise JudgmentImportError(f"input file {path} does not exist")
    if path.is_dir():
        raise JudgmentImportError(f"input {path} is a directory; give a .jsonl, .json, .parquet or .csv file")
    if declared != "auto":
        return declared
    fmt = record_format(path)
    if fmt is not None:
        return fmt
    raise JudgmentImportError(f"cannot tell the format of {path.name} from its suffix; "
                              "pass --format jsonl|json|parquet|csv")


def read_records(path: Path, fmt: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(records with a 1-based ``source_record``, unreadable records as quarantine rows with
    reason ``unreadable``, the reader's cause in the message)."""
    records, unreadable = read_record_file(path, fmt)
    return records, unreadable.with_columns(pl.lit(UNREADABLE).alias("reason"))


def _as_text(frame: pl.DataFrame, name: str) -> pl.Expr:
    dtype = frame.schema[name]
    if dtype.is_nested():
        return pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.strip_suffix("}")
    return pl.col(name).cast(pl.String)


def _source_expr(records: pl.DataFrame, source: str) -> pl.Expr:
    """A source field, or a template of fields (``{a} and {b}``), as text."""
    if "{" not in source:
        return _as_text(records, source) if source in records.columns else pl.lit(None, dtype=pl.String)
    parts: list[pl.Expr] = []
    for literal, name, _, _ in string.Formatter().parse(source):
        if literal:
            parts.append(pl.lit(literal))
        if name is not None:
            if name not in records.columns:
                raise JudgmentImportError(f"the template {source!r} names {name!r}, which no record has")
            parts.append(_as_text(records, name).fill_null(""))
    return pl.concat_str(parts) if parts else pl.lit("")


def to_long(records: pl.DataFrame, mapping: ImportMapping) -> pl.DataFrame:
    """One row per (record, judge) with every native field as text, plus ``source_record``."""
    overlays = mapping.judges or [JudgeOverlay()]
    for overlay in [mapping, *overlays]:
        for native, source in overlay.fields.items():
            if "{" not in source and records.height and source not in records.columns:
                raise JudgmentImportError(
                    f"fields.{native}: no record has the field {source!r}; fields found: "
                    f"{sorted(c for c in records.columns if c != 'source_record')[:30]}")
    parts = []
    for index, overlay in enumerate(overlays):
        fields = {**mapping.fields, **overlay.fields}
        constants = {**mapping.constants, **overlay.constants}
        values = {**mapping.values, **overlay.values}
        columns = [pl.col("source_record"), pl.lit(index, dtype=pl.Int32).alias("_judge_slot")]
        for native in NATIVE_FIELDS:
            if native in constants:
                expr = pl.lit(str(constants[native]), dtype=pl.String)
            else:
                expr = _source_expr(records, fields.get(native, native))
            if native in values:
                expr = expr.replace(values[native])
            columns.append(expr.alias(native))
        parts.append(records.select(columns))
    return pl.concat(parts).sort("source_record", "_judge_slot")


# ---- validation and conversion ---------------------------------------------------------------
def _number(name: str) -> pl.Expr:
    return pl.col(name).str.strip_chars().cast(pl.Float64, strict=False)


def _given(name: str) -> pl.Expr:
    return pl.col(name).is_not_null() & (pl.col(name).str.strip_chars() != "")


def _bad_number(name: str) -> pl.Expr:
    return _given(name) & (_number(name).is_null() | _number(name).is_nan() | _number(name).is_infinite())


def _checks(mapping: ImportMapping) -> list[tuple[str, str, pl.Expr, pl.Expr]]:
    """(reason, native field, failing condition, message) in the order they are tried."""
    checks: list[tuple[str, str, pl.Expr, pl.Expr]] = []

    def add(reason: str, field: str, condition: pl.Expr, message: str | pl.Expr) -> None:
        checks.append((reason, field, condition, message if isinstance(message, pl.Expr) else pl.lit(message)))

    def shown(name: str) -> pl.Expr:
        return pl.lit(f"{name} '") + pl.col(name).str.slice(0, 60) + pl.lit("'")

    for name in ("prompt", "response_1", "response_2", "judge"):
        add(MISSING_FIELD, name, pl.col(name).is_null(), f"{name} is missing")
    add(EMPTY_TEXT, "prompt", pl.col("_prompt") == "", "prompt is empty after normalisation")
    add(EMPTY_TEXT, "judge", pl.col("judge").str.strip_chars() == "", "judge is empty")
    # as ingest rejects them; the ids join these texts with U+001F, so one inside a text
    # could make two different prompts (or judges) share an id
    for name, text in (("prompt", "_prompt"), ("system_prompt", "_system"), ("judge", "judge"),
                       ("judge_model", "judge_model"), ("criterion", "criterion")):
        add(CONTROL_CHARACTER, name, pl.col(text).str.contains(CONTROL_CHARACTERS), f"{name} holds a control character")
    add(IDENTICAL_RESPONSES, "response_2", pl.col("response_1") == pl.col("response_2"),
        "response_1 and response_2 are the same text: there is nothing to prefer")
    for order in ORDERS:
        verdict, p, score_a, score_b = f"verdict_{order}", f"p_{order}", f"score_{order}_a", f"score_{order}_b"
        forms = (_given(verdict).cast(pl.Int32) + _given(p).cast(pl.Int32)
                 + (_given(score_a) | _given(score_b)).cast(pl.Int32))
        add(AMBIGUOUS_VERDICT, verdict, forms > 1,
            f"order {order} is given in more than one form (verdict_{order}, p_{order}, score_{order}_a/_b): give one")
        add(INVALID_VERDICT, verdict,
            _given(verdict) & ~pl.col(verdict).str.strip_chars().str.to_lowercase().is_in(list(_SIDES)),
            shown(verdict) + pl.lit(" is not A, B or tie"))
        add(NOT_A_NUMBER, p, _bad_number(p), shown(p) + pl.lit(" is not a number"))
        add(OUT_OF_RANGE, p, _given(p) & ((_number(p) < 0) | (_number(p) > 1)),
            shown(p) + pl.lit(" is not a probability in [0, 1]"))
        add(MISSING_SCORE, score_b, _given(score_a) & ~_given(score_b), f"{score_a} is given without {score_b}")
        add(MISSING_SCORE, score_a, _given(score_b) & ~_given(score_a), f"{score_b} is given without {score_a}")
        for name in (score_a, score_b):
            add(NOT_A_NUMBER, name, _bad_number(name), shown(name) + pl.lit(" is not a number"))
            if mapping.score_scale:
                low, high = mapping.score_scale
                add(OUT_OF_RANGE, name, _given(name) & ((_number(name) < low) | (_number(name) > high)),
                    shown(name) + pl.lit(f" is outside the score scale [{low:g}, {high:g}]"))
    add(MISSING_VERDICT, "verdict_12",
        ~pl.any_horizontal([_given(f"{kind}_{order}{side}") for order in ORDERS
                            for kind, side in (("verdict", ""), ("p", ""), ("score", "_a"))]),
        "no verdict in either order (verdict_12, p_12, score_12_a/_b, or the same for order 21)")
    add(NOT_A_NUMBER, "sample_index",
        _given("sample_index") & (_number("sample_index").is_null() | (_number("sample_index") < 0)
                                  | (_number("sample_index") != _number("sample_index").floor())),
        shown("sample_index") + pl.lit(" is not an integer >= 0"))
    for name in ("rating_1", "rating_2"):
        add(NOT_A_NUMBER, name, _bad_number(name), shown(name) + pl.lit(" is not a number"))
        if mapping.rating_scale:
            low, high = mapping.rating_scale
            add(OUT_OF_RANGE, name, _given(name) & ((_number(name) < low) | (_number(name) > high)),
                shown(name) + pl.lit(f" is outside the rating scale [{low:g}, {high:g}]"))
    return checks


def _order_probability(order: str, score_scale: tuple[float, float] | None) -> tuple[pl.Expr, pl.Expr]:
    """(P("A" = the first shown is better) of one order, the form it was given in)."""
    side = pl.col(f"verdict_{order}").str.strip_chars().str.to_lowercase().replace_strict(
        _SIDES, default=None, return_dtype=pl.Float64)
    probability = pl.when(_given(f"verdict_{order}")).then(side)
    kind = pl.when(_given(f"verdict_{order}")).then(pl.lit("side"))
    probability = probability.when(_given(f"p_{order}")).then(_number(f"p_{order}"))
    kind = kind.when(_given(f"p_{order}")).then(pl.lit("probability"))
    if score_scale is not None:
        width = score_scale[1] - score_scale[0]
        from_scores = (0.5 + (_number(f"score_{order}_a") - _number(f"score_{order}_b")) / (2 * width)).clip(0.0, 1.0)
        probability = probability.when(_given(f"score_{order}_a")).then(from_scores)
        kind = kind.when(_given(f"score_{order}_a")).then(pl.lit("scores"))
    return probability.otherwise(None), kind.otherwise(None)


def _ids(*parts: pl.Expr) -> pl.Expr:
    return pl.concat_str([p.cast(pl.String).fill_null("") for p in parts], separator="\x1f")


@dataclass
class ImportResult:
    prompts: pl.DataFrame
    responses: pl.DataFrame
    judgments: pl.DataFrame
    ratings: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict


#: (table, ids) -> those of the ids the dataset's table already holds
StoredIds = Callable[[str, pl.Series], pl.Series]


def import_frame(records: pl.DataFrame, mapping: ImportMapping, source: str, source_hash: str,
                 stored: StoredIds | None = None) -> ImportResult:
    """Validate, convert and de-duplicate the records of one file (see the module docstring).

    ``stored``: which of this file's ids the dataset already holds, asked per table
    (``prompts``, ``responses``, ``judgments``, ``ratings``); those rows are left out of the
    result, and a judgment's counted as a duplicate.
    """
    long = to_long(records, mapping)
    for name, scale in (("score", mapping.score_scale), ("rating", mapping.rating_scale)):
        columns = [c for c in long.columns if c.startswith(f"{name}_")]
        if scale is None and long.height and long.select(pl.any_horizontal([_given(c) for c in columns]).any()).item():
            raise JudgmentImportError(f"{name}s are given ({', '.join(columns)}) but no {name} scale is declared: "
                               f"pass --{name}-scale LO,HI (or {name}_scale: [LO, HI] in the mapping)")
    for name in ("prompt", "response_1", "response_2", "judge"):
        if long.height and long[name].null_count() == long.height:  # a mapping error, not bad rows
            hint = "--const judge=NAME" if name == "judge" else f"--map {name}=SOURCE_FIELD"
            raise JudgmentImportError(f"no record has {name!r} (source field {mapping.fields.get(name, name)!r}); "
                                      f"map it: {hint}, or in the mapping file")
    long = long.with_columns(
        _normalise(long["prompt"].fill_null("")).alias("_prompt"),
        _normalise(long["system_prompt"].fill_null("")).alias("_system"),
    )
    checks = _checks(mapping)
    failed = pl.lit(None, dtype=pl.Int32)
    for index in reversed(range(len(checks))):  # the first failing check names the row
        failed = pl.when(checks[index][2].fill_null(False)).then(pl.lit(index, dtype=pl.Int32)).otherwise(failed)
    long = long.with_columns(failed.alias("_failed"))
    bad = long.filter(pl.col("_failed").is_not_null())
    good = long.filter(pl.col("_failed").is_null())
    quarantine = _quarantine_rows(bad, checks, records, source)

    # ---- ids, canonical order and the swap -----------------------------------------------
    good = good.with_columns(
        pl.when(pl.col("_system") == "").then(None).otherwise(pl.col("_system")).alias("system_prompt"),
        pl.col("_prompt").alias("prompt"),
        pl.col("judge").str.strip_chars(),
        pl.coalesce(pl.col("judge_model").str.strip_chars(), pl.col("judge").str.strip_chars()).alias("judge_model"),
        pl.coalesce(pl.col("criterion"), pl.lit(DEFAULT_CRITERION)).alias("criterion"),
        _number("sample_index").fill_null(0).cast(pl.Int32).alias("sample_index"),
    )
    good = good.with_columns(_hashed(good, _ids(pl.col("system_prompt"), pl.col("prompt")), "prompt_id"))
    good = good.with_columns(
        _hashed(good, _ids(pl.lit("response"), pl.col("prompt_id"), pl.col("response_1")), "_id_1"),
        _hashed(good, _ids(pl.lit("response"), pl.col("prompt_id"), pl.col("response_2")), "_id_2"),
    )
    p12, kind12 = _order_probability("12", mapping.score_scale)
    p21, kind21 = _order_probability("21", mapping.score_scale)
    swapped = pl.col("_id_1") > pl.col("_id_2")  # response_1 is the canonical b
    good = good.with_columns(p12.alias("_p12"), p21.alias("_p21"), kind12.alias("_k12"), kind21.alias("_k21"),
                             swapped.alias("_swapped"))
    good = good.with_columns(
        pl.when("_swapped").then("_id_2").otherwise("_id_1").alias("response_a"),
        pl.when("_swapped").then("_id_1").otherwise("_id_2").alias("response_b"),
        # order 12 shows response_1 first: it is the a-first order unless response_1 is b
        pl.when("_swapped").then("_p21").otherwise("_p12").alias("p_first_ab"),
        pl.when("_swapped").then("_p12").otherwise("_p21").alias("p_first_ba"),
    ).with_columns(
        pl.when(pl.col("p_first_ab").is_not_null() & pl.col("p_first_ba").is_not_null())
        .then((pl.col("p_first_ab") + 1.0 - pl.col("p_first_ba")) / 2.0)
        .when(pl.col("p_first_ab").is_not_null()).then(pl.col("p_first_ab"))
        .otherwise(1.0 - pl.col("p_first_ba")).alias("p_a"),
        _bpde(pl.col("p_first_ab"), 1.0 - pl.col("p_first_ba")).alias("bpde"),
        pl.concat_str([pl.lit("imported:"), pl.col("_k12").fill_null(pl.col("_k21")),
                       pl.when(pl.col("_k12").is_not_null() & pl.col("_k21").is_not_null()
                               & (pl.col("_k12") != pl.col("_k21")))
                       .then(pl.lit("/") + pl.col("_k21")).otherwise(pl.lit(""))]).alias("template"),
    )
    good = good.with_columns(
        _hashed(good, _ids(pl.lit("judgment"), pl.col("prompt_id"), pl.col("response_a"), pl.col("response_b"),
                           pl.col("judge"), pl.col("judge_model"), pl.col("criterion"), pl.col("sample_index"),
                           pl.col("id")),
                "judgment_id"),
    )
    judgments = good.select(
        "judgment_id", "prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion", "template",
        pl.lit(f"import-{source_hash[:12]}").alias("template_hash"), pl.lit("imported").alias("mode"),
        "p_first_ab", "p_first_ba", "p_a", "bpde", pl.lit(True).alias("valid"), pl.lit(None, pl.String).alias("error"),
        pl.lit(source).alias("source_file"), "source_record",
    )
    judgments, duplicates = _new_rows(judgments, "judgments", "judgment_id", stored)

    prompts = good.select(
        "prompt_id", "prompt", "system_prompt", pl.col("id").alias("source_id"), pl.lit(source).alias("source_file"),
        "source_record", pl.lit(None, pl.String).alias("category"), pl.lit(None, pl.String).alias("metadata"),
        pl.col("prompt").str.len_chars().cast(pl.Int32).alias("char_len"),
    )
    prompts, _ = _new_rows(prompts, "prompts", "prompt_id", stored)
    responses = pl.concat([_response_side(good, side, source) for side in ("1", "2")])
    responses = responses.sort("source_record", maintain_order=True).drop("source_record")
    responses, _ = _new_rows(responses, "responses", "response_id", stored)
    ratings = _ratings(good, mapping)
    ratings, _ = _new_rows(ratings, "ratings", "rating_id", stored)
    counts = {
        "records": records.height,
        "judgment_rows": long.height,
        "judgments": judgments.height,
        "quarantined": bad.height,
        "duplicates": duplicates,
        "single_order": int(judgments.select((pl.col("p_first_ab").is_null() | pl.col("p_first_ba").is_null()).sum())
                            .item()),
        "swapped": int(good.filter(pl.col("judgment_id").is_in(judgments["judgment_id"].implode()))["_swapped"].sum()),
        "prompts": prompts.height,
        "responses": responses.height,
        "ratings": ratings.height,
    }
    return ImportResult(prompts=prompts, responses=responses, judgments=judgments, ratings=ratings,
                        quarantine=quarantine, counts=counts)


def _hashed(frame: pl.DataFrame, key: pl.Expr, name: str) -> pl.Series:
    return _hash_ids(frame.select(key.alias("k"))["k"]).alias(name) if frame.height else pl.Series(name, [], pl.String)


def _bpde(p_a_first: pl.Expr, p_a_second: pl.Expr) -> pl.Expr:
    """Entropy of the win/tie/lose outcomes for ``a`` over the two orders (null with one):
    0 when both orders agree, ln 2 when they differ."""
    def outcome(p: pl.Expr) -> pl.Expr:
        return pl.when(p > 0.5).then(1).when(p < 0.5).then(-1).otherwise(0)

    both = p_a_first.is_not_null() & p_a_second.is_not_null()
    return pl.when(both).then(pl.when(outcome(p_a_first) == outcome(p_a_second)).then(0.0)
                              .otherwise(math.log(2))).otherwise(None)


def _new_rows(frame: pl.DataFrame, table: str, key: str, stored: StoredIds | None) -> tuple[pl.DataFrame, int]:
    """First row per id, without ids ``table`` already holds; and how many rows that removed."""
    before = frame.height
    frame = frame.unique(key, keep="first", maintain_order=True)
    if stored is not None and frame.height:
        frame = frame.filter(~pl.col(key).is_in(stored(table, frame[key]).implode()))
    return frame, before - frame.height


def _response_side(good: pl.DataFrame, side: str, source: str) -> pl.DataFrame:
    model = pl.col(f"response_{side}_model").str.strip_chars()
    return good.select(
        pl.col(f"_id_{side}").alias("response_id"), "prompt_id",
        pl.coalesce(model, pl.lit("imported")).alias("generator"),
        pl.coalesce(model, pl.lit("unknown")).alias("model"),
        pl.struct(pl.lit(source).alias("source_file"), "source_record",
                  pl.col(f"response_{side}_id").alias("source_id")).struct.json_encode().alias("sampling"),
        pl.lit(0, dtype=pl.Int32).alias("sample_index"),
        pl.col(f"response_{side}").alias("text"),
        pl.lit("stop").alias("finish_reason"), pl.lit(False).alias("truncated"),
        "source_record",
    )


def _ratings(good: pl.DataFrame, mapping: ImportMapping) -> pl.DataFrame:
    schema = {"rating_id": pl.String, "prompt_id": pl.String, "response_id": pl.String, "judge": pl.String,
              "judge_model": pl.String, "aspect": pl.String, "template_hash": pl.String,
              "expected_score": pl.Float64, "valid": pl.Boolean}
    if mapping.rating_scale is None:
        return pl.DataFrame(schema=schema)
    low, high = mapping.rating_scale
    parts = []
    for side in ("1", "2"):
        rated = good.filter(_given(f"rating_{side}"))
        if not rated.height:
            continue
        rated = rated.with_columns(
            _hashed(rated, _ids(pl.lit("rating"), pl.col("prompt_id"), pl.col(f"_id_{side}"), pl.col("judge"),
                                pl.col("judge_model"), pl.col("criterion")), "rating_id"))
        parts.append(rated.select(
            "rating_id", "prompt_id", pl.col(f"_id_{side}").alias("response_id"), "judge", "judge_model",
            pl.col("criterion").alias("aspect"), pl.lit("imported").alias("template_hash"),
            (RUBRIC_SCALE[0] + (RUBRIC_SCALE[1] - RUBRIC_SCALE[0]) * (_number(f"rating_{side}") - low) / (high - low))
            .alias("expected_score"),
            pl.lit(True).alias("valid"),
        ))
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _quarantine_rows(bad: pl.DataFrame, checks, records: pl.DataFrame, source: str) -> pl.DataFrame:
    if not bad.height:
        return _quarantine_frame([])
    reason = pl.col("_failed").replace_strict({i: c[0] for i, c in enumerate(checks)}, return_dtype=pl.String)
    field = pl.col("_failed").replace_strict({i: c[1] for i, c in enumerate(checks)}, return_dtype=pl.String)
    message = pl.lit(None, dtype=pl.String)
    for index in reversed(range(len(checks))):
        message = pl.when(pl.col("_failed") == index).then(checks[index][3]).otherwise(message)
    columns = [c for c in records.columns if c != "source_record"]
    raw = records.select("source_record", pl.struct(columns).struct.json_encode().alias("raw")) if columns \
        else records.select("source_record", pl.lit("{}").alias("raw"))
    judge = pl.when(pl.col("judge").is_not_null()).then(pl.lit(" (judge ") + pl.col("judge") + pl.lit(")")) \
        .otherwise(pl.lit(""))
    return bad.with_columns(message.alias("_message")).join(raw, on="source_record", how="left").select(
        pl.lit(source).alias("source_file"), "source_record", field.alias("field"), reason.alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": ") + pl.col("_message").fill_null("")
         + judge).alias("message"),
        "raw",
    )


def import_file(path: str | Path, mapping: ImportMapping, stored: StoredIds | None = None) -> ImportResult:
    """Read one file (and the files it joins) and import it; see :func:`import_frame`."""
    from prefcurate.schemas.ids import file_sha256

    path = Path(path).expanduser().resolve()
    records, unreadable = read_records(path, detect_format(path, mapping.format))
    hashes = [file_sha256(path)]
    for join in mapping.join:
        other_path = Path(join.file) if Path(join.file).is_absolute() else path.parent / join.file
        other, _ = read_records(other_path, detect_format(other_path))
        for frame, name in ((records, path.name), (other, other_path.name)):
            if frame.height and join.key not in frame.columns:
                raise JudgmentImportError(f"join.key: {name} has no field {join.key!r}")
        other = other.drop("source_record").with_columns(pl.col(join.key).cast(pl.String))
        if other[join.key].is_duplicated().any():
            raise JudgmentImportError(f"join: {other_path.name} has the key {join.key!r} more than once per value")
        records = records.with_columns(pl.col(join.key).cast(pl.String)).join(
            other, on=join.key, how="left", suffix=f"_{other_path.stem}")
        hashes.append(file_sha256(other_path))
    result = import_frame(records, mapping, str(path), "".join(hashes), stored)
    if unreadable.height:  # each unreadable record counts as one quarantined row
        result.quarantine = pl.concat([unreadable, result.quarantine], how="vertical_relaxed")
        for key in ("records", "judgment_rows", "quarantined"):
            result.counts[key] += unreadable.height
    return result
