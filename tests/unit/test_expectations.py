"""Data contracts (Great Expectations suites) between stages."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from prefcurate.schemas.expectations import (
    PROVENANCE_COLUMNS,
    TABLE_RULES,
    ContractResult,
    describe_failures,
    validate_batch,
)
from prefcurate.schemas.tables import PRIMARY_KEYS, TABLES


def _valid_values(table: str, field: pa.Field, n: int) -> list:
    """n valid values for one column, read off the schema and the table's rules."""
    rules = [r for r in TABLE_RULES[table] if field.name in r.columns]
    kind = field.type
    for rule in rules:
        if rule.kind == "one_of":
            return [rule.values[i % len(rule.values)] for i in range(n)]
        if rule.kind == "json":
            return [json.dumps({"i": i}) for i in range(n)]
        if rule.kind == "between" and (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            low = rule.low if rule.low is not None else 0
            high = rule.high if rule.high is not None else low + 10
            if pa.types.is_integer(kind):
                return [int(np.ceil(low)) + i for i in range(n)]
            return list(np.linspace(low, high, n))
    if pa.types.is_string(kind):
        # "<column>-<i>": unique per column, and response_a-i < response_b-i,
        # chosen_id-i != rejected_id-i
        return [f"{field.name}-{i}" for i in range(n)]
    if pa.types.is_integer(kind):
        return list(range(n))
    if pa.types.is_floating(kind):
        return list(np.linspace(0.0, 1.0, n))
    if pa.types.is_boolean(kind):
        return [i % 2 == 0 for i in range(n)]
    if pa.types.is_timestamp(kind):
        return [dt.datetime(2025, 1, 1, tzinfo=dt.UTC)] * n
    if pa.types.is_fixed_size_list(kind):
        return [np.full(kind.list_size, 0.1, dtype=np.float32)] * n
    if pa.types.is_list(kind):
        return [[0.1, 0.2, 0.4, 0.2, 0.1]] * n
    raise AssertionError(f"no valid value for {field}")


def valid_frame(table: str, n: int = 6, provenance: bool = False) -> pl.DataFrame:
    fields = [f for f in TABLES[table] if provenance or f.name not in PROVENANCE_COLUMNS]
    schema = pa.schema(fields)
    arrays = {f.name: pa.array(_valid_values(table, f, n), type=f.type) for f in fields}
    return pl.from_arrow(pa.table(arrays, schema=schema))


def _set(frame: pl.DataFrame, column: str, rows: dict[int, object]) -> pl.DataFrame:
    values = frame[column].to_list()
    for row, value in rows.items():
        values[row] = value
    return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))


def _failed_names(result: ContractResult) -> list[str]:
    return [f["expectation"] for f in result.failed]


def _mask(n: int, rows: list[int]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


# --------------------------------------------------------------------------- rules


def test_every_table_has_rules_on_its_own_columns():
    assert set(TABLE_RULES) == set(TABLES)
    for table, rules in TABLE_RULES.items():
        names = set(TABLES[table].names)
        for rule in rules:
            assert set(rule.columns) <= names, (table, rule)


# --------------------------------------------------------------------------- valid


@pytest.mark.parametrize("table", sorted(TABLES))
def test_valid_frame_passes(table):
    frame = valid_frame(table)
    result = validate_batch(table, frame)
    assert result.success, describe_failures(result)
    assert result.failed == []
    assert not result.batch_level_failure
    assert result.bad_row_mask.dtype == bool
    assert result.bad_row_mask.shape == (frame.height,)
    assert not result.bad_row_mask.any()
    # schema, one non-null per required payload column, the key, the rules
    required = [
        f for f in TABLES[table] if not f.nullable and f.name not in PROVENANCE_COLUMNS
    ]
    expected = 1 + len(required) + (PRIMARY_KEYS[table] is not None) + len(TABLE_RULES[table])
    assert result.evaluated == expected


@pytest.mark.parametrize("table", ["pairs", "judgments", "embeddings"])
def test_arrow_table_and_empty_batch_pass(table):
    frame = valid_frame(table)
    assert validate_batch(table, frame.to_arrow()).success
    empty = validate_batch(table, frame.head(0))
    assert empty.success and empty.n_rows == 0


def test_provenance_columns_are_checked_when_present():
    frame = valid_frame("prompts", provenance=True)
    result = validate_batch("prompts", frame)
    assert result.success, describe_failures(result)
    assert result.evaluated == validate_batch("prompts", valid_frame("prompts")).evaluated + 4

    broken = validate_batch("prompts", _set(frame, "run_id", {2: None}))
    assert _failed_names(broken) == ["expect_column_values_to_not_be_null(run_id)"]
    assert np.array_equal(broken.bad_row_mask, _mask(frame.height, [2]))


def test_extra_columns_are_allowed():
    frame = valid_frame("pairs").with_columns(pl.lit("x").alias("scratch"))
    assert validate_batch("pairs", frame).success


# --------------------------------------------------------------------------- violations


def test_null_id_marks_exactly_that_row():
    frame = _set(valid_frame("pairs"), "pair_id", {3: None})
    result = validate_batch("pairs", frame)
    assert not result.success
    assert _failed_names(result) == ["expect_column_values_to_not_be_null(pair_id)"]
    failure = result.failed[0]
    assert failure["unexpected_count"] == 1 and failure["row_level"]
    assert failure["columns"] == ["pair_id"]
    assert not result.batch_level_failure
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [3]))
    assert np.array_equal(result.quarantine_mask, result.bad_row_mask)


