"""Data contracts between stages, as Great Expectations suites.

Every table in :mod:`prefcurate.schemas.tables` gets one suite, derived from its Arrow schema
plus a few table-specific rules:

- schema: every payload column is present (extra columns are allowed; the store writes only
  the schema's columns). The four provenance columns are checked too when the frame carries
  all of them (frames read back from the store); task outputs do not, the store adds them.
- non-null for every ``nullable=False`` field, uniqueness of ``PRIMARY_KEYS[table]``;
- value rules from the column meanings in ``tables.py``: probabilities in [0, 1], rubric
  scores in [1, 5], the enumerations written in the schema comments, counts >= 0, canonical
  pair order (``response_a < response_b``), ``chosen_id != rejected_id``, JSON text parses.

One declaration, two engines. :func:`contract` lists a table's expectations in GX's terms
(type and arguments). :func:`validate_batch` builds the GX suite from it and runs GX;
:func:`check_batch` evaluates the same list as vectorised polars expressions with GX's
semantics (below) and gives the same :class:`ContractResult` row for row
(tests/unit/test_contract_engines.py runs both on good and bad frames of every table). The
per-unit gate uses :func:`check_batch`: GX costs ~0.15 s a batch and seconds to import in
every worker, the polars evaluation milliseconds.

:func:`validate_batch` runs a table's suite on a polars DataFrame or Arrow table and returns
a :class:`ContractResult` whose ``bad_row_mask`` marks the rows that violate row-level
expectations, so a gate can quarantine exactly those rows. Failures that cannot be pinned to
rows (a missing column, an expectation that raised) set ``batch_level_failure``: the gate then
quarantines the whole batch (``quarantine_mask`` is that choice, ready made).

Method choices
- Row attribution uses GX's own ``unexpected_index_list`` (``result_format="COMPLETE"``) on a
  pandas frame with a fresh ``RangeIndex``, so index labels are row positions.
- A duplicated primary key marks *every* copy (GX's semantics): the rows may differ in content
  and nothing says which copy is right, so none passes silently.
- ``chosen_id != rejected_id``: GX 1.x has no "column pair values differ" expectation.
  ``UnexpectedRowsExpectation`` (SQL) supports SQL and Spark sources only, not pandas, and is
  batch-level (no row indices). ``ExpectSelectColumnValuesToBeUniqueWithinRecord`` expresses
  it, but its pandas metric is ``DataFrame.nunique(axis=1)``, a per-row Python apply (~11 s
  for 100k rows here). So this module defines a small custom column-pair map expectation,
  :class:`ExpectColumnPairValuesToDiffer` (vectorised ``column_A != column_B``), which keeps
  row indices and costs ~0.1 s for 100k rows. Rows with a null side are skipped there; the
  non-null expectations own those.
- Nested columns (embedding vectors, rubric probability lists) reach GX as their lengths; see
  :func:`_to_pandas` for why. Only their nullness is part of the contract.
- Float comparisons are exact, except rubric expected scores, which get a 1e-9 slack because
  they are sums of ``s * p(s)`` over normalised probabilities and may round past 5.
- NaN counts as null (pandas semantics): a NaN in a non-nullable column fails non-null; a NaN
  in a nullable, range-checked column is skipped like a null.

Great Expectations is imported lazily (it takes seconds): importing this module is cheap,
the first :func:`validate_batch` call pays for GX (~4 s CPU), one ephemeral context and the
suite of that table; later calls reuse them (measured: ~0.4 s CPU for 100k ``pairs`` rows and
14 expectations, ~0.2 s for 100k embeddings, ~0.2 s for a 10-row batch: GX's fixed overhead).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from prefcurate.schemas.tables import PRIMARY_KEYS, PROVENANCE, TABLES
from prefcurate.tasks.checks import REASONS as FILTER_REASONS

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# GX reads this when a context is created; set before it is ever imported.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

#: how many offending values a failure carries as examples
N_EXAMPLES = 5

#: how many failures :func:`describe_failures` spells out
MAX_DESCRIBED = 6

#: slack on sums of ``s * p(s)`` (rounding can push a certain 5 to 5.000000000000001)
SCORE_SLACK = 1e-9

PROVENANCE_COLUMNS: tuple[str, ...] = tuple(f.name for f in PROVENANCE)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A table-specific value rule, independent of GX so it can be listed and tested cheaply.

    ``kind`` is one of ``between`` (``low <= column <= high``), ``one_of`` (value in
    ``values``), ``ordered`` (``columns[0] < columns[1]``), ``differ``
    (``columns[0] != columns[1]``), ``json`` (text parses as JSON). Nulls are skipped by every
    kind; the non-null expectations derived from the schema cover them.
    """

    kind: Literal["between", "one_of", "ordered", "differ", "json"]
    columns: tuple[str, ...]
    description: str
    low: float | None = None
    high: float | None = None
    values: tuple[str, ...] = ()


