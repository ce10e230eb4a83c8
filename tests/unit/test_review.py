"""Human review round-trip through a small store: export the uncertain pairs, label them,
import the labels, and the next filter run takes the person's verdict (tasks/review.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from prefcurate.schemas.ids import content_id
from prefcurate.tasks.review import export_for_review, import_review_labels, read_review_labels

from prefcurate.config import PipelineConfig
from prefcurate.steps.base import context_for
from prefcurate.store import Store
from tests.unit.stage_runs import run_pending_units

N_PROMPTS = 6


def _dataset(root) -> Store:
    store = Store.init(root)
    run = store.start_run("test", {})
    prompts = pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(N_PROMPTS)], "prompt": [f"question {i}" for i in range(N_PROMPTS)],
        "source_file": "test", "source_record": list(range(1, N_PROMPTS + 1)), "char_len": 10,
    })
    responses = pl.DataFrame({
        "response_id": [f"p{i}-{s}" for i in range(N_PROMPTS) for s in "ab"],
        "prompt_id": [f"p{i}" for i in range(N_PROMPTS) for _ in "ab"],
        "generator": "g", "model": "m", "sampling": "{}", "sample_index": [0, 1] * N_PROMPTS,
        "text": [f"answer {i}{s} " * 5 for i in range(N_PROMPTS) for s in "ab"],
        "finish_reason": "stop", "truncated": False,
    })
    rows = []
    for i in range(N_PROMPTS):
        # prompts 0-1: the judges are split (uncertain); 2-5: they agree a is better
        for judge, (ab, ba) in (("j1", (0.9, 0.1)), ("j2", (0.1, 0.9) if i < 2 else (0.8, 0.2))):
            rows.append({
                "judgment_id": f"{i}{judge}", "prompt_id": f"p{i}", "response_a": f"p{i}-a", "response_b": f"p{i}-b",
                "judge": judge, "judge_model": judge, "criterion": "overall", "template": "t", "template_hash": "h",
                "mode": "probability", "p_first_ab": ab, "p_first_ba": ba, "p_a": (ab + 1 - ba) / 2,
                "bpde": 0.69 if i < 2 else 0.0, "valid": True,
            })
    for table, frame in (("prompts", prompts), ("responses", responses), ("judgments", pl.DataFrame(rows))):
        store.commit(table, frame, key=f"test-{table}", run_id=run, stage="test")
    store.finish_run(run, "completed")
    return store


def _filter(store: Store) -> pl.DataFrame:
    # the default gate: one labelled pair is below min_labelled, so the judges stay (uncalibrated)
    config = PipelineConfig(contracts=False, filter={"rating_vs_ranking": {"enabled": False}})
    ctx = context_for(store.root, config, store.start_run("filter", {}))
    run_pending_units("filter", ctx, store)
    return store.query("SELECT prompt_id, chosen_id FROM pairs WHERE run_id = ? ORDER BY prompt_id", [ctx.run_id])


def test_review_round_trip_overrides_the_jury_and_joins_calibration(tmp_path):
    store = _dataset(tmp_path / "ds")
    before = _filter(store)
    assert "p0" not in before["prompt_id"].to_list()  # the split pairs are dropped

    path, n = export_for_review(store, top=0.34)
    assert n == 3  # ceil(0.34 * 6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows[:2]] == ["p0", "p1"]  # highest BPDE first
    assert rows[0]["response_a"].startswith("answer 0a") and rows[0]["winner"] == ""

    rows[0].update(winner="B", annotator="ana")  # p0: the person prefers b
    rows[1]["winner"] = "perhaps"  # quarantined
    # rows[2] left blank: not labelled yet
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    done = import_review_labels(store, labelled)
    assert (done["labels"], done["quarantined"], done["unlabelled"]) == (1, 1, 1)
    stored = store.query("SELECT prompt_id, winner, annotator, stage FROM human_labels")
    assert stored.row(0) == ("p0", "B", "ana", "review")
    label = store.query("SELECT label_id, prompt_id, response_a, response_b, winner FROM human_labels").row(0)
    # the id every stored label has had: of its pair, its winner, its annotator and its file
    assert label[0] == content_id("human_label", *label[1:], "ana", str(labelled))
    bad = store.query("SELECT source_record, field, reason FROM quarantine WHERE stage = 'review'")
    assert bad.row(0) == (2, "winner", "unknown_winner")

    after = _filter(store)
    assert after.filter(pl.col("prompt_id") == "p0")["chosen_id"].to_list() == ["p0-b"]
    accuracy = store.query("SELECT judge, labelled, correct FROM judge_accuracy WHERE run_id = "
                           "(SELECT run_id FROM judge_accuracy ORDER BY created_at DESC LIMIT 1) ORDER BY judge")
    # the labelled pair joined the calibration set: j2 (said b) right, j1 (said a) wrong
    assert accuracy.rows() == [("j1", 1, 0), ("j2", 1, 1)]
    jury = store.query("SELECT method FROM jury WHERE prompt_id = 'p0' ORDER BY created_at DESC LIMIT 1")
    assert jury.item() == "human"

    # exported again: the labelled pair is not asked twice
    _, n_again = export_for_review(store, top=1.0)
    assert n_again == N_PROMPTS - 1


def test_review_file_checks(tmp_path):
    known = pl.DataFrame({"prompt_id": ["p"], "response_a": ["a"], "response_b": ["b"]})
    path = tmp_path / "labels.csv"
    pl.DataFrame({
        "prompt_id": ["p", "p", "q", "p", ""],
        "response_a_id": ["b", "a", "a", "a", "a"],
        "response_b_id": ["a", "b", "b", "b", "b"],
        "winner": ["A", "tie", "B", "B", "A"],
    }).write_csv(path)
    labels, bad, blank = read_review_labels(path, known)
    # ids given in the other order are put in canonical order, the winner swapped with them
    assert labels.select("response_a", "response_b", "winner").row(0) == ("a", "b", "B")
    assert blank == 0
    assert {(r["source_record"], r["reason"]) for r in bad.iter_rows(named=True)} == {
        (2, "duplicate_pair"), (3, "unknown_pair"), (4, "duplicate_pair"), (5, "missing_field")}
    # the same file saved by a spreadsheet that writes ";" (and a line it broke) reads the same
    resaved = tmp_path / "labels-resaved.csv"
    resaved.write_text(path.read_text().replace(",", ";") + "p;a;b;A;oops\n")
    labels_again, bad_again, _ = read_review_labels(resaved, known)
    assert labels_again.drop("label_id", "source_file").equals(labels.drop("label_id", "source_file"))
    assert {(r["source_record"], r["reason"]) for r in bad_again.iter_rows(named=True)} == {
        (2, "duplicate_pair"), (3, "unknown_pair"), (4, "duplicate_pair"), (5, "missing_field"), (6, "ragged_row")}
    with pytest.raises(ValueError, match="top"):
        from prefcurate.tasks.review import review_candidates

        review_candidates(pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), top=0)


def test_pairs_without_both_orders_are_ranked_by_their_verdicts_entropy():
    """A position-free or single-order judgment has no BPDE: its p_a's entropy stands in."""
    from prefcurate.tasks.review import review_candidates

    judgments = pl.DataFrame({
        "prompt_id": ["p", "p", "q", "q"], "response_a": ["a", "a", "c", "c"], "response_b": ["b", "b", "d", "d"],
        "judge": ["pairwise", "rm", "rm", "rm2"], "valid": [True] * 4,
        "bpde": [0.0, None, None, None], "p_a": [0.9, 0.5, 0.55, 0.45],
    })
    prompts = pl.DataFrame({"prompt_id": ["p", "q"], "prompt": ["P?", "Q?"]})
    responses = pl.DataFrame({"response_id": list("abcd"), "text": ["A.", "B.", "C.", "D."]})
    exported = review_candidates(judgments, pl.DataFrame(), prompts, responses, top=1.0)
    # q: no BPDE, two near-coin-flip verdicts: more uncertain than p, whose both-orders judge agreed
    assert exported["prompt_id"].to_list() == ["q", "p"]
    assert exported["uncertainty"].to_list()[0] > 0.68 and exported["uncertainty"].to_list()[1] == 0.0
