"""Importing judgments made elsewhere: swaps, quarantine, formats, mappings, idempotency."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from prefcurate.tasks.import_judgments import (
    AMBIGUOUS_VERDICT,
    IDENTICAL_RESPONSES,
    INVALID_VERDICT,
    MISSING_FIELD,
    MISSING_VERDICT,
    OUT_OF_RANGE,
    UNREADABLE,
    ImportMapping,
    JudgmentImportError,
    import_file,
    load_mapping,
)
from prefcurate.tasks.ingest import CONTROL_CHARACTER, IngestParams, ingest_file

from prefcurate.steps.import_judgments import ID_COLUMNS, run_import
from prefcurate.store import Store

PANDALM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pandalm"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _pairs(n: int, **verdict) -> list[dict]:
    return [{"prompt": f"Question number {i}?", "response_1": f"first answer {i}", "response_2": f"second answer {i}",
             "judge": "j", **verdict} for i in range(n)]


def _winner(result, row: dict) -> str:
    """Which of response_1/response_2 the stored judgment says is better."""
    responses = result.responses.select("response_id", "text")
    ids = dict(zip(responses["text"], responses["response_id"]))
    judgment = result.judgments.filter(
        pl.col("response_a").is_in([ids[row["response_1"]], ids[row["response_2"]]])).row(0, named=True)
    better_id = judgment["response_a"] if judgment["p_a"] > 0.5 else judgment["response_b"]
    return "response_1" if better_id == ids[row["response_1"]] else "response_2"


def test_a_verdict_for_b_lands_on_the_right_response_whichever_id_is_smaller(tmp_path):
    rows = _pairs(12, verdict_12="B")
    result = import_file(_write_jsonl(tmp_path / "j.jsonl", rows), ImportMapping())
    # both cases occur: response_1 is the canonical a for some pairs and b for others
    assert 0 < result.counts["swapped"] < len(rows)
    assert [_winner(result, row) for row in rows] == ["response_2"] * len(rows)
    # single order: only the column of the order that was shown holds a value
    stored = result.judgments
    assert (stored["p_first_ab"].is_null() ^ stored["p_first_ba"].is_null()).all()
    assert stored["bpde"].is_null().all() and result.counts["single_order"] == len(rows)


def test_both_orders_give_the_position_balanced_probability(tmp_path):
    # order 12: P(response_1 better) 0.8; order 21 shows response_2 first: P(response_2 better) 0.3
    rows = _pairs(10, p_12=0.8, p_21=0.3)
    result = import_file(_write_jsonl(tmp_path / "j.jsonl", rows), ImportMapping())
    ids = dict(zip(result.responses["text"], result.responses["response_id"]))
    for row in rows:
        first = ids[row["response_1"]]
        judgment = result.judgments.filter(pl.col("response_a").is_in([first, ids[row["response_2"]]])).row(0, named=True)
        p_first_better = judgment["p_a"] if judgment["response_a"] == first else 1 - judgment["p_a"]
        assert p_first_better == pytest.approx(0.75)
        if judgment["response_a"] == first:  # order 12 showed a first
            assert (judgment["p_first_ab"], judgment["p_first_ba"]) == pytest.approx((0.8, 0.3))
        else:
            assert (judgment["p_first_ab"], judgment["p_first_ba"]) == pytest.approx((0.3, 0.8))
    assert result.counts["single_order"] == 0


def test_scores_and_ratings_map_onto_probabilities_and_the_rubric_scale(tmp_path):
    rows = _pairs(4, score_12_a=8, score_12_b=2, rating_1=10, rating_2=1)
    result = import_file(_write_jsonl(tmp_path / "j.jsonl", rows), ImportMapping(score_scale=(0, 10), rating_scale=(1, 10)))
    assert [_winner(result, row) for row in rows] == ["response_1"] * 4
    assert set(result.judgments["p_a"].round(6).to_list()) <= {0.8, 0.2}
    assert sorted(set(result.ratings["expected_score"].to_list())) == [1.0, 5.0]
    assert (result.judgments["template"] == "imported:scores").all()
    with pytest.raises(JudgmentImportError, match="score scale"):
        import_file(tmp_path / "j.jsonl", ImportMapping())


def test_bad_rows_go_to_quarantine_with_record_and_field(tmp_path):
    good = _pairs(1, verdict_12="A")[0]
    rows = [
        good,
        {**good, "prompt": None},
        {**good, "verdict_12": "maybe"},
        {**good, "judge": "k", "p_12": 1.5, "verdict_12": None},
        {**good, "judge": "m", "p_12": 0.5},  # side and probability for one order
        {**good, "judge": "n", "verdict_12": None},
        {**good, "response_2": good["response_1"]},
        {**good, "prompt": "a\x00b"},
        {**good, "system_prompt": "be\x1fbrief"},
        {**good, "judge": "gpt\x1f4"},
    ]
    path = _write_jsonl(tmp_path / "j.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{not json\n")
    result = import_file(path, ImportMapping())
    found = {(r["source_record"], r["field"], r["reason"]) for r in result.quarantine.to_dicts()}
    assert found == {
        (2, "prompt", MISSING_FIELD), (3, "verdict_12", INVALID_VERDICT), (4, "p_12", OUT_OF_RANGE),
        (5, "verdict_12", AMBIGUOUS_VERDICT), (6, "verdict_12", MISSING_VERDICT), (7, "response_2", IDENTICAL_RESPONSES),
        (8, "prompt", CONTROL_CHARACTER), (9, "system_prompt", CONTROL_CHARACTER),
        (10, "judge", CONTROL_CHARACTER), (11, None, UNREADABLE),
    }
    message = result.quarantine.filter(pl.col("source_record") == 3)["message"][0]
    assert "record 3" in message and "'maybe'" in message
    counts = result.counts
    assert counts["judgments"] == 1 and counts["records"] == 11
    assert counts["judgment_rows"] == counts["judgments"] + counts["quarantined"] + counts["duplicates"]


def test_csv_and_parquet_import_the_same_judgments(tmp_path):
    rows = _pairs(5, p_12=0.7, p_21=0.4, verdict_12=None)
    from_jsonl = import_file(_write_jsonl(tmp_path / "j.jsonl", rows), ImportMapping())
    frame = pl.DataFrame(rows).drop("verdict_12")
    frame.write_csv(tmp_path / "j.csv")
    frame.write_parquet(tmp_path / "j.parquet")
    for name in ("j.csv", "j.parquet"):
        other = import_file(tmp_path / name, ImportMapping())
        assert other.judgments.select("judgment_id", "p_a").sort("judgment_id").equals(
            from_jsonl.judgments.select("judgment_id", "p_a").sort("judgment_id"))


def test_imported_prompts_get_the_ingest_prompt_id(tmp_path):
    rows = [{"prompt": "  Hello   there ", "system_prompt": "Be brief.", "response_1": "x", "response_2": "y",
             "judge": "j", "verdict_12": "tie"}]
    path = _write_jsonl(tmp_path / "j.jsonl", rows)
    imported = import_file(path, ImportMapping())
    ingested = ingest_file(IngestParams(path=str(path)))
    assert imported.prompts["prompt_id"].to_list() == ingested.accepted["prompt_id"].to_list()
    assert imported.prompts["prompt"][0] == "Hello there"


def test_wide_records_and_joined_files_need_only_a_mapping(tmp_path):
    """A PandaLM-like layout: texts in one file, each judge's verdict beside them or in
    another file joined on a key, judges' codes recoded by value maps."""
    items = [{"idx": i, "instruction": f"Task {i}", "input": "" if i % 2 else f"input {i}",
              "response1": f"one {i}", "response2": f"two {i}", "human": i % 3} for i in range(6)]
    (tmp_path / "items.json").write_text(json.dumps(items, indent=2))
    verdicts = [{"idx": i, "gpt_result": ["1", "2", "Tie", "1", "no idea", "2"][i]} for i in range(6)]
    (tmp_path / "gpt.json").write_text(json.dumps(verdicts))
    mapping_file = tmp_path / "mapping.yaml"
    mapping_file.write_text(
        "join: [{file: gpt.json, key: idx}]\n"
        "fields: {id: idx, prompt: \"{instruction}\\n\\n{input}\", response_1: response1, response_2: response2}\n"
        "judges:\n"
        "  - {constants: {judge: gpt}, fields: {verdict_12: gpt_result}, values: {verdict_12: {'1': A, '2': B, Tie: tie}}}\n"
        "  - {constants: {judge: human}, fields: {verdict_12: human}, values: {verdict_12: {1: A, 2: B, 0: tie}}}\n"
    )
    result = import_file(tmp_path / "items.json", load_mapping(mapping_file))
    assert result.counts["judgment_rows"] == 12 and result.counts["judgments"] == 11
    assert result.quarantine.select("source_record", "field", "reason").row(0) == (5, "verdict_12", INVALID_VERDICT)
    assert set(result.judgments["judge"]) == {"gpt", "human"}
    assert result.prompts.filter(pl.col("source_id") == "0")["prompt"][0] == "Task 0\n\ninput 0"  # normalised as ingest does (blank lines kept)
    assert result.prompts.filter(pl.col("source_id") == "1")["prompt"][0] == "Task 1"
    with pytest.raises(JudgmentImportError, match="no record has 'judge'.*--const judge=NAME"):
        import_file(tmp_path / "items.json", load_mapping(mapping_file, {"judges": [{"fields": {"verdict_12": "human"}}]}))
    with pytest.raises(JudgmentImportError, match="no record has the field 'nope'"):
        import_file(tmp_path / "items.json", load_mapping(mapping_file, {"fields": {"response_1": "nope"}}))