def _probability(*columns: str) -> list[Rule]:
    return [Rule("between", (c,), f"{c} is a probability in [0, 1]", 0.0, 1.0) for c in columns]


def _at_least(column: str, low: float, why: str) -> Rule:
    return Rule("between", (column,), f"{column} >= {low:g}: {why}", low=low)


def _one_of(column: str, *values: str) -> Rule:
    return Rule("one_of", (column,), f"{column} is one of {', '.join(values)}", values=values)


def _canonical_pair(first: str, second: str) -> Rule:
    return Rule("ordered", (first, second), f"{first} < {second} (canonical pair order)")


TABLE_RULES: dict[str, list[Rule]] = {
    "prompts": [
        _at_least("char_len", 1, "an empty prompt is not a prompt"),
        _at_least("source_record", 1, "record numbers are 1-based"),
        Rule("json", ("metadata",), "metadata is JSON text"),
    ],
    "responses": [
        _one_of("finish_reason", "stop", "length", "error"),
        _at_least("sample_index", 0, "sample indices are non-negative"),
        _at_least("tokens_in", 0, "token counts are non-negative"),
        _at_least("tokens_out", 0, "token counts are non-negative"),
        _at_least("latency_s", 0, "latencies are non-negative"),
        Rule("json", ("sampling",), "sampling parameters are JSON text"),
    ],
    "judgments": [
        *_probability("p_first_ab", "p_first_ba", "p_a"),
        Rule("between", ("bpde",), "bpde is an entropy over 3 outcomes, in [0, ln 3]", 0.0, math.log(3) + 1e-9),
        _one_of("mode", "probability", "rationale", "imported", "reward_model", "density_ratio"),
        _canonical_pair("response_a", "response_b"),
    ],
    "ratings": [
        Rule(
            "between",
            ("expected_score",),
            "expected_score is a rubric score in [1, 5]",
            1.0 - SCORE_SLACK,
            5.0 + SCORE_SLACK,
        ),
    ],
    "jury": [
        *_probability("p_a", "agreement"),
        _one_of("method", "mean", "majority", "weighted", "calibrated", "unsupervised", "human"),
        _at_least("n_judges", 1, "an aggregate needs at least one judge"),
        _canonical_pair("response_a", "response_b"),
    ],
    "judge_calibration": [
        *_probability("accuracy", "position_flip_rate", "first_position_pref"),
        _at_least("gold_pairs", 0, "counts are non-negative"),
    ],
    "judge_accuracy": [
        *_probability("accuracy", "accuracy_low", "accuracy_high", "flip_rate", "em_accuracy"),
        _one_of("gate", "pass", "warned", "excluded", "uncalibrated"),
    ],
    "human_labels": [_one_of("winner", "A", "B", "tie"), _canonical_pair("response_a", "response_b")],
    "pairs": [
        *_probability("p_chosen", "agreement"),
        Rule("differ", ("chosen_id", "rejected_id"), "chosen and rejected are different responses"),
        *[
            Rule(
                "between",
                (c,),
                f"{c} is a rubric expected score in [1, 5]",
                1.0 - SCORE_SLACK,
                5.0 + SCORE_SLACK,
            )
            for c in ("chosen_score", "rejected_score")
        ],
    ],
    # every stored drop reason is a registered one (the filter check registry)
    "filter_drops": [_one_of("reason", *FILTER_REASONS), _canonical_pair("response_a", "response_b")],
    "quality": [_one_of("item_kind", "prompt", "response", "pair")],
    "embeddings": [_one_of("item_kind", "prompt", "response", "pair")],
    "selections": [
        _one_of("reason", "selected", "near_duplicate", "exact_duplicate", "budget"),
    ],
    "request_metrics": [
        _one_of("kind", "generate", "score_choices", "score_rewards", "continuation_logprobs"),
        _at_least("attempts", 1, "a request is attempted at least once"),
        _at_least("tokens_in", 0, "token counts are non-negative"),
        _at_least("tokens_out", 0, "token counts are non-negative"),
        _at_least("latency_s", 0, "latencies are non-negative"),
    ],
    "quarantine": [],
}


