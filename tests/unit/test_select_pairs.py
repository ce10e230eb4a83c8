"""The select step's pairs: a pair is its responses' vectors, embedded by the score stage's
rule (so a build's select reuses the score stage's vectors), and two pairs are
near-duplicates only when their chosen and their rejected responses both are.

Runs import, filter and select unit by unit (no Prefect) on a real store, with a hashed
stand-in for the embedding model that reads "!" as "." (planted near-duplicates).
"""

from __future__ import annotations

import json

from prefcurate.tasks.import_judgments import load_mapping

from prefcurate.config import load_config
from prefcurate.steps.base import context_for
from prefcurate.steps.import_judgments import run_import
from prefcurate.store import Store
from tests.support.instant_engine import instant_embed_texts
from tests.unit.stage_runs import run_pending_units

PROMPT = "List three primary colours."
BEST = "Red, yellow and blue."


def _judged(response_1: str, response_2: str, prompt: str = PROMPT) -> list[dict]:
    return [{"prompt": prompt, "response_1": response_1, "response_2": response_2, "judge": judge, "verdict_12": "A"}
            for judge in ("first-annotator", "second-annotator")]


def test_pairs_sharing_a_chosen_response_are_no_duplicates_and_vectors_are_the_score_stages(tmp_path, monkeypatch):
    embedded: list[str] = []

    def embed(texts, **_ignored):
        embedded.extend(texts)
        return instant_embed_texts([t.replace("!", ".") for t in texts])

    monkeypatch.setattr("prefcurate.tasks.embed.embed_texts", embed)
    records = (_judged(BEST, "Green, purple and orange.") + _judged(BEST, "Black and white.")
               + _judged(BEST, "Black and white!") + _judged("Four.", "Five.", prompt="What is two plus two?"))
    source = tmp_path / "judged.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = tmp_path / "ds"
    run_import(dataset, source, load_mapping(None, {}))
    store = Store.open(dataset)
    config = load_config("examples/import_judgments.yaml", {
        "dataset": str(dataset), "filter.strategy": "judged", "filter.confidence.min_margin": 0.0})
    ctx = context_for(store.root, config, "r1")
    assert run_pending_units("filter", ctx, store) == 1
    assert run_pending_units("select", ctx, store) == 1
    outcome = store.query(
        "SELECT r.text AS rejected, s.reason FROM selections s JOIN pairs p USING (pair_id) "
        "JOIN responses r ON r.response_id = p.rejected_id WHERE s.run_id = 'r1'")
    assert dict(outcome.iter_rows()) == {
        "Black and white!": "near_duplicate", "Black and white.": "selected",  # both sides near: one is dropped
        "Five.": "selected", "Green, purple and orange.": "selected"}  # the same chosen, another rejected: kept
    # each distinct response once, as the score stage embeds it
    assert sorted(embedded) == sorted(f"Request: {p}\nResponse: {t}" for p, t in [
        (PROMPT, BEST), (PROMPT, "Green, purple and orange."), (PROMPT, "Black and white."),
        (PROMPT, "Black and white!"), ("What is two plus two?", "Four."), ("What is two plus two?", "Five.")])
    kinds = store.query("SELECT DISTINCT item_kind FROM embeddings")["item_kind"].to_list()
    assert kinds == ["response"]
    # another selection over the same pairs reads every vector from the embeddings table
    embedded.clear()
    ctx = context_for(store.root, load_config("examples/import_judgments.yaml", {
        "dataset": str(dataset), "filter.strategy": "judged", "filter.confidence.min_margin": 0.0,
        "select.budget": 2}), "r2")
    assert run_pending_units("select", ctx, store) == 1
    assert embedded == []
    assert store.query("SELECT count(*) AS n FROM selections WHERE run_id = 'r2' AND selected")["n"].item() == 2
