"""Shards on an S3-compatible object store, against a real S3 server on loopback (moto's
server mode: real HTTP, real S3 API, in this process's threads). The catalog stays local."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from prefcurate.tasks.ingest import IngestParams

from prefcurate.object_store import ObjectShards, ObjectStoreError
from prefcurate.steps.base import StageContext, Unit
from prefcurate.steps.ingest import IngestStep, ingest_accounting
from prefcurate.store import Store
from tests.support.rows import prompts
from tests.support.steps import CountingIngestStep

BUCKET = "prefcurate-shards"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test-key", AWS_SECRET_ACCESS_KEY="test-secret", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    ObjectShards.parse(f"s3://{BUCKET}", endpoint).filesystem.mkdir(BUCKET)
    yield endpoint
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def store(tmp_path, s3_endpoint, request) -> Store:
    return Store.init(tmp_path / "ds", shards_uri=f"s3://{BUCKET}/{request.node.name}", endpoint_url=s3_endpoint)


def _objects(store: Store, table: str) -> list[str]:
    """Every object under the table's prefix, temporary ones included."""
    return sorted(name for name in store.objects._names(table))


def test_shards_live_on_the_object_store_and_sql_reads_them(store):
    first = store.write("prompts", prompts(["a", "b"]), key="k1", run_id="r", stage="ingest")
    assert _objects(store, "prompts") == ["shard-k1.parquet"]  # no temporary key left after the copy
    assert not (store.root / "prompts").exists()  # nothing on the local disk but the catalog
    assert store.count("prompts") == 0  # complete, but not registered: does not exist
    assert store.register([first]) == 1
    store.commit("prompts", prompts(["c"]), key="k2", run_id="r", stage="ingest")
    assert store.count("prompts") == 3
    assert store.query("SELECT string_agg(prompt_id, ',' ORDER BY prompt_id) AS ids, max(source_record) AS top "
                       "FROM prompts WHERE char_len = 6").row(0) == ("a,b,c", 2)
    assert store.read_shard(first.path)["prompt_id"].to_list() == ["a", "b"]
    # `prefcurate sql`'s sandbox (no file access of DuckDB's own) reads them too
    from prefcurate.sql import run_read_only

    assert run_read_only(store, "SELECT count(DISTINCT prompt_id) AS n FROM prompts")["n"].to_list() == [3]
    assert all(s["path"].startswith("prompts/shard-") for s in store.shards("prompts"))  # relative, as locally
    # a second process (a reader) opening the dataset finds the store from prefcurate.json
    again = Store.open(store.root)
    assert again.objects == store.objects and again.count("prompts") == 3
    assert json.loads((store.root / "prefcurate.json").read_text())["shards"]["uri"] == store.objects.uri


def test_ids_already_present_are_dropped_from_a_new_object_shard(store):
    store.commit("prompts", prompts(["a", "b"]), key="k1", run_id="r", stage="ingest")
    second = store.write("prompts", prompts(["b", "c"]), key="k2", run_id="r", stage="ingest")
    assert store.register([second]) == 1
    assert sorted(store.read("prompts")["prompt_id"].to_list()) == ["a", "b", "c"]
    assert store.read_shard(second.path)["prompt_id"].to_list() == ["c"]  # rewritten on the store


def test_crash_between_upload_and_registration_is_invisible_and_the_rerun_duplicates_nothing(store, monkeypatch):
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step, unit = CountingIngestStep(), Unit("ingest", "unit-1", ("prompts",))

    def killed(self, temporary, relpath):
        raise KeyboardInterrupt("killed between upload and copy")

    with monkeypatch.context() as patched:
        patched.setattr(ObjectShards, "publish", killed)
        with pytest.raises(KeyboardInterrupt):
            step.run_unit(unit, ctx)
    (leftover,) = _objects(store, "prompts")
    assert leftover.startswith(".shard-") and leftover.endswith(".tmp")  # the upload is there...
    assert store.count("prompts") == 0 and store.shards("prompts") == []  # ...and invisible
    assert step.pending(ctx, [unit])[0] == [unit]

    result = step.run_unit(unit, ctx)  # the unit re-runs in full (no manifest was written)
    assert step.computed == 2 and not result.skipped
    store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
    assert sorted(store.read("prompts")["prompt_id"].to_list()) == ["x", "y", "z"]
    assert step.pending(ctx, [unit]) == ([], [unit])

    assert store.sweep_temporary_files() == 0  # young: it may be a unit writing right now
    assert store.sweep_temporary_files(older_than_s=0) == 1
    assert _objects(store, "prompts") == [f"shard-{unit.shard_key('prompts')}.parquet"]
    assert store.count("prompts") == 3