# --------------------------------------------------------------------------- the contract

_SCHEMA = "expect_table_columns_to_match_set"
_NOT_NULL = "expect_column_values_to_not_be_null"
_UNIQUE = "expect_column_values_to_be_unique"
_BETWEEN = "expect_column_values_to_be_between"
_IN_SET = "expect_column_values_to_be_in_set"
_GREATER = "expect_column_pair_values_a_to_be_greater_than_b"
_DIFFER = "expect_column_pair_values_to_differ"
_JSON = "expect_column_values_to_be_json_parseable"


@dataclass(frozen=True, eq=False)
class Expectation:
    """One expectation of a table's contract, in GX's own terms (its type and arguments).

    The single source of truth for both engines: the GX suite is built from these
    (:func:`validate_batch`) and :func:`check_batch` evaluates the same list as polars
    expressions.
    """

    type: str
    kwargs: dict[str, Any]
    description: str

    @property
    def columns(self) -> list[str]:
        return _columns_of(self.kwargs)

    @property
    def name(self) -> str:
        columns = self.columns if self.type != _SCHEMA else []
        return self.type + (f"({', '.join(columns)})" if columns else "")


def _from_rule(rule: Rule) -> Expectation:
    first = rule.columns[0]
    if rule.kind == "between":
        return Expectation(_BETWEEN, {"column": first, "min_value": rule.low, "max_value": rule.high},
                           rule.description)
    if rule.kind == "one_of":
        return Expectation(_IN_SET, {"column": first, "value_set": list(rule.values)}, rule.description)
    if rule.kind == "ordered":  # first < second, as GX spells it: second > first
        return Expectation(_GREATER, {"column_A": rule.columns[1], "column_B": first, "or_equal": False,
                                      "ignore_row_if": "either_value_is_missing"}, rule.description)
    if rule.kind == "differ":
        return Expectation(_DIFFER, {"column_A": first, "column_B": rule.columns[1]}, rule.description)
    if rule.kind == "json":
        return Expectation(_JSON, {"column": first}, rule.description)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


@functools.cache
def contract(table: str, with_provenance: bool) -> tuple[Expectation, ...]:
    """``table``'s expectations: schema, non-null, primary key, then the table's rules."""
    schema = TABLES[table]
    fields = [f for f in schema if with_provenance or f.name not in PROVENANCE_COLUMNS]
    expectations = [
        Expectation(_SCHEMA, {"column_set": [f.name for f in fields], "exact_match": False},
                    f"every {table} column is present")
    ]
    expectations += [Expectation(_NOT_NULL, {"column": f.name}, f"{f.name} is required")
                     for f in fields if not f.nullable]
    key = PRIMARY_KEYS.get(table)
    if key is not None:
        expectations.append(Expectation(_UNIQUE, {"column": key}, f"{key} is the primary key"))
    for rule in TABLE_RULES.get(table, []):
        if not set(rule.columns) <= set(schema.names):
            # a rule left behind by a schema change would fail every batch; the unit
            # tests keep rules and schemas in step, at run time the rule is dropped loudly
            logger.warning("%s: rule on unknown column(s) skipped: %s", table, rule)
            continue
        expectations.append(_from_rule(rule))
    return tuple(expectations)


# --------------------------------------------------------------------------- results


class FailedExpectation(TypedDict):
    """One failed expectation, JSON-ready (for quarantine reasons and Prefect artifacts)."""

    expectation: str  # type and columns, e.g. "expect_column_values_to_be_unique(pair_id)"
    type: str
    columns: list[str]
    description: str | None
    unexpected_count: int | None  # None when the failure is not about rows
    examples: list[Any]  # offending values, or the schema mismatch / error message
    row_level: bool  # True when the offending rows are marked in ``bad_row_mask``
    rows: list[int]  # the offending row positions (row-level failures only)


