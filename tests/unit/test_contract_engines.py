"""The polars contract check (the per-unit gate) and the Great Expectations suite agree.

Both evaluate :func:`prefcurate.schemas.expectations.contract`; these tests run GX itself on
good and bad frames of every table and require the same verdict row for row: the same rows
rejected, by the same expectations, with the same counts and example values.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from prefcurate.schemas import expectations as contracts
from prefcurate.schemas.expectations import check_batch, contract, validate_batch
from prefcurate.schemas.tables import TABLES

from tests.unit.test_expectations import _set, valid_frame


def _verdict(result: contracts.ContractResult) -> dict:
    failures = [
        (f["expectation"], f["row_level"], f["unexpected_count"], f["rows"], f["examples"] if f["row_level"] else None)
        for f in result.failed
    ]
    return {"success": result.success, "batch_level": result.batch_level_failure, "evaluated": result.evaluated,
            "bad_rows": np.flatnonzero(result.bad_row_mask).tolist(), "failures": failures,
            "row_failures": result.row_failures()}


def _assert_agree(table: str, frame) -> dict:
    polars_verdict, gx_verdict = _verdict(check_batch(table, frame)), _verdict(validate_batch(table, frame))
    assert polars_verdict == gx_verdict
    return polars_verdict


def _broken(table: str) -> pl.DataFrame:
    """A frame of ``table`` breaking each of its expectations on rows of its own, plus values
    at the edges that must pass (a range's bounds, NaN where nulls are allowed, JSON that only
    Python's parser accepts)."""
    frame = valid_frame(table, n=40)
    row = iter(range(1, 40))
    for expectation in contract(table, False)[1:]:
        kwargs = expectation.kwargs
        column = kwargs.get("column")
        dtype = frame.schema[column] if column else None
        if expectation.type == "expect_column_values_to_not_be_null":
            frame = _set(frame, column, {next(row): None})
            if dtype.is_float():
                frame = _set(frame, column, {next(row): math.nan})
        elif expectation.type == "expect_column_values_to_be_unique":
            frame = _set(frame, column, {next(row): frame[column][0]})
        elif expectation.type == "expect_column_values_to_be_between":
            low, high = kwargs["min_value"], kwargs["max_value"]
            step = 1 if dtype.is_integer() else 0.25
            edits = {next(row): (math.ceil(low) if dtype.is_integer() else low)}  # on the bound: passes
            edits[next(row)] = (math.ceil(low) if dtype.is_integer() else low) - step
            if high is not None:
                edits[next(row)] = high
                edits[next(row)] = (math.floor(high) + step) if dtype.is_integer() else high + step
            if dtype.is_float():
                edits[next(row)] = math.nan  # null or NaN: the non-null expectation's business
            frame = _set(frame, column, edits)
        elif expectation.type == "expect_column_values_to_be_in_set":
            frame = _set(frame, column, {next(row): "not-a-" + column})
        elif expectation.type == "expect_column_pair_values_a_to_be_greater_than_b":
            greater, lesser = kwargs["column_A"], kwargs["column_B"]
            equal, reversed_ = next(row), next(row)
            frame = _set(frame, lesser, {equal: frame[greater][equal], reversed_: "zzz"})
        elif expectation.type == "expect_column_pair_values_to_differ":
            first, second = kwargs["column_A"], kwargs["column_B"]
            same = next(row)
            frame = _set(frame, second, {same: frame[first][same]})
        elif expectation.type == "expect_column_values_to_be_json_parseable":
            frame = _set(frame, column, {next(row): "[1,]", next(row): "NaN", next(row): "", next(row): "{x"})
    return frame


@pytest.mark.parametrize("table", sorted(TABLES))
def test_engines_agree_row_for_row(table):
    assert _assert_agree(table, valid_frame(table))["success"]
    verdict = _assert_agree(table, _broken(table))
    rules = [e for e in contract(table, False)[1:]]
    # every expectation of the table was broken somewhere (the test can fail)
    assert {name for name, *_ in verdict["failures"]} == {e.name for e in rules}


def test_engines_agree_on_batch_level_failures_and_inputs():
    pairs = _broken("pairs")
    _assert_agree("pairs", pairs.to_arrow())
    _assert_agree("pairs", pairs.head(0))
    verdict = _assert_agree("pairs", pairs.drop("rejected_id"))  # a missing column
    assert verdict["batch_level"] and verdict["failures"][0][0] == "expect_table_columns_to_match_set"
    with_provenance = valid_frame("prompts", provenance=True)
    _assert_agree("prompts", _set(with_provenance, "run_id", {2: None}))
    wrong_type = pairs.with_columns(pl.col("p_chosen").cast(pl.String))
    polars_result, gx_result = check_batch("pairs", wrong_type), validate_batch("pairs", wrong_type)
    # what raised differs in its words, not in what it means: the batch fails, naming the column
    assert polars_result.batch_level_failure and gx_result.batch_level_failure
    assert [f["expectation"] for f in polars_result.failed] == [f["expectation"] for f in gx_result.failed]
    assert np.array_equal(polars_result.bad_row_mask, gx_result.bad_row_mask)


def test_polars_check_is_cheap_on_a_large_batch():
    import time

    frame = pl.concat([valid_frame("responses", n=1000)] * 50).with_columns(
        (pl.col("response_id") + pl.int_range(pl.len()).cast(pl.String)).alias("response_id"))
    check_batch("responses", frame)
    started = time.perf_counter()
    result = check_batch("responses", frame)
    assert result.success and result.n_rows == 50_000
    assert time.perf_counter() - started < 1.0  # GX takes ~0.5 s at 50k rows; this, milliseconds