def test_crash_after_the_copy_before_registration_is_adopted(store):
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step, unit = CountingIngestStep(), Unit("ingest", "unit-2", ("prompts",))
    step.run_unit(unit, ctx)  # final object and manifest complete; the coordinator died here
    assert store.count("prompts") == 0
    rerun = step.run_unit(unit, ctx)
    assert rerun.skipped and step.computed == 1  # adopted from the object store, not recomputed
    store.register(rerun.shards)
    assert store.count("prompts") == 3
    assert store.adopt_complete_shard("prompts", unit.shard_key("prompts"), "run-1", "ingest").rows == 3


def test_ingest_stage_over_the_object_store_is_idempotent(store, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"prompt number {i % 40}"}) + "\n"
                              for i in range(50)) + json.dumps({"id": "bad", "prompt": 7}) + "\n")
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step = IngestStep(IngestParams(path=str(source), shard_rows=15))

    def ingest() -> int:
        todo, _ = step.pending(ctx, step.plan(ctx))
        for unit in todo:
            result = step.run_unit(unit, ctx)
            store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
        return len(todo)

    assert ingest() == 1
    assert ingest() == 0  # a re-run finds the unit registered
    assert store.count("prompts") == 40 and store.count("quarantine") == 1
    assert len(store.objects.list_shards("prompts")) == 3
    counts = ingest_accounting(store).row(0, named=True)
    assert (counts["rows_read"], counts["accepted"], counts["quarantined"], counts["duplicates"]) == (51, 40, 1, 10)