@dataclass(frozen=True, eq=False)
class ContractResult:
    """Outcome of one table's suite on one batch."""

    table: str
    success: bool
    failed: list[FailedExpectation]
    #: rows violating row-level expectations (length = rows in the batch)
    bad_row_mask: np.ndarray
    #: a failure not attributable to rows (schema, an expectation that raised): the whole
    #: batch must be quarantined
    batch_level_failure: bool
    evaluated: int  # expectations evaluated

    @property
    def n_rows(self) -> int:
        return int(self.bad_row_mask.shape[0])

    @property
    def n_bad_rows(self) -> int:
        return int(self.bad_row_mask.sum())

    def row_failures(self) -> tuple[list[str | None], list[str | None]]:
        """Per row: (the failed expectations, their columns), None for a row that passed.

        A batch-level failure counts against every row.
        """
        names: list[list[str]] = [[] for _ in range(self.n_rows)]
        columns: list[list[str]] = [[] for _ in range(self.n_rows)]
        for failure in self.failed:
            rows = failure["rows"] if failure["row_level"] else range(self.n_rows)
            for row in rows:
                names[row].append(failure["expectation"])
                columns[row].extend(c for c in failure["columns"] if c not in columns[row])
        return (["; ".join(n) or None for n in names], [",".join(c) or None for c in columns])

    @property
    def quarantine_mask(self) -> np.ndarray:
        """Rows a gate should quarantine: the bad rows, or every row on a batch-level failure."""
        if self.batch_level_failure:
            return np.ones(self.n_rows, dtype=bool)
        return self.bad_row_mask


# --------------------------------------------------------------------------- GX runtime


class _Runtime:
    """One ephemeral GX context per process, with one dataframe asset per table."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.execution_engine import pandas_execution_engine

        # GX fingerprints every batch by hashing the whole frame (an informational batch
        # marker nothing here reads): most of a large batch's validation time. Off.
        pandas_execution_engine.HASH_THRESHOLD = 0
        self.gx = gx
        self.differ_expectation = _define_differ_expectation()
        self.context = gx.get_context(mode="ephemeral")
        self.context.enable_analytics(False)
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.datasource = self.context.data_sources.add_pandas("prefcurate")
        self.batch_definitions: dict[str, Any] = {}
        self.suites: dict[tuple[str, bool], Any] = {}
        self.lock = threading.Lock()

    def batch_definition(self, table: str) -> Any:
        if table not in self.batch_definitions:
            asset = self.datasource.add_dataframe_asset(name=table)
            self.batch_definitions[table] = asset.add_batch_definition_whole_dataframe("whole")
        return self.batch_definitions[table]

    def suite(self, table: str, with_provenance: bool) -> Any:
        key = (table, with_provenance)
        if key not in self.suites:
            self.suites[key] = self._build_suite(table, with_provenance)
        return self.suites[key]

    def _build_suite(self, table: str, with_provenance: bool) -> Any:
        suite = self.gx.ExpectationSuite(name=f"prefcurate.{table}")
        for declared in contract(table, with_provenance):
            if declared.type == _DIFFER:
                kind = self.differ_expectation
            else:  # expect_column_values_to_be_between -> ExpectColumnValuesToBeBetween
                kind = getattr(self.gx.expectations, declared.type.title().replace("_", ""))
            expectation = kind(**declared.kwargs, description=declared.description)
            # report a raising expectation as a failure instead of aborting the whole suite
            expectation.catch_exceptions = True
            suite.add_expectation(expectation)
        return suite


def _define_differ_expectation() -> type:
    """Register ``expect_column_pair_values_to_differ`` (see the module docstring for why)."""
    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import ColumnPairMapExpectation
    from great_expectations.expectations.metrics.map_metric_provider import (
        ColumnPairMapMetricProvider,
        column_pair_condition_partial,
    )

    class ColumnPairValuesDiffer(ColumnPairMapMetricProvider):
        condition_metric_name = "column_pair_values.differ"
        condition_domain_keys = (
            "batch_id",
            "table",
            "column_A",
            "column_B",
            "row_condition",
            "condition_parser",
            "ignore_row_if",
        )
        condition_value_keys = ()

        @column_pair_condition_partial(engine=PandasExecutionEngine)
        def _pandas(cls, column_A, column_B, **kwargs):
            return column_A != column_B

    class ExpectColumnPairValuesToDiffer(ColumnPairMapExpectation):
        """Expect the two columns to hold different values in every row."""

        ignore_row_if: Literal["both_values_are_missing", "either_value_is_missing", "neither"] = (
            "either_value_is_missing"
        )
        map_metric: ClassVar[str] = "column_pair_values.differ"
        success_keys: ClassVar[tuple[str, ...]] = (
            "column_A",
            "column_B",
            "ignore_row_if",
            "mostly",
        )
        args_keys: ClassVar[tuple[str, ...]] = ("column_A", "column_B")

    return ExpectColumnPairValuesToDiffer


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _get_runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
        return _runtime


# --------------------------------------------------------------------------- API


def validate_batch(table: str, frame: pl.DataFrame | pa.Table) -> ContractResult:
    """Run ``table``'s suite on ``frame`` and say which rows (or whether the batch) failed."""
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    pdf = _to_pandas(frame)
    with_provenance = all(c in pdf.columns for c in PROVENANCE_COLUMNS)
    runtime = _get_runtime()
    # The context, its assets and GX's metric caches are shared: one validation at a time.
    with runtime.lock:
        suite = runtime.suite(table, with_provenance)
        batch = runtime.batch_definition(table).get_batch(batch_parameters={"dataframe": pdf})
        outcome = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "partial_unexpected_count": N_EXAMPLES,
                "return_unexpected_index_query": False,
            },
        )
    return _summarise(table, outcome, len(pdf))


