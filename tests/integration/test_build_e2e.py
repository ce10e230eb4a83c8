"""The whole pipeline through the real CLI: Prefect flows, a Dask worker, in-process vLLM."""

import json
import subprocess
import sys

import polars as pl
import pytest

from prefcurate.sql import run_read_only
from prefcurate.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

TINY = [
    "ingest.limit=4", "ingest.shard_rows=2",
    "generate.generators.0.sampling.max_tokens=24", "generate.generators.1.sampling.max_tokens=24",
    "annotate.max_response_chars=300",
    "score.qurating.sample_size=6", "score.qurating.pairs_per_item=2",
    "score.qurating.criteria=[{name: educational_value, description: 'has more educational value'}]",
]


def _build(dataset, *extra):
    args = [sys.executable, "-m", "prefcurate.cli", "build", "-c", "examples/quickstart.yaml", "-d", str(dataset)]
    for item in TINY + list(extra):
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dataset = tmp_path_factory.mktemp("e2e") / "ds"
    first = _build(dataset)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return dataset


def test_every_stage_completed_and_curated_pairs_are_queryable(built):
    store = Store.open(built)
    runs = store.runs()
    stages = runs.filter(pl.col("kind") != "build")
    assert set(stages["kind"]) == {"ingest", "generate", "annotate", "filter", "score", "select", "export"}
    assert (runs["status"] == "completed").all()
    assert store.count("prompts") == 4
    assert store.count("responses") == 4 * 3  # gemma-warm n=2 + gemma-cool n=1
    methods = set(store.query("SELECT DISTINCT method FROM quality")["method"])
    assert "qurating_bt" in methods  # Bradley-Terry ratings of the judged sample
    curated = run_read_only(store, "SELECT prompt, chosen, rejected, p_chosen FROM curated_pairs")
    assert curated.height >= 1
    assert (curated["chosen"] != curated["rejected"]).all()


def test_both_orders_and_two_judges_are_recorded(built):
    store = Store.open(built)
    bias = run_read_only(store, "SELECT judge, position_flip_rate FROM judge_position_bias")
    assert set(bias["judge"]) == {"judge-brackets", "judge-reply"}
    judged = store.query("SELECT p_first_ab, p_first_ba, p_a FROM judgments WHERE valid")
    assert judged.height > 0
    expected = (judged["p_first_ab"] + 1 - judged["p_first_ba"]) / 2
    assert ((judged["p_a"] - expected).abs() < 1e-9).all()
    calibration = store.query("SELECT judge, gold_pairs, accuracy FROM judge_calibration")
    assert calibration.height == 2 and (calibration["gold_pairs"] > 0).all()


def test_export_loads_with_datasets(built):
    datasets = pytest.importorskip("datasets")
    export = built / "export"
    parquet = datasets.load_dataset("parquet", data_files=str(export / "data" / "train.parquet"), split="train")
    jsonl = datasets.load_dataset("json", data_files=str(export / "data" / "train.jsonl"), split="train")
    curated = Store.open(built).count("curated_pairs")
    assert len(parquet) == len(jsonl) == curated
    assert {"prompt", "chosen", "rejected"} <= set(parquet.column_names)
    assert (export / "README.md").read_text().startswith("---")


def test_rebuild_adds_nothing_and_skips_finished_units(built):
    store = Store.open(built)
    before = {t: store.count(t) for t in ("prompts", "responses", "judgments", "ratings")}
    again = _build(built)
    assert again.returncode == 0, again.stderr[-4000:]
    after = {t: store.count(t) for t in before}
    assert after == before
    latest = store.query(
        "SELECT kind, counts FROM runs WHERE kind IN ('generate', 'annotate') ORDER BY started_at DESC LIMIT 2"
    )
    for counts in latest["counts"]:
        parsed = json.loads(counts)
        assert parsed["units_skipped"] == parsed["units"]