def test_duplicate_id_marks_every_copy():
    frame = _set(valid_frame("responses"), "response_id", {4: "response_id-1"})
    result = validate_batch("responses", frame)
    assert _failed_names(result) == ["expect_column_values_to_be_unique(response_id)"]
    assert result.failed[0]["unexpected_count"] == 2
    assert result.failed[0]["examples"] == ["response_id-1", "response_id-1"]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [1, 4]))


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("judgments", "p_a"),
        ("judgments", "p_first_ba"),
        ("jury", "agreement"),
        ("pairs", "p_chosen"),
        ("judge_calibration", "position_flip_rate"),
    ],
)
def test_probability_above_one_fails(table, column):
    frame = _set(valid_frame(table), column, {2: 1.3})
    result = validate_batch(table, frame)
    assert _failed_names(result) == [f"expect_column_values_to_be_between({column})"]
    assert result.failed[0]["examples"] == [1.3]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [2]))


def test_nullable_probability_may_be_null_but_not_negative():
    frame = _set(valid_frame("judgments"), "p_a", {0: None, 5: -0.01})
    result = validate_batch("judgments", frame)
    assert _failed_names(result) == ["expect_column_values_to_be_between(p_a)"]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [5]))


def test_rubric_score_outside_one_to_five_fails():
    frame = _set(valid_frame("ratings"), "expected_score", {1: 0.5, 2: 5.0, 3: 5.2})
    result = validate_batch("ratings", frame)
    assert _failed_names(result) == ["expect_column_values_to_be_between(expected_score)"]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [1, 3]))


def test_chosen_equal_to_rejected_fails():
    frame = valid_frame("pairs")
    frame = _set(frame, "rejected_id", {4: frame["chosen_id"][4]})
    result = validate_batch("pairs", frame)
    assert _failed_names(result) == [
        "expect_column_pair_values_to_differ(chosen_id, rejected_id)"
    ]
    assert result.failed[0]["examples"] == [["chosen_id-4", "chosen_id-4"]]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [4]))


def test_non_canonical_pair_order_fails():
    frame = valid_frame("jury")
    frame = _set(frame, "response_a", {0: "zzz", 1: frame["response_b"][1]})
    result = validate_batch("jury", frame)
    assert _failed_names(result) == [
        "expect_column_pair_values_a_to_be_greater_than_b(response_b, response_a)"
    ]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [0, 1]))


def test_unknown_finish_reason_and_empty_prompt_fail():
    responses = _set(valid_frame("responses"), "finish_reason", {5: "timeout"})
    result = validate_batch("responses", responses)
    assert _failed_names(result) == ["expect_column_values_to_be_in_set(finish_reason)"]
    assert np.array_equal(result.bad_row_mask, _mask(responses.height, [5]))

    prompts = _set(valid_frame("prompts"), "char_len", {0: 0})
    prompts = _set(prompts, "metadata", {1: "{not json"})
    result = validate_batch("prompts", prompts)
    assert _failed_names(result) == [
        "expect_column_values_to_be_between(char_len)",
        "expect_column_values_to_be_json_parseable(metadata)",
    ]
    assert np.array_equal(result.bad_row_mask, _mask(prompts.height, [0, 1]))