def check_batch(table: str, frame: pl.DataFrame | pa.Table) -> ContractResult:
    """:func:`validate_batch`'s verdict without GX: the same expectations (:func:`contract`)
    evaluated as vectorised polars expressions, with GX's semantics (NaN is null, nulls are
    skipped by value rules, a duplicated key marks every copy, a missing column or an
    expectation that raises fails the batch). Same rows rejected, same failures named (the
    unit tests compare the two on good and bad frames); milliseconds a batch and no GX import,
    so the per-unit gate uses this one.
    """
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    if isinstance(frame, pa.Table):
        frame = pl.from_arrow(frame)
    elif not isinstance(frame, pl.DataFrame):
        raise TypeError(f"expected a polars DataFrame or pyarrow Table, got {type(frame)!r}")
    expectations = contract(table, all(c in frame.columns for c in PROVENANCE_COLUMNS))
    schema, checks = expectations[0], expectations[1:]
    missing = sorted(set(schema.kwargs["column_set"]) - set(frame.columns))
    failed: list[FailedExpectation] = []
    if missing:
        failed.append(_failure(schema, None, [f"missing column {c}" for c in missing]))
    checks = [e for e in checks if not set(e.columns) & set(missing)]  # the schema failure says so
    masks: dict[int, pl.Series] = {}
    try:  # one pass over the frame for every expectation
        evaluated = frame.select(_unexpected(e, frame.schema).alias(str(i)) for i, e in enumerate(checks))
        masks = {i: evaluated.to_series(i) for i in range(len(checks))}
    except Exception:  # one raised: evaluate them one by one to say which
        for i, e in enumerate(checks):
            try:
                masks[i] = frame.select(_unexpected(e, frame.schema)).to_series()
            except Exception as error:  # GX's catch_exceptions: a batch failure
                failed.append(_failure(e, None, [str(error).strip().splitlines()[-1] if str(error) else
                                                 type(error).__name__]))
    bad = np.zeros(frame.height, dtype=bool)
    for i, mask in masks.items():
        rows = np.flatnonzero(mask.fill_null(False).to_numpy())
        if rows.size:
            bad[rows] = True
            failed.append(_failure(checks[i], rows, _examples(frame, checks[i].columns, rows[:N_EXAMPLES])))
    failed.sort(key=lambda f: (f["row_level"], f["type"] != _SCHEMA, f["expectation"]))
    return ContractResult(
        table=table,
        success=not failed,
        failed=failed,
        bad_row_mask=bad,
        batch_level_failure=any(not f["row_level"] for f in failed),
        evaluated=len(expectations),
    )


def _missing(column: str, schema: pl.Schema) -> pl.Expr:
    """Null as pandas (and so GX) sees it: a NaN is missing too."""
    expr = pl.col(column).is_null()
    return expr | pl.col(column).is_nan() if schema[column].is_float() else expr