def test_reimport_adds_nothing_and_an_overlapping_file_adds_only_what_is_new(tmp_path):
    dataset = tmp_path / "ds"
    rows = _pairs(4, verdict_12="A", rating_1=4, rating_2=2)
    mapping = ImportMapping(rating_scale=(1, 5))
    first = run_import(dataset, _write_jsonl(tmp_path / "a.jsonl", rows), mapping)
    store = Store.open(dataset)
    tables = ("prompts", "responses", "judgments", "ratings")
    counts = {t: store.count(t) for t in tables}
    assert counts == {"prompts": 4, "responses": 8, "judgments": 4, "ratings": 8} and first["judgments"] == 4
    again = run_import(dataset, tmp_path / "a.jsonl", mapping)
    assert again["already_imported"] == 1 and {t: store.count(t) for t in tables} == counts
    more = run_import(dataset, _write_jsonl(tmp_path / "b.jsonl", rows + _pairs(5, verdict_12="B")[4:]), mapping)
    assert more["judgments"] == 1 and more["duplicates"] == 4
    assert {t: store.count(t) for t in tables} == {"prompts": 5, "responses": 10, "judgments": 5, "ratings": 8}
    provenance = store.query("SELECT DISTINCT source_file, source_record FROM judgments ORDER BY ALL")
    assert provenance.height == 5 and provenance["source_file"].str.ends_with(".jsonl").all()
    assert store.query("SELECT count(*) AS n FROM runs WHERE kind = 'import' AND status = 'completed'")["n"][0] == 3


