"""Calibration on labelled pairs and the gate (tasks/calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.calibration import (
    CalibrationParams,
    GateError,
    apply_gate,
    card_judges,
    judge_accuracy_table,
    load_gold_file,
    prepare_jury,
    wilson_interval,
)
from prefcurate.tasks.filter import FilterParams

GOLD_ROWS = [
    {"prompt": "p1", "response_a": "x", "response_b": "y", "winner": "A"},
    {"prompt": "p2", "response_a": "x", "response_b": "y", "winner": "maybe"},
    {"prompt": "p3", "response_a": "", "response_b": "y", "winner": "B"},
    {"prompt": "p1", "response_a": "y", "response_b": "x", "winner": "b"},
    {"prompt": "p4", "response_a": "u", "response_b": "v", "winner": "tie"},
    {"prompt": "p5", "response_b": "v", "winner": "2"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_gold_file_bad_rows_are_quarantined_with_record_and_field(tmp_path, suffix):
    path = tmp_path / f"gold{suffix}"
    frame = pl.DataFrame(GOLD_ROWS)
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in GOLD_ROWS) + "\n")
    elif suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    gold, quarantine = load_gold_file(path)
    assert gold["prompt"].to_list() == ["p1", "p4"]
    assert gold["winner"].to_list() == ["A", "tie"]
    assert gold["id"].n_unique() == 2
    found = {(r["source_record"], r["field"], r["reason"]) for r in quarantine.iter_rows(named=True)}
    assert found == {
        (2, "winner", "unknown_winner"),
        (3, "response_a", "missing_field"),
        (4, "response_a,response_b", "duplicate_pair"),
        (6, "response_a", "missing_field"),
    }
    assert quarantine["raw"].str.contains("p2").any()


@pytest.mark.parametrize("name, text", [
    ("gold.csv", "prompt;response_a;response_b;winner\np1;x, with a comma;y;A\np2;x;y;B;extra\np3;u;v;b\n"),
    ("gold.tsv", "prompt\tresponse_a\tresponse_b\twinner\np1\tx, with a comma\ty\tA\np2\tx\ty\tB\textra\n"
                 "p3\tu\tv\tb\n"),
])
def test_gold_file_separator_comes_from_the_header_and_a_ragged_row_is_quarantined(tmp_path, name, text):
    """A spreadsheet in many locales saves ``;``; a .tsv holds tabs. A row with a field too
    many is quarantined by record, the rest kept."""
    path = tmp_path / name
    path.write_text(text)
    gold, quarantine = load_gold_file(path)
    assert gold.select("prompt", "response_a", "winner").rows() == [("p1", "x, with a comma", "A"), ("p3", "u", "B")]
    assert gold["source_record"].to_list() == [1, 3]
    assert quarantine.select("source_record", "reason").rows() == [(2, "ragged_row")]


def test_gold_file_malformed_line_is_quarantined_and_the_others_kept(tmp_path):
    import gzip

    lines = [json.dumps(GOLD_ROWS[0]), '{"prompt": "p9", "response_a": ', json.dumps({**GOLD_ROWS[4], "n": 3})]
    path = tmp_path / "gold.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    gold, quarantine = load_gold_file(path)
    assert gold.select("prompt", "source_record").rows() == [("p1", 1), ("p4", 3)]
    (row,) = quarantine.iter_rows(named=True)
    assert (row["source_record"], row["reason"]) == (2, "malformed_json")
    assert row["message"].startswith("record 2: malformed JSON") and "p9" in row["raw"]


def test_gold_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gold_path"):
        load_gold_file(tmp_path / "absent.jsonl")
    (tmp_path / "gold.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        load_gold_file(tmp_path / "gold.txt")


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(np.array([81]), np.array([263]), 0.95)
    assert low[0] == pytest.approx(0.2553, abs=1e-3) and high[0] == pytest.approx(0.3662, abs=1e-3)
    assert np.isnan(wilson_interval(np.array([0]), np.array([0]))[0][0])


def _calibration(rows):
    return pl.DataFrame(rows, schema=["judge", "gold_pairs", "accuracy", "position_flip_rate"], orient="row")


CALIBRATION = _calibration([
    ("strong", 42, 38 / 42, 0.1),  # credibly above chance
    ("chance", 42, 22 / 42, 0.2),  # interval covers 0.5
    ("flippy", 42, 40 / 42, 0.9),  # accurate but follows the slot
    ("few", 6, 1.0, 0.0),  # 6 of 6: too few pairs to judge (Wilson lower end 0.61, 5/6 would be 0.44)
])


def test_gate_excludes_warns_or_fails():
    judges = ["strong", "chance", "flippy", "new", "few"]
    table = judge_accuracy_table(judges, CALIBRATION, None, CalibrationParams())
    gates = dict(table.select("judge", "gate").iter_rows())
    assert gates == {"strong": "pass", "chance": "excluded", "flippy": "excluded", "new": "uncalibrated",
                     "few": "uncalibrated"}
    assert "only 6 labelled pairs" in table.filter(pl.col("judge") == "few")["gate_reason"][0]
    reasons = dict(table.select("judge", "gate_reason").iter_rows())
    assert "does not exclude chance" in reasons["chance"] and "flip rate 0.9" in reasons["flippy"]
    assert apply_gate(table, CalibrationParams()) == ["chance", "flippy"]

    warn = CalibrationParams(gate="warn")
    warned = judge_accuracy_table(judges, CALIBRATION, None, warn)
    assert apply_gate(warned, warn) == []
    card = card_judges(warned.with_columns(jury_method=pl.lit("mean"), em_accuracy=pl.lit(None, pl.Float64)))
    assert "FAILED the calibration gate" in card["judge_warning"] and "chance" in card["judge_warning"]
    assert "new" in card["judge_warning"]  # uncalibrated judges are named too

    fail = CalibrationParams(gate="fail")
    with pytest.raises(GateError, match="chance") as error:
        apply_gate(judge_accuracy_table(judges, CALIBRATION, None, fail), fail)
    assert "flippy" in str(error.value)


def test_an_empty_jury_after_the_gate_stops_the_build_naming_each_judge():
    table = judge_accuracy_table(["chance", "flippy"], CALIBRATION, None, CalibrationParams())
    with pytest.raises(GateError, match="left no judge") as error:
        apply_gate(table, CalibrationParams())
    assert "chance: labelled accuracy 0.524" in str(error.value) and "flippy: flip rate" in str(error.value)


def _judgments(n=40):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for judge, p in (("strong", 0.9), ("chance", rng.choice([0.2, 0.8])), ("flippy", 0.8)):
            ab, ba = (p, 1 - p) if judge != "flippy" else (0.9, 0.8)
            rows.append((f"p{i:02d}", "a", "b", judge, judge, "overall", True, ab, ba, (ab + 1 - ba) / 2))
    return pl.DataFrame(rows, orient="row", schema=[
        "prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion", "valid",
        "p_first_ab", "p_first_ba", "p_a"])


def test_prepare_jury_gates_and_sets_calibrated_weights_and_human_labels_join_calibration():
    judgments = _judgments()
    kept, params, table = prepare_jury(judgments, CALIBRATION, None, FilterParams(jury_method="calibrated"))
    assert sorted(kept["judge"].unique()) == ["strong"]
    assert set(params.judge_weights) == {"strong"} and params.judge_weights["strong"] > 1.5
    assert table.filter(pl.col("judge") == "chance")["weight"][0] is None
    assert table["em_accuracy"].null_count() == 0

    # human labels: strong always says a; people say a on 30 pairs, which count as labelled pairs
    labels = pl.DataFrame({"prompt_id": [f"p{i:02d}" for i in range(30)], "response_a": "a", "response_b": "b",
                           "winner": "A"})
    _, _, with_humans = prepare_jury(judgments, CALIBRATION, labels, FilterParams())
    strong = with_humans.filter(pl.col("judge") == "strong").row(0, named=True)
    assert strong["labelled"] == 42 + 30 and strong["correct"] == 38 + 30


def test_calibrated_without_any_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="calibrated needs labelled pairs"):
        prepare_jury(_judgments(), pl.DataFrame(), None, FilterParams(jury_method="calibrated"))


def test_the_card_lists_the_judges_and_warns_about_pairs_from_judges_that_failed_the_gate(tmp_path):
    from prefcurate.tasks.export import export_pairs

    warn = CalibrationParams(gate="warn")
    table = judge_accuracy_table(["strong", "chance"], CALIBRATION, None, warn).with_columns(
        jury_method=pl.lit("calibrated"), em_accuracy=pl.lit(0.7))
    pairs = pl.DataFrame({"pair_id": ["x"], "prompt_id": ["p"], "prompt": ["q"], "chosen": ["a"],
                          "rejected": ["b"], "p_chosen": [0.9], "margin": [1.0]})
    written = export_pairs(pairs, tmp_path / "export", card_stats=card_judges(table))
    card = written["card"].read_text()
    assert "## Judges and calibration" in card and "Jury aggregation: `calibrated`" in card
    assert "FAILED the calibration gate" in card and "chance (labelled accuracy 0.524" in card
    assert "90.5%" in card  # strong's labelled accuracy, 38 of 42