def _unexpected(expectation: Expectation, schema: pl.Schema) -> pl.Expr:
    """True where a row breaks ``expectation`` (GX's ``unexpected_index_list``)."""
    kwargs = expectation.kwargs
    if expectation.type in (_GREATER, _DIFFER):
        first, second = kwargs["column_A"], kwargs["column_B"]
        present = ~_missing(first, schema) & ~_missing(second, schema)
        a, b = pl.col(first), pl.col(second)
        return present & (~(a > b) if expectation.type == _GREATER else a == b)
    column = kwargs["column"]
    if expectation.type == _NOT_NULL:
        return _missing(column, schema)
    value, present = pl.col(column), ~_missing(column, schema)
    if expectation.type == _UNIQUE:
        # nulls count as equal to each other in is_duplicated, never to a value: masked off
        return present & value.is_duplicated()
    if expectation.type == _BETWEEN:
        if not schema[column].is_numeric():
            raise TypeError(f"{column} is {schema[column]}, not a number: cannot compare it to a range")
        low, high = kwargs["min_value"], kwargs["max_value"]
        outside = pl.lit(False)
        if low is not None:
            outside = outside | (value < low)
        if high is not None:
            outside = outside | (value > high)
        return present & outside
    if expectation.type == _IN_SET:
        return present & ~value.is_in(kwargs["value_set"])
    if expectation.type == _JSON:
        return present & ~value.map_batches(_parses_as_json, return_dtype=pl.Boolean)
    raise ValueError(f"no polars evaluation for {expectation.type}")


def _parses_as_json(texts: pl.Series) -> pl.Series:
    """Whether each text parses with Python's ``json.loads`` (what GX runs), each distinct text once.

    No vectorised parser has exactly that grammar (DuckDB's accepts ``[1,]``, rejects
    ``"\\ud800"``); the texts of a column repeat (sampling parameters) or are short, so
    parsing the distinct ones is cheap.
    """
    distinct = texts.drop_nulls().unique()
    invalid = [text for text in distinct.to_list() if not _is_json(text)]
    return ~texts.is_in(pl.Series(invalid, dtype=pl.String))


def _is_json(text: Any) -> bool:
    try:
        json.loads(text)
    except Exception:  # GX: anything json.loads raises means "not JSON"
        return False
    return True


def _failure(expectation: Expectation, rows: np.ndarray | None, examples: list[Any]) -> FailedExpectation:
    row_level = rows is not None
    return FailedExpectation(
        expectation=expectation.name,
        type=expectation.type,
        columns=[] if expectation.type == _SCHEMA else expectation.columns,
        description=expectation.description,
        unexpected_count=int(rows.size) if row_level else None,
        examples=examples[:N_EXAMPLES],
        row_level=row_level,
        rows=rows.tolist() if row_level else [],
    )


def _examples(frame: pl.DataFrame, columns: list[str], rows: np.ndarray) -> list[Any]:
    """The offending values as GX lists them: a value, or a pair of values for pair rules;
    nested values (GX sees only their lengths) as None when null, else their length."""
    picked = frame.select(columns)[rows]
    values = []
    for column in columns:
        series = picked[column]
        if series.dtype.is_nested():
            if isinstance(series.dtype, pl.Array):
                series = series.arr.len()
            elif isinstance(series.dtype, pl.List):
                series = series.list.len()
            else:
                series = series.is_not_null().cast(pl.Int8)
        values.append([_plain(v) for v in series.to_list()])
    return values[0] if len(columns) == 1 else [list(pair) for pair in zip(*values)]


def describe_failures(result: ContractResult) -> str:
    """One short line naming the failed expectations and columns (quarantine reasons, UI)."""
    if result.success:
        return f"{result.table}: all {result.evaluated} expectations passed ({result.n_rows} rows)"
    parts = []
    for failure in result.failed[:MAX_DESCRIBED]:
        if failure["row_level"]:
            detail = f"{failure['unexpected_count']} row(s)"
        else:
            detail = "whole batch"
        if failure["examples"]:
            shown = ", ".join(_short(e) for e in failure["examples"][:3])
            detail += f", e.g. {shown}"
        parts.append(f"{failure['expectation']} [{detail}]")
    if len(result.failed) > MAX_DESCRIBED:
        parts.append(f"and {len(result.failed) - MAX_DESCRIBED} more")
    scope = (
        "batch-level failure"
        if result.batch_level_failure
        else f"{result.n_bad_rows} of {result.n_rows} rows bad"
    )
    return (
        f"{result.table}: {len(result.failed)} of {result.evaluated} expectations failed "
        f"({scope}): " + "; ".join(parts)
    )


# --------------------------------------------------------------------------- helpers