def test_a_batch_of_files_over_the_object_store(store, tmp_path):
    """Small files in one batch unit: the later file sees the earlier one's uploaded (not yet
    registered) prompts, so a repeated prompt is a duplicate and a reused id a conflict."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"prompt number {i}"}) + "\n"
                                            for i in range(20)))
    (folder / "b.jsonl").write_text(json.dumps({"id": "s3", "prompt": "another text"}) + "\n"
                                    + json.dumps({"id": "t1", "prompt": "prompt number 1"}) + "\n"
                                    + json.dumps({"id": "t2", "prompt": "a new prompt"}) + "\n")
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step = IngestStep(IngestParams(path=str(folder)))
    todo, _ = step.pending(ctx, step.plan(ctx))
    (batch,) = step.batched(todo)
    result = step.run_unit(batch, ctx)
    assert len(result.parts) == 2
    store.register_units("ingest", result.registrations())
    assert store.count("prompts") == 21
    assert store.query("SELECT source_record FROM quarantine WHERE reason = 'duplicate_id_conflict'").rows() == [(1,)]
    counts = ingest_accounting(store).row(0, named=True)
    assert (counts["rows_read"], counts["accepted"], counts["quarantined"], counts["duplicates"]) == (23, 21, 1, 1)
    assert step.pending(ctx, step.plan(ctx))[0] == []


def test_a_store_that_cannot_be_reached_is_refused_at_init(tmp_path, s3_endpoint):
    with pytest.raises(ObjectStoreError, match="s3://no-such-bucket"):
        Store.init(tmp_path / "ds", shards_uri="s3://no-such-bucket/x", endpoint_url=s3_endpoint)
    with pytest.raises(ObjectStoreError, match="expected s3://"):
        Store.init(tmp_path / "ds2", shards_uri="gs://bucket/x")


def test_prefcurate_ingest_over_the_object_store(tmp_path, s3_endpoint):
    """The real command line (init, ingest through Prefect with the sequential executor, sql)
    against the S3 server: the shards are there, none on the local disk."""
    import subprocess
    import sys

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"prompt number {i}"}) + "\n" for i in range(30)))
    dataset = tmp_path / "ds"
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect")}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "prefcurate.cli", *args], env=env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "shards at s3://" in cli("init", str(dataset), "--shards-uri", f"s3://{BUCKET}/cli",
                                    "--endpoint-url", s3_endpoint)
    cli("ingest", str(source), "-d", str(dataset), "--set", "executor.kind=sequential", "--set", "ingest.shard_rows=10")
    store = Store.open(dataset)
    assert store.count("prompts") == 30
    assert len(store.objects.list_shards("prompts")) == 3
    assert not list(dataset.rglob("*.parquet"))
    assert "30" in cli("sql", "-d", str(dataset), "SELECT count(*) AS n FROM prompts")


@pytest.mark.slow
def test_a_whole_build_over_the_object_store_matches_one_on_local_disk(tmp_path, s3_endpoint, monkeypatch):
    """Every stage, unit by unit as a build runs them (no Prefect), with the instant engine
    double (tests/support: no model; what is under test is where the shards go)."""
    import yaml
    from prefcurate.tasks import embed

    from prefcurate.config import load_config
    from prefcurate.inference import pools
    from tests.support.instant_engine import InstantEngine, instant_embed_texts
    from tests.unit.stage_runs import run_every_stage

    monkeypatch.setattr(pools, "open_engine", lambda name, config=None: InstantEngine(f"instant-{name}"))
    monkeypatch.setattr(embed, "embed_texts", instant_embed_texts)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"explain topic {i} in steps"}) + "\n"
                               for i in range(60)))
    settings = yaml.safe_load((Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text())
    settings["ingest"].pop("limit", None)
    settings["ingest"].update(path=str(prompts), shard_rows=20)
    settings.setdefault("filter", {})["calibration"] = {"gate": "warn"}  # hashed verdicts: chance on gold
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(str(tmp_path / "config.yaml"))

    def build(store: Store) -> dict[str, int]:
        return run_every_stage(store, config, str(tmp_path / "config.yaml"))

    remote = Store.init(tmp_path / "remote", shards_uri=f"s3://{BUCKET}/build", endpoint_url=s3_endpoint)
    local = Store.init(tmp_path / "local")
    assert build(remote) == build(local)
    rerun = build(remote)
    assert rerun == build(local), rerun  # a re-run finds the same units registered as on local disk
    assert not any(rerun.values()), rerun  # the export too: its inputs and files are unchanged
    for table in ("prompts", "responses", "judgments", "pairs", "selections"):
        assert remote.count(table) == local.count(table) > 0, table
    chosen = "SELECT pair_id, prompt_id, chosen_id, rejected_id FROM pairs ORDER BY ALL"
    assert remote.query(chosen).equals(local.query(chosen))
    assert not [p for p in (tmp_path / "remote").rglob("*.parquet") if "export" not in p.parts]


def test_repair_recreates_the_catalog_from_the_manifests_and_the_object_store(store):
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step = CountingIngestStep()
    for key in ("unit-a", "unit-b"):
        unit = Unit("ingest", key, ("prompts",))
        result = step.run_unit(unit, ctx)
        if key == "unit-a":  # unit-b's coordinator died before registering it
            store.register(result.shards, unit=("ingest", key), counts=result.counts)
    store.write("prompts", prompts(["q"]), key="orphan", run_id="r", stage="ingest")  # no manifest lists it
    store.catalog.write_bytes(b"not a catalog")
    done = Store.repair(store.root)
    assert done["units"] == 2 and done["shards_registered"] == 2
    assert done["unlisted_shards"] == ["prompts/shard-orphan.parquet"]
    assert sorted(Store.open(store.root).read("prompts")["prompt_id"].to_list()) == ["x", "y", "z"]  # deduplicated