def test_several_violations_union_into_the_mask():
    frame = valid_frame("pairs", n=8)
    frame = _set(frame, "pair_id", {0: None, 6: "pair_id-5"})
    frame = _set(frame, "p_chosen", {2: 1.3})
    frame = _set(frame, "rejected_id", {7: frame["chosen_id"][7]})
    result = validate_batch("pairs", frame)
    assert sorted(_failed_names(result)) == [
        "expect_column_pair_values_to_differ(chosen_id, rejected_id)",
        "expect_column_values_to_be_between(p_chosen)",
        "expect_column_values_to_be_unique(pair_id)",
        "expect_column_values_to_not_be_null(pair_id)",
    ]
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [0, 2, 5, 6, 7]))
    assert result.n_bad_rows == 5


def test_missing_column_is_a_batch_level_failure():
    frame = _set(valid_frame("pairs"), "p_chosen", {1: 1.3}).drop("rejected_id")
    result = validate_batch("pairs", frame)
    assert not result.success and result.batch_level_failure
    names = _failed_names(result)
    # the schema failure comes first and stands for every expectation on the missing column
    assert names[0] == "expect_table_columns_to_match_set"
    assert result.failed[0]["examples"] == ["missing column rejected_id"]
    assert not result.failed[0]["row_level"]
    assert not any("rejected_id" in name for name in names[1:])
    # row-level findings are still reported, and the gate quarantines everything
    assert "expect_column_values_to_be_between(p_chosen)" in names
    assert np.array_equal(result.bad_row_mask, _mask(frame.height, [1]))
    assert result.quarantine_mask.all() and result.quarantine_mask.shape == (frame.height,)


def test_wrong_type_is_reported_not_raised():
    frame = valid_frame("pairs").with_columns(pl.col("p_chosen").cast(pl.String))
    result = validate_batch("pairs", frame)
    assert result.batch_level_failure
    failure = next(f for f in result.failed if f["columns"] == ["p_chosen"])
    assert not failure["row_level"] and failure["unexpected_count"] is None
    assert failure["examples"] and isinstance(failure["examples"][0], str)


def test_failures_are_json_ready():
    frame = _set(valid_frame("pairs"), "pair_id", {0: None})
    frame = _set(frame, "p_chosen", {1: 1.3})
    result = validate_batch("pairs", frame)
    json.dumps(result.failed)
    assert {f["examples"][0] for f in result.failed} == {None, 1.3}


def test_large_batch_marks_the_right_rows():
    n = 50_000
    rng = np.random.default_rng(0)
    frame = pl.DataFrame(
        {
            "pair_id": [f"pair-{i}" for i in range(n)],
            "prompt_id": [f"prompt-{i // 4}" for i in range(n)],
            "chosen_id": [f"c-{i}" for i in range(n)],
            "rejected_id": [f"r-{i}" for i in range(n)],
            "strategy": "best_vs_worst",
            "p_chosen": rng.uniform(0.5, 1.0, n),
            "margin": rng.uniform(0.0, 3.0, n),
            "agreement": rng.uniform(0.5, 1.0, n),
            "chosen_score": rng.uniform(1.0, 5.0, n),
            "rejected_score": rng.uniform(1.0, 5.0, n),
            "chosen_generator": "g1",
            "rejected_generator": "g2",
        }
    )
    bad_rows = [17, 9_999, 31_337, n - 1]
    frame = _set(frame, "p_chosen", {17: 1.3, n - 1: -0.5})
    frame = _set(frame, "rejected_id", {9_999: "c-9999"})
    frame = _set(frame, "pair_id", {31_337: None})
    result = validate_batch("pairs", frame)
    assert np.array_equal(np.flatnonzero(result.bad_row_mask), bad_rows)


# --------------------------------------------------------------------------- text, errors


def test_describe_failures_names_expectations_and_columns():
    ok = validate_batch("pairs", valid_frame("pairs"))
    assert describe_failures(ok).startswith("pairs: all ")

    frame = valid_frame("pairs")
    frame = _set(frame, "rejected_id", {0: frame["chosen_id"][0]})
    text = describe_failures(validate_batch("pairs", frame))
    assert "expect_column_pair_values_to_differ(chosen_id, rejected_id)" in text
    assert "1 of 6 rows" in text
    assert "\n" not in text

    text = describe_failures(validate_batch("pairs", valid_frame("pairs").drop("margin")))
    assert "expect_table_columns_to_match_set" in text and "margin" in text
    assert "batch-level" in text


def test_bad_input_raises():
    with pytest.raises(KeyError):
        validate_batch("no_such_table", valid_frame("pairs"))
    with pytest.raises(TypeError):
        validate_batch("pairs", valid_frame("pairs").to_dicts())
