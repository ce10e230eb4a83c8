"""The whole pipeline through the real CLI: Prefect flows, a Dask worker, in-process vLLM."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from prefcurate.sql import run_read_only
from prefcurate.stages import STAGE_NAMES
from prefcurate.store import Store

BUILD_TIMEOUT_S = 2400  # ~6 min on a quiet 2-core machine; CI machines can be far slower
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 300)]

TINY = [
    "ingest.limit=4", "ingest.shard_rows=2",
    "generate.generators.0.sampling.max_tokens=24", "generate.generators.1.sampling.max_tokens=24",
    "annotate.max_response_chars=300", "annotate.calibration_pairs=6",
    "score.qurating.sample_size=6", "score.qurating.pairs_per_item=2",
    "score.qurating.criteria=[{name: educational_value, description: 'has more educational value'}]",
]


def _progress(log: Path, lines: int = 60) -> str:
    """The build's own lines (stage starts, units, engine starts, Prefect and Dask warnings,
    tracebacks), without vLLM's per-process chatter and progress bars."""
    noise = ("(", "Loading ", "INFO ", "WARNING ", "[W", "Triton ")
    kept = [line for line in log.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith(noise)]
    return "\n".join(kept[-lines:])


def _process_snapshot(session: int) -> str:
    """State, CPU, memory and age of every process in the build's session, as a tree."""
    listing = subprocess.run(
        ["ps", "-s", str(session), "-o", "pid,ppid,stat,pcpu,rss,etime,args", "--forest"],
        capture_output=True, text=True,
    )
    available = next((line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemAvailable")), "MemAvailable: ?")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return "\n".join([available, load]
                     + [line[:160] for line in listing.stdout.splitlines()])


def _build(dataset, *extra) -> subprocess.Popen:
    """Run `prefcurate build`; its output goes to a log beside the dataset, shown on failure."""
    args = [sys.executable, "-m", "prefcurate.cli", "build", "-c", "examples/quickstart.yaml", "-d", str(dataset)]
    for item in TINY + list(extra):
        args += ["--set", item]
    log = Path(f"{dataset}.build-{len(list(Path(dataset).parent.glob('*.log')))}.log")
    with log.open("w") as sink:
        # its own session, so a timeout takes the Dask worker and vLLM processes down with it
        build = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            build.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            processes = _process_snapshot(build.pid)  # spinning or waiting? how much memory?
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
            pytest.fail(f"build did not finish in {BUILD_TIMEOUT_S} s; its progress:\n{_progress(log)}\n"
                        f"its processes at the timeout:\n{processes}")
    if build.returncode != 0:
        pytest.fail(f"build exited {build.returncode}; its progress:\n{_progress(log)}")
    return build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dataset = tmp_path_factory.mktemp("e2e") / "ds"
    _build(dataset)
    return dataset


def test_every_stage_completed_and_curated_pairs_are_queryable(built):
    store = Store.open(built)
    runs = store.runs()
    stages = runs.filter(pl.col("kind") != "build")
    assert set(stages["kind"]) == set(STAGE_NAMES)
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


def test_every_model_request_is_metered(built):
    store = Store.open(built)
    metrics = store.query(
        "SELECT kind, count(*) AS requests, sum(tokens_out) AS tokens_out, bool_and(ok) AS all_ok, "
        "min(latency_s) AS fastest FROM request_metrics GROUP BY kind"
    )
    by_kind = {row["kind"]: row for row in metrics.to_dicts()}
    assert set(by_kind) == {"generate", "score_choices"}
    # both generators set a seed, so each sample is a request of its own (tasks/generate.py)
    assert by_kind["generate"]["requests"] == store.count("responses")
    generated = store.query("SELECT sum(tokens_out) AS n FROM responses")["n"][0]
    assert by_kind["generate"]["tokens_out"] == generated
    assert by_kind["generate"]["all_ok"] and by_kind["generate"]["fastest"] > 0
    # at least both orders of every judgment, the ratings and the calibration pairs
    verdicts = store.count("judgments") * 2 + store.count("ratings")
    assert by_kind["score_choices"]["requests"] >= verdicts


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
    stage_runs = store.runs().filter(pl.col("kind") != "build").height
    _build(built)
    after = {t: store.count(t) for t in before}
    assert after == before
    # planned before Prefect started, nothing pending: no stage ran, the build run says so
    assert store.runs().filter(pl.col("kind") != "build").height == stage_runs
    latest = store.query("SELECT counts, message FROM runs WHERE kind = 'build' ORDER BY started_at DESC LIMIT 1")
    assert latest["message"][0].startswith("nothing to do")
    per_stage = json.loads(latest["counts"][0])
    assert set(per_stage) == set(STAGE_NAMES)
    for counts in per_stage.values():
        assert counts["units_skipped"] == counts["units"] > 0