def _to_pandas(frame: pl.DataFrame | pa.Table) -> pd.DataFrame:
    """The pandas frame GX validates: same columns and rows, nested columns as lengths.

    GX hashes every batch it is given; pandas cannot hash cells holding arrays, so GX falls
    back to pickling the whole frame (~10 s for 100k embedding vectors). No expectation looks
    inside nested values (only whether they are null), so list columns go in as their
    lengths (null stays null) and other nested columns as a 1/null validity marker.
    """
    if isinstance(frame, pl.DataFrame):
        table = frame.to_arrow()
    elif isinstance(frame, pa.Table):
        table = frame
    else:
        raise TypeError(f"expected a polars DataFrame or pyarrow Table, got {type(frame)!r}")
    for i, column_type in enumerate(table.schema.types):
        if pa.types.is_nested(column_type):
            table = table.set_column(i, table.field(i).name, _nested_proxy(table.column(i)))
    # unexpected_index_list reports index labels: make them row positions
    return table.to_pandas().reset_index(drop=True)


def _nested_proxy(column: pa.ChunkedArray) -> pa.ChunkedArray:
    kind = column.type
    if (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_list_view(kind)
        or pa.types.is_large_list_view(kind)
    ):
        return pc.list_value_length(column)
    return pc.if_else(pc.is_valid(column), pa.scalar(1, pa.int8()), pa.scalar(None, pa.int8()))


def _columns_of(kwargs: dict[str, Any]) -> list[str]:
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_A" in kwargs:
        return [kwargs["column_A"], kwargs["column_B"]]
    return list(kwargs.get("column_list") or [])


def _summarise(table: str, outcome: Any, n_rows: int) -> ContractResult:
    bad = np.zeros(n_rows, dtype=bool)
    failed: list[FailedExpectation] = []
    batch_level = False
    results = list(outcome.results)
    missing_columns: set[str] = set()
    for r in results:
        if r.expectation_config.type == _SCHEMA and not r.success:
            mismatch = (r.result.get("details") or {}).get("mismatched") or {}
            missing_columns.update(mismatch.get("missing") or [])

    for r in results:
        if r.success:
            continue
        config = r.expectation_config
        columns = _columns_of(config.kwargs)
        errors = _exception_messages(r.exception_info)
        raised = bool(errors)
        result = r.result or {}
        indices = result.get("unexpected_index_list")
        if indices is None and any(c in missing_columns for c in columns):
            # fails (or raises) because its column is absent: the schema failure says so
            continue
        row_level = (
            not raised
            and indices is not None
            and all(isinstance(i, (int, np.integer)) for i in indices)
        )
        if row_level:
            bad[np.asarray(indices, dtype=np.int64)] = True
            examples = [_plain(v) for v in (result.get("partial_unexpected_list") or [])]
            unexpected = int(result.get("unexpected_count") or 0)
        else:
            batch_level = True
            unexpected = None
            if raised:
                examples = errors
            elif config.type == _SCHEMA:
                examples = [f"missing column {c}" for c in sorted(missing_columns)]
            else:
                examples = [_plain(result.get("observed_value"))] if result else []
        name = config.type + (f"({', '.join(columns)})" if columns else "")
        failed.append(
            FailedExpectation(
                expectation=name,
                type=config.type,
                columns=columns,
                description=getattr(config, "description", None),
                unexpected_count=unexpected,
                examples=examples[:N_EXAMPLES],
                row_level=row_level,
                rows=[int(i) for i in indices] if row_level else [],
            )
        )
    # schema first, then by name: stable text for quarantine reasons
    failed.sort(key=lambda f: (f["row_level"], f["type"] != _SCHEMA, f["expectation"]))
    return ContractResult(
        table=table,
        success=bool(outcome.success),
        failed=failed,
        bad_row_mask=bad,
        batch_level_failure=batch_level,
        evaluated=len(results),
    )


def _exception_messages(info: Any) -> list[str]:
    """Messages of the exceptions an expectation caught.

    GX 1.x reports them either flat (``{"raised_exception": ..., "exception_message": ...}``)
    or keyed by the metric that raised (``{"MetricConfigurationID(...)": {...}}``).
    """
    if not isinstance(info, dict):
        return []
    if "raised_exception" in info:
        entries = [info]
    else:
        entries = [v for v in info.values() if isinstance(v, dict)]
    return [
        str(e.get("exception_message") or "exception").strip().splitlines()[-1]
        for e in entries
        if e.get("raised_exception")
    ]


def _plain(value: Any) -> Any:
    """numpy scalars and tuples to plain Python, NaN to None, so failures serialise as JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