def test_an_import_is_told_which_of_its_own_ids_the_dataset_holds(tmp_path):
    """``Store.stored_ids``: the asked ids the table holds, each once (prompts through the key
    index), never every id of the table."""
    dataset = tmp_path / "ds"
    run_import(dataset, _write_jsonl(tmp_path / "a.jsonl", _pairs(4, verdict_12="A", rating_1=4, rating_2=2)),
               ImportMapping(rating_scale=(1, 5)))
    store = Store.open(dataset)
    for table, column in ID_COLUMNS.items():
        held = store.ids(table, column).sort()
        assert held.len() >= 4
        asked = pl.concat([held.head(2), held.head(1), pl.Series(["not-an-id", None], dtype=pl.String)])
        assert store.stored_ids(table, column, asked).sort().to_list() == held.head(2).to_list()
        assert store.stored_ids(table, column, pl.Series([], dtype=pl.String)).len() == 0


def test_judgment_ids_are_content_addressed_over_sample_index(tmp_path):
    rows = [{**row, "sample_index": s} for row in _pairs(1, verdict_12="A") for s in (0, 1, 1)]
    result = import_file(_write_jsonl(tmp_path / "j.jsonl", rows), ImportMapping())
    assert result.counts["judgments"] == 2 and result.counts["duplicates"] == 1


