"""Imported judgments through filter -> select -> export, in this process (no LLM, no Prefect).

The example of the README: examples/import_judgments.jsonl imported with flags, then the
stages of examples/import_judgments.yaml run as a build runs them (plan, pending units,
run_unit, register, the run recorded). Only select's small embedding model and the
export's tokenizer are loaded; about 20 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from prefcurate.tasks.import_judgments import load_mapping

from prefcurate.config import load_config
from prefcurate.inference.models import default_model_dir, is_prepared
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for
from prefcurate.steps.import_judgments import run_import
from prefcurate.store import Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run_stage(stage: str, config, store: Store) -> dict:
    step = get_step(stage)
    run_id = store.start_run(stage, {})
    ctx = context_for(store.root, config, run_id)
    todo, _ = step.pending(ctx, step.plan(ctx))
    totals: dict = {}
    for unit in todo:
        result = step.run_unit(unit, ctx)
        store.register(result.shards, unit=(stage, result.unit_key), counts=result.counts)
        totals.update(result.counts)
    store.finish_run(run_id, "completed", totals, {})
    return totals


@pytest.mark.skipif(not is_prepared(default_model_dir()), reason="the export's default tokenizer is not prepared")
def test_imported_judgments_curate_and_export_without_generate_or_annotate(tmp_path):
    dataset = tmp_path / "imported"
    mapping = load_mapping(None, {"score_scale": [0, 10], "rating_scale": [1, 10]})
    imported = run_import(dataset, EXAMPLES / "import_judgments.jsonl", mapping)
    assert (imported["records"], imported["judgments"], imported["quarantined"]) == (17, 14, 3)
    config = load_config(EXAMPLES / "import_judgments.yaml", {"dataset": str(dataset)})
    assert "generate" not in config.stages and "annotate" not in config.stages
    store = Store.open(dataset)
    filtered = _run_stage("filter", config, store)
    # 8 prompts with one valid pair each; q8's api-judge flips position, q7 is a near-tie
    assert filtered["candidates"] == 8 and filtered["pairs"] == 6
    drops = dict(store.query("SELECT reason, count(*) AS n FROM current_filter_drops GROUP BY ALL").iter_rows())
    assert drops == {"position_flip": 1, "low_confidence": 1}
    selected = _run_stage("select", config, store)
    assert selected["selected"] == 6
    exported = _run_stage("export", config, store)
    assert exported["exported"] == 6 and exported["dropped"] == 0
    out = dataset / "export"
    rows = pl.read_ndjson(out / "data" / "train.jsonl")
    winners = dict(zip(rows["prompt"], rows["chosen"]))
    assert winners["Name the largest planet in the solar system."].startswith("Jupiter")
    assert winners["How many legs does a spider have?"] == "A spider has eight legs."
    conversational = [json.loads(line) for line in (out / "data" / "train_conversational.jsonl").read_text().splitlines()]
    with_system = [r for r in conversational if r["prompt"][0]["role"] == "system"]
    assert len(with_system) == 1 and with_system[0]["prompt"][0]["content"] == "You are a concise assistant."
    card = (out / "README.md").read_text()
    assert "| api-judge | 5 |" in card and "| annotator | 5 |" in card
    assert "verdict from a single presentation order (no judge saw both) | 0.1667 |" in card
    assert (out / "llamafactory" / "dataset_info.json").exists()
