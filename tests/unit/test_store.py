import os
import time

import pytest

from prefcurate.steps.base import StageContext, Unit
from prefcurate.store import NotADatasetError, Store, write_shard
from tests.support.rows import prompts
from tests.support.steps import CountingIngestStep


def test_a_shard_is_invisible_until_registered(tmp_path):
    store = Store.init(tmp_path / "ds")
    shard = write_shard(store.root, "prompts", prompts(["a", "b"]), key="k1", run_id="r", stage="ingest")
    assert (store.root / shard.path).exists()
    assert store.count("prompts") == 0  # complete file, but not registered: does not exist
    assert store.register([shard]) == 1
    assert store.count("prompts") == 2
    assert store.register([shard]) == 0  # registering twice adds nothing
    assert store.count("prompts") == 2


def test_rows_carry_provenance(tmp_path):
    store = Store.init(tmp_path / "ds")
    store.commit("prompts", prompts(["a"]), key="k", run_id="run-7", stage="ingest")
    row = store.read("prompts").row(0, named=True)
    assert row["run_id"] == "run-7" and row["stage"] == "ingest" and row["code_version"]
    assert row["created_at"] is not None


def test_directory_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(NotADatasetError, match="not a prefcurate dataset"):
        Store.init(tmp_path / "other")
    with pytest.raises(NotADatasetError, match="not a prefcurate dataset"):
        Store.open(tmp_path / "other")
    with pytest.raises(NotADatasetError, match="does not exist"):
        Store.open(tmp_path / "nowhere")


def test_crash_between_shard_write_and_registration_resumes_without_recompute(tmp_path):
    store = Store.init(tmp_path / "ds")
    ctx = StageContext(str(store.root), {}, "run-1")
    step = CountingIngestStep()
    unit = Unit("ingest", "unit-1", ("prompts",))
    step.run_unit(unit, ctx)  # files and manifest complete...
    # ...and the coordinator crashed here, before store.register(result.shards)
    assert store.count("prompts") == 0
    todo, done = step.pending(ctx, [unit])
    assert todo == [unit] and done == []
    rerun = step.run_unit(unit, ctx)
    assert rerun.skipped and step.computed == 1  # adopted the complete files
    store.register(rerun.shards)
    assert store.count("prompts") == 3
    todo, done = step.pending(ctx, [unit])
    assert todo == [] and done == [unit]
    assert sorted(store.read("prompts")["prompt_id"].to_list()) == ["x", "y", "z"]


def test_half_written_temporary_files_are_never_visible(tmp_path):
    store = Store.init(tmp_path / "ds")
    (store.root / "prompts").mkdir(exist_ok=True)
    crashed = store.root / "prompts" / ".shard-k.parquet.123.tmp"
    crashed.write_bytes(b"PAR1 half")
    in_flight = store.root / "prompts" / ".shard-m.parquet.456.tmp"  # another run, writing now
    in_flight.write_bytes(b"PAR1 ha")
    an_hour_ago = time.time() - 3700
    os.utime(crashed, (an_hour_ago, an_hour_ago))
    assert store.count("prompts") == 0
    assert store.sweep_temporary_files() == 1
    assert not crashed.exists() and in_flight.exists()


def _view_sql(store: Store, table: str) -> str:
    with store.connect(read_only=True) as con:
        return con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [table]).fetchone()[0]


def test_views_read_by_name_only_where_shards_predate_the_schema(tmp_path):
    """Shards written with the current schema are read without ``union_by_name`` (which opens
    every file's footer on every query); a table holding shards from before a schema change
    keeps reading by name, so a column added since reads as NULL."""
    import pyarrow.parquet as pq

    from prefcurate import store as store_module
    from prefcurate.store import ShardInfo, conform, shard_relpath

    store = Store.init(tmp_path / "ds")
    store.commit("prompts", prompts(["a"]), key="new-1", run_id="r", stage="ingest")
    assert "union_by_name" not in _view_sql(store, "prompts")
    assert store.read("prompts", ["prompt_id"])["prompt_id"].to_list() == ["a"]

    # as if an earlier version wrote the catalog, with another prompts schema
    with store.connect() as con:
        con.execute("UPDATE _meta SET value = 'earlier' WHERE key IN ('schema', 'table_schema.prompts')")
    store_module._checked_catalogs.clear()
    store = Store.open(store.root)  # the upgrade marks prompts as holding older shards
    older = conform("prompts", prompts(["b"]), run_id="r", stage="ingest").drop_columns(["category"])
    pq.write_table(older, store.root / shard_relpath("prompts", "old-1"))
    store.register([ShardInfo("prompts", "old-1", shard_relpath("prompts", "old-1"), 1, "r", "ingest")])
    assert "union_by_name = true" in _view_sql(store, "prompts")
    assert "union_by_name" not in _view_sql(store, "responses")
    rows = store.read("prompts", ["prompt_id", "category"]).sort("prompt_id")
    assert rows["prompt_id"].to_list() == ["a", "b"] and rows["category"].to_list() == [None, None]


def test_a_stages_scratch_folder_lives_in_the_dataset_and_a_killed_runs_is_removed(tmp_path, monkeypatch):
    from prefcurate.steps import filter as filter_step
    from tests.unit.test_review import _dataset, _filter

    store = _dataset(tmp_path / "ds")
    left = store.root / "_tmp" / "filter-killed-run"  # what a SIGKILLed filter leaves
    (left / "responses").mkdir(parents=True)
    used = []
    made = filter_step._PartitionedShards.__init__

    def recording(self, store_, judgments, shard_prompts, folder):
        used.append((folder, folder.is_dir(), left.exists()))
        made(self, store_, judgments, shard_prompts, folder)

    monkeypatch.setattr(filter_step._PartitionedShards, "__init__", recording)
    assert _filter(store).height > 0
    [(folder, existed, leftover_during)] = used
    assert folder.parent == store.root / "_tmp" and folder.name.startswith("filter-") and existed
    assert not leftover_during and not folder.exists()  # the leftover went first; ours after the stage
    assert [p.name for p in (store.root / "_tmp").iterdir()] == []