@pytest.mark.skipif(not (PANDALM / "testset-v1.json").exists(), reason="../shared/data/pandalm/ is absent")
def test_pandalm_imports_with_the_shipped_mapping(tmp_path):
    mapping = load_mapping(Path(__file__).resolve().parents[2] / "examples" / "import_pandalm.yaml")
    result = import_file(PANDALM / "testset-v1.json", mapping)
    items = json.loads((PANDALM / "testset-v1.json").read_text())
    gpt = {r["idx"]: r["gpt_result"] for r in json.loads((PANDALM / "gpt-3.5-turbo-testset-v1.json").read_text())}
    gpt_readable = sum(str(gpt[item["idx"]]) in ("1", "2", "Tie") for item in items)
    judges_per_item = 5  # gpt-3.5-turbo, PandaLM-7B and three annotators
    assert result.counts["records"] == len(items) == 999
    assert result.counts["judgment_rows"] == judges_per_item * 999
    # every record has its own id (idx): nothing collapses, only unparseable verdicts are quarantined
    assert result.counts["judgments"] == gpt_readable + 4 * 999 == 4970
    assert result.counts["quarantined"] == 999 - gpt_readable == 25 and result.counts["duplicates"] == 0
    assert set(result.quarantine["reason"]) == {INVALID_VERDICT} and set(result.quarantine["field"]) == {"verdict_12"}
    per_judge = dict(result.judgments.group_by("judge").len().iter_rows())
    assert per_judge == {"gpt-3.5-turbo": gpt_readable, "pandalm-7b": 999, "annotator1": 999, "annotator2": 999,
                         "annotator3": 999}
    # the human label 1 (response1 better) lands on response1 whichever id is smaller
    texts = dict(zip(result.responses["response_id"], result.responses["text"]))
    first = result.judgments.filter(pl.col("judge") == "annotator1").sort("source_record").head(50)
    for judgment in first.to_dicts():
        item = items[judgment["source_record"] - 1]
        if item["annotator1"] in (1, 2):
            better = judgment["response_a"] if judgment["p_a"] > 0.5 else judgment["response_b"]
            assert texts[better] == item[f"response{item['annotator1']}"]
    # each judge's agreement with the annotators' majority: PandaLM reports about 71 % for
    # gpt-3.5-turbo and 67 % for PandaLM-7B; a verdict landing on the wrong response would
    # turn those into about 30 %
    majority = {}
    for number, item in enumerate(items, start=1):
        labels = [item[f"annotator{k}"] for k in (1, 2, 3)]
        top = max(set(labels), key=labels.count)
        if labels.count(top) >= 2:
            majority[number] = top
    frame = result.judgments.with_columns(pl.col("response_a").replace_strict(texts).alias("text_a"))
    for judge, low, high in (("gpt-3.5-turbo", 0.68, 0.74), ("pandalm-7b", 0.63, 0.70), ("annotator1", 0.9, 1.0)):
        hits = total = 0
        for record, p_a, text_a in frame.filter(pl.col("judge") == judge).select(
                "source_record", "p_a", "text_a").iter_rows():
            if record not in majority:
                continue
            verdict = 0 if p_a == 0.5 else (1 if (p_a > 0.5) == (text_a == items[record - 1]["response1"]) else 2)
            hits += verdict == majority[record]
            total += 1
        assert low <= hits / total <= high, (judge, hits / total)
    assert result.prompts.height == len({" ".join((i["instruction"] + "\n" + i["input"]).split()) for i in items})
    assert result.counts["single_order"] == result.counts["judgments"]  # PandaLM shows one order


def test_the_command_line_maps_joins_and_recodes_without_code(tmp_path):
    from typer.testing import CliRunner

    from prefcurate.cli import app

    items = [{"key": i, "question": f"Q{i}", "context": f"c{i}", "left": f"L{i}", "right": f"R{i}"} for i in range(3)]
    _write_jsonl(tmp_path / "items.jsonl", items)
    _write_jsonl(tmp_path / "votes.jsonl", [{"key": i, "vote": ["1", "2", "x"][i]} for i in range(3)])
    arguments = ["import", "judgments", str(tmp_path / "items.jsonl"), "-d", str(tmp_path / "ds"),
                 "--map", r"prompt={question}\n{context}", "--map", "response_1=left", "--map", "response_2=right",
                 "--map", "verdict_12=vote", "--map", "id=key", "--const", "judge=voter", "--join", "votes.jsonl:key",
                 "--value", "verdict_12:1=A", "--value", "verdict_12:2=B"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "3 judgment rows = 2 imported + 1 quarantined" in result.output
    store = Store.open(tmp_path / "ds")
    assert sorted(store.query("SELECT prompt FROM prompts")["prompt"]) == ["Q0\nc0", "Q1\nc1"]
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 0 and "already imported" in again.output
    missing = CliRunner().invoke(app, arguments[:3] + ["-d", str(tmp_path / "ds2"), "--map", "prompt=nope"])
    assert missing.exit_code == 2 and "no record has the field 'nope'" in missing.output
