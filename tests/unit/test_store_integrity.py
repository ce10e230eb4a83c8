"""The store under faults: a broken catalog, an older catalog, a lost catalog (repair), two
writers at once, and a coordinator killed between registration and the end of its run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import polars as pl
import pytest
from prefcurate.schemas.tables import TABLES
from prefcurate.schemas.views import REPORT_VIEWS
from prefcurate.tasks.ingest import IngestError, IngestParams
from typer.testing import CliRunner

from prefcurate import store as store_module
from prefcurate.cli import app
from prefcurate.steps import ingest as ingest_step
from prefcurate.steps.base import StageContext
from prefcurate.steps.ingest import IngestStep, ingest_accounting
from prefcurate.store import CATALOG, CatalogError, DatasetBusyError, NotADatasetError, Store
from tests.support.catalog_opens import count_catalog_opens
from tests.unit.bad_rows import write_bad_file


def _ingest(store: Store, path, run_id: str = "run-1", **params) -> int:
    """The ingest stage's coordinator work without Prefect: plan, run each unit, register."""
    ctx = StageContext(str(store.root), {"contracts": False}, run_id)
    step = IngestStep(IngestParams(path=path if isinstance(path, list) else str(path), **params))
    store.start_run("ingest", {}, run_id=run_id)
    new = 0
    todo, _ = step.pending(ctx, step.plan(ctx))  # as run_stage: registered units are skipped
    for unit in todo:
        result = step.run_unit(unit, ctx)
        new += store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
    store.finish_run(run_id, "completed", {})
    return new


def _jsonl(path, ids):
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"prompt number {i}"}) + "\n" for i in ids))
    return path


def _snapshot(store: Store) -> dict[str, list]:
    """Every row of every table and report view, in a stable order."""
    snapshot = {}
    for name in [*TABLES, *REPORT_VIEWS]:
        frame = store.query(f"SELECT * FROM {name}")
        columns = [c for c in frame.columns if frame.schema[c] != pl.Array(pl.Float32, 384)]
        snapshot[name] = sorted(map(repr, frame.select(columns).rows()))
    return snapshot


def _accounting(store: Store) -> dict:
    return ingest_accounting(store).row(0, named=True)


# ---- a broken catalog ------------------------------------------------------------------------
def _break(root, kind: str, tmp_path) -> None:
    catalog = root / CATALOG
    if kind == "csv":
        catalog.write_text("a\n1\n")
    elif kind == "truncated":
        catalog.write_bytes(catalog.read_bytes()[:5000])
    elif kind == "zero_bytes":
        catalog.write_bytes(b"")
    elif kind == "foreign_duckdb":
        catalog.unlink()
        with duckdb.connect(str(catalog)) as con:
            con.execute("CREATE TABLE mine (a INT)")
    elif kind == "another_datasets":
        other = Store.init(tmp_path / "other")
        catalog.write_bytes(other.catalog.read_bytes())
    elif kind == "missing":
        catalog.unlink()


BROKEN = ["csv", "truncated", "zero_bytes", "foreign_duckdb", "another_datasets", "missing"]
COMMANDS = [
    ["status"], ["sql", "SELECT count(*) FROM prompts"], ["build"], ["run", "filter"],
    ["ingest", "bundled"], ["export"],
]


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_catalog_is_a_clear_error_for_every_command(tmp_path, kind):
    store = Store.init(tmp_path / "ds")
    _ingest(store, write_bad_file(tmp_path), max_chars=200)
    _break(store.root, kind, tmp_path)
    with pytest.raises(CatalogError, match="repair"):
        Store.open(store.root)
    for command in COMMANDS:
        result = CliRunner().invoke(app, [*command, "-d", str(store.root)])
        output = result.output
        assert result.exit_code == 2, (command, output, result.exception)
        assert "error:" in output and str(store.catalog) in output, (command, output)
        assert f"prefcurate repair -d {store.root}" in output and "Traceback" not in output
    assert not list(store.root.glob("prompts/.*.tmp"))


def test_a_newer_dataset_format_is_refused_by_name(tmp_path):
    store = Store.init(tmp_path / "ds")
    (store.root / "prefcurate.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(NotADatasetError, match="dataset format 99.*reads format 1"):
        Store.open(store.root)


# ---- a catalog of an earlier version ----------------------------------------------------------
def test_a_catalog_of_an_earlier_version_opens_and_status_works(tmp_path):
    store = Store.init(tmp_path / "ds")
    _ingest(store, write_bad_file(tmp_path), max_chars=200)
    before = _snapshot(store)
    with duckdb.connect(str(store.catalog)) as con:  # what an earlier version left
        con.execute("DROP VIEW ratings; DROP TABLE _empty_ratings; DROP TABLE unit_counts")
        con.execute("DROP VIEW curated_pairs")
        con.execute("ALTER TABLE runs DROP COLUMN process_started")
        con.execute("DELETE FROM _meta WHERE key = 'schema'")
    store_module._checked_catalogs.clear()  # a new process
    reopened = Store.open(store.root)
    assert reopened.count("ratings") == 0 and "process_started" in reopened.runs().columns
    after = _snapshot(reopened)
    assert after == before
    result = CliRunner().invoke(app, ["status", "-d", str(store.root)])
    assert result.exit_code == 0, result.output
    assert "rows per table" in result.output and "ratings" in result.output


# ---- repair ----------------------------------------------------------------------------------
def test_repair_after_the_catalog_is_deleted_restores_every_row(tmp_path):
    store = Store.init(tmp_path / "ds")
    _ingest(store, write_bad_file(tmp_path), run_id="run-bad", max_chars=200)
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(300)), run_id="run-a", shard_rows=70)
    _ingest(store, _jsonl(tmp_path / "b.jsonl", range(200, 400)), run_id="run-b", shard_rows=70)
    (store.root / "prompts" / ".shard-x.parquet.123.tmp").write_bytes(b"PAR1 half")  # a crashed write
    before, accounting = _snapshot(store), _accounting(store)
    assert len(before["prompts"]) == 400 + 3  # the bad file accepts 3
    store.catalog.unlink()
    result = CliRunner().invoke(app, ["repair", "-d", str(store.root)])
    assert result.exit_code == 0, result.output
    repaired = Store.open(store.root)
    after = _snapshot(repaired)
    assert after == before  # every table and report view, row for row
    assert _accounting(repaired) == accounting
    assert set(repaired.runs()["status"]) == {"recovered"}
    assert set(repaired.runs()["run_id"]) == {"run-bad", "run-a", "run-b"}
    assert repaired.query("SELECT count(*) AS n FROM _shards WHERE path LIKE '%.tmp'")["n"][0] == 0
    # the prompt key index is rebuilt with the registry: one key per prompt, and it finds them
    assert repaired.query("SELECT count(*) AS n FROM _prompt_keys")["n"][0] == 403
    _ingest(repaired, _jsonl(tmp_path / "c.jsonl", range(390, 410)), run_id="run-c")
    assert repaired.count("prompts") == 413


def test_repair_moves_a_corrupt_catalog_aside_and_deletes_nothing(tmp_path):
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(50)))
    before = _snapshot(store)
    files = {p for p in store.root.rglob("*") if p.is_file() and p.name != CATALOG}
    store.catalog.write_text("a\n1\n")
    done = Store.repair(store.root)
    assert len(done["moved_aside"]) == 1 and done["moved_aside"][0].startswith("catalog.duckdb.broken-")
    assert (store.root / done["moved_aside"][0]).read_text() == "a\n1\n"
    assert files <= {p for p in store.root.rglob("*") if p.is_file()}
    assert _snapshot(Store.open(store.root)) == before


# ---- one writer per dataset ----------------------------------------------------------------
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from prefcurate.store import Store
    store = Store.open(sys.argv[1])
    with store.writer_lock("prefcurate ingest big.jsonl"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_told_who_holds_the_dataset(tmp_path):
    store = Store.init(tmp_path / "ds")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatasetBusyError, match=rf"dataset busy: .* held by pid {holder.pid} "
                                                   r"\(prefcurate ingest big.jsonl, since .*UTC\)"):
            with store.writer_lock("prefcurate build", wait=False):
                pass
        told = []
        with pytest.raises(DatasetBusyError, match="gave up waiting after 1 s"):
            with store.writer_lock("prefcurate build", timeout_s=1, notify=told.append):
                pass
        assert len(told) == 1 and "waiting for it to finish" in told[0]
        result = CliRunner().invoke(app, ["ingest", "bundled", "-d", str(store.root), "--no-wait"])
        assert result.exit_code == 2 and f"held by pid {holder.pid}" in result.output
        # readers never take the lock
        assert CliRunner().invoke(app, ["status", "-d", str(store.root)]).exit_code == 0
        assert CliRunner().invoke(app, ["sql", "-d", str(store.root), "SELECT 1"]).exit_code == 0
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the next writer goes straight in
    with store.writer_lock("prefcurate build", wait=False):
        pass


def test_registration_never_duplicates_an_id_even_without_the_lock(tmp_path):
    """Two ingests that both planned against the same (empty) dataset, as without the lock."""
    store = Store.init(tmp_path / "ds")
    params_a = IngestParams(path=str(_jsonl(tmp_path / "a.jsonl", range(300))), shard_rows=100)
    params_b = IngestParams(path=str(_jsonl(tmp_path / "b.jsonl", range(150, 400))), shard_rows=100)
    ctx = StageContext(str(store.root), {"contracts": False}, "r")
    results = []
    for params in (params_a, params_b):  # both compute before either registers
        step = IngestStep(params)
        unit = step.plan(ctx)[0]
        results.append((unit, step.run_unit(unit, ctx)))
    for unit, result in results:
        store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
    prompts = store.read("prompts")
    assert prompts.height == prompts["prompt_id"].n_unique() == 400
    accounting = _accounting(store)
    assert accounting == {"rows_read": 550, "accepted": 400, "quarantined": 0, "duplicates": 150}
    # the same unit registered a second time (the same file twice at once) counts once
    unit, result = results[0]
    assert store.register(result.shards, unit=("ingest", unit.key), counts=result.counts) == 0
    assert _accounting(store) == accounting


@pytest.fixture(params=["xxh3 keys", "colliding keys"])
def key_index(request, monkeypatch):
    """The prompt key index as shipped, and with keys that collide for most ids: a key is a
    filter, so every answer must stay exact."""
    if request.param == "colliding keys":
        def few_keys(frame):
            return frame.with_columns(pl.col("prompt_id").str.len_bytes().cast(pl.UInt64).mod(2).alias("prompt_key"),
                                      pl.col("source_id").str.len_bytes().cast(pl.UInt64).mod(2).alias("source_key"))
        monkeypatch.setattr(store_module, "prompt_keys", few_keys)
    return request.param


def test_a_file_is_checked_against_the_dataset_through_the_rows_sharing_its_ids(tmp_path, key_index):
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(5)), run_id="a")
    later = tmp_path / "b.jsonl"
    later.write_text("".join(json.dumps(record) + "\n" for record in [
        {"id": "s2", "prompt": "prompt number 2"},  # already in the dataset
        {"prompt": "prompt number 4"},  # the same text under no id: a duplicate too
        {"id": "s3", "prompt": "another text"},  # s3 is taken by another prompt
        {"id": "s9", "prompt": "prompt number 9"},
    ]))
    _ingest(store, later, run_id="b")
    assert sorted(store.read("prompts")["source_id"].to_list()) == ["s0", "s1", "s2", "s3", "s4", "s9"]
    conflict = store.read("quarantine").row(0, named=True)
    assert (conflict["source_record"], conflict["reason"]) == (3, "duplicate_id_conflict")
    assert store.recorded_units("ingest")[IngestStep(IngestParams(path=str(later))).plan(
        StageContext(str(store.root), {}, "c"))[0].key]["duplicates"] == 2
    # the unit is handed only the dataset's rows that share a prompt id or a source id with it
    prompts = store.read("prompts").sort("source_id")
    candidates = pl.DataFrame({"prompt_id": [prompts["prompt_id"][0], "0" * 16, "1" * 16],
                               "source_id": [None, "s1", "s7"]})
    matches = store.prompts_sharing_an_id(candidates)
    assert sorted(matches["source_id"].to_list()) == ["s0", "s1"]


def _folder_of_prompts(folder):
    (folder / "sub").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", range(4))
    pl.DataFrame({"id": ["s2", "s3", "s5"],  # s2 as in a.jsonl (a duplicate); s3 for another text
                  "prompt": ["prompt number 2", "not prompt number 3", "prompt number 5"]}).write_parquet(
        folder / "sub" / "b.parquet")
    (folder / "c.csv").write_text("id,prompt\ns6,prompt number 6\n")
    (folder / "README.md").write_text("not prompts\n")
    _jsonl(folder / ".hidden.jsonl", range(100, 103))
    return folder


def test_a_folder_is_ingested_file_by_file_and_a_file_added_later_alone(tmp_path):
    folder = _folder_of_prompts(tmp_path / "dumps")
    store = Store.init(tmp_path / "ds")
    ctx = StageContext(str(store.root), {}, "plan")
    units = IngestStep(IngestParams(path=str(folder))).plan(ctx)
    assert [unit.payload["params"]["path"] for unit in units] == [
        str(folder / "a.jsonl"), str(folder / "c.csv"), str(folder / "sub" / "b.parquet")]
    assert _ingest(store, folder, run_id="first") == 6
    assert sorted(store.read("prompts")["source_id"].to_list()) == ["s0", "s1", "s2", "s3", "s5", "s6"]
    (conflict,) = store.read("quarantine").to_dicts()  # s3 across files, found in file order
    assert (conflict["source_file"], conflict["reason"]) == (str(folder / "sub" / "b.parquet"),
                                                            "duplicate_id_conflict")
    assert _accounting(store) == {"rows_read": 8, "accepted": 6, "quarantined": 1, "duplicates": 1}
    _jsonl(folder / "d.jsonl", range(5, 9))  # s5 again (a duplicate), s7, s8 new; s6 clashes with c.csv
    step = IngestStep(IngestParams(path=str(folder)))
    todo, done = step.pending(ctx, step.plan(ctx))
    assert ([u.payload["params"]["path"] for u in todo], len(done)) == ([str(folder / "d.jsonl")], 3)
    assert _ingest(store, folder, run_id="second") == 2
    assert _accounting(store) == {"rows_read": 12, "accepted": 8, "quarantined": 1, "duplicates": 3}
    # a glob pattern names its matches; the files it shares with the folder are already done
    pattern = IngestStep(IngestParams(path=str(folder / "*.jsonl")))
    assert [u.key for u in pattern.plan(ctx)] == [u.key for u in step.plan(ctx) if u.payload["params"]["path"]
                                                   .endswith(".jsonl")]
    # several paths (a shell-expanded pattern): their files in the order given, each once
    several = IngestStep(IngestParams(path=[str(folder / "d.jsonl"), str(folder / "sub"), str(folder / "d.jsonl")]))
    assert [u.payload["params"]["path"] for u in several.plan(ctx)] == [str(folder / "d.jsonl"),
                                                                        str(folder / "sub" / "b.parquet")]
    assert _ingest(store, [str(folder / "d.jsonl"), str(folder / "sub")], run_id="third") == 0
    # a dataset inside the folder: its own shards are not prompts
    inner = Store.init(folder / "ds")
    _ingest(inner, folder / "a.jsonl", run_id="inner")
    inner_ctx = StageContext(str(inner.root), {}, "plan")
    assert list((folder / "ds").rglob("*.parquet"))
    assert [u.payload["params"]["path"] for u in step.plan(inner_ctx)] == [
        str(folder / name) for name in ("a.jsonl", "c.csv", "d.jsonl", "sub/b.parquet")]


def _ingest_in_batches(store: Store, path, run_id: str) -> list[int]:
    """As :func:`_ingest`, with the pending files in batch units as a stage flow runs them;
    returns the files per unit."""
    ctx = StageContext(str(store.root), {"contracts": False}, run_id)
    step = IngestStep(IngestParams(path=str(path)))
    store.start_run("ingest", {}, run_id=run_id)
    todo, _ = step.pending(ctx, step.plan(ctx))
    sizes = []
    for unit in step.batched(todo):
        result = step.run_unit(unit, ctx)
        store.register_units("ingest", result.registrations())
        sizes.append(len(result.parts) or 1)
    store.finish_run(run_id, "completed", {})
    return sizes


def test_small_files_in_batch_units_ingest_exactly_as_file_by_file(tmp_path, monkeypatch):
    """Duplicates and id conflicts across files of one batch, and against the dataset, come
    out as they do one file at a time; each file is recorded under its own key."""
    folder = _folder_of_prompts(tmp_path / "dumps")
    for n in range(3):
        _jsonl(folder / f"more-{n}.jsonl", range(4 * n, 4 * n + 6))  # overlapping each other and a.jsonl
    # s1 clashes with a.jsonl in its batch, s7 with more-1.jsonl in the next one
    (folder / "clash.csv").write_text("id,prompt\ns1,not prompt number 1\ns7,not prompt number 7\n")
    one, batched = Store.init(tmp_path / "one"), Store.init(tmp_path / "batched")
    _ingest(one, folder, run_id="first")
    monkeypatch.setattr(ingest_step, "BATCH_FILES", 4)
    assert _ingest_in_batches(batched, folder, "first") == [4, 3]
    for table in ("prompts", "quarantine"):
        rows = [store.query(f"SELECT * EXCLUDE (created_at) FROM {table} ORDER BY ALL").rows() for store in (one, batched)]
        assert rows[0] == rows[1] and rows[0]
    conflicts = batched.query("SELECT source_file, source_record FROM quarantine WHERE reason = 'duplicate_id_conflict'")
    assert sorted(conflicts.rows()) == [(str(folder / "clash.csv"), 1), (str(folder / "more-1.jsonl"), 4),
                                        (str(folder / "sub" / "b.parquet"), 2)]
    assert _accounting(batched) == _accounting(one)
    assert batched.recorded_units("ingest") == {key: counts for key, counts in one.recorded_units("ingest").items()}
    # every file is done: nothing pending, nothing read again
    (folder / "late.jsonl").write_text(json.dumps({"id": "late", "prompt": "a late prompt"}) + "\n")
    assert _ingest_in_batches(batched, folder, "second") == [1]
    assert batched.count("prompts") == one.count("prompts") + 1


def test_a_batch_that_fails_midway_resumes_from_its_finished_files(tmp_path, monkeypatch):
    """A batch is registered all at once or not at all; on the re-run its files that were
    complete are adopted from their manifests, not read again, and nothing doubles."""
    folder = _folder_of_prompts(tmp_path / "dumps")
    reference, crashed = Store.init(tmp_path / "reference"), Store.init(tmp_path / "crashed")
    _ingest_in_batches(reference, folder, "first")
    read, ingest_file = [], ingest_step.ingest_file

    def failing_on_the_csv(params, lookup):
        read.append(Path(params.path).name)
        if params.path.endswith(".csv") and read.count("c.csv") == 1:
            raise OSError("the disk went away")
        return ingest_file(params, lookup)

    monkeypatch.setattr(ingest_step, "ingest_file", failing_on_the_csv)
    with pytest.raises(OSError, match="went away"):
        _ingest_in_batches(crashed, folder, "first")
    assert crashed.count("prompts") == 0 and crashed.recorded_units("ingest") == {}
    assert _ingest_in_batches(crashed, folder, "first") == [3]
    assert read == ["a.jsonl", "c.csv", "c.csv", "b.parquet"]  # a.jsonl adopted, not read again
    for table in ("prompts", "quarantine"):
        rows = [store.query(f"SELECT * EXCLUDE (created_at) FROM {table} ORDER BY ALL").rows()
                for store in (reference, crashed)]
        assert rows[0] == rows[1]
    assert _accounting(crashed) == _accounting(reference)


def test_a_batch_keeps_to_its_bounds_and_a_large_file_stays_alone(tmp_path, monkeypatch):
    folder = tmp_path / "dumps"
    folder.mkdir()
    for n, rows in enumerate([5, 5, 400, 5, 5, 5]):
        _jsonl(folder / f"{n}.jsonl", range(1000 * n, 1000 * n + rows))
    ctx = StageContext(str(tmp_path / "ds"), {}, "plan")
    step = IngestStep(IngestParams(path=str(folder)))
    units = step.plan(ctx)
    monkeypatch.setattr(ingest_step, "BATCH_BYTES", (folder / "2.jsonl").stat().st_size - 1)
    monkeypatch.setattr(ingest_step, "BATCH_FILES", 2)
    batches = step.batched(units)
    assert [[member.key for member in step.members(unit)] for unit in batches] == [
        [units[0].key, units[1].key], [units[2].key], [units[3].key, units[4].key], [units[5].key]]
    assert step.batched(units[2:3]) == units[2:3]  # one file: its own unit, as planned


def test_a_folder_or_pattern_that_names_no_file_or_a_limit_over_several_is_refused(tmp_path):
    ctx = StageContext(str(tmp_path / "ds"), {}, "plan")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(IngestError, match="holds no .jsonl"):
        IngestStep(IngestParams(path=str(tmp_path / "empty"))).plan(ctx)
    with pytest.raises(IngestError, match="no file matches"):
        IngestStep(IngestParams(path=str(tmp_path / "nowhere" / "*.jsonl"))).plan(ctx)
    folder = _folder_of_prompts(tmp_path / "dumps")
    with pytest.raises(IngestError, match="ingest.limit counts the prompts of one file"):
        IngestStep(IngestParams(path=str(folder), limit=3)).plan(ctx)
    assert len(IngestStep(IngestParams(path=str(folder / "a.jsonl"), limit=3)).plan(ctx)) == 1
    with pytest.raises(IngestError, match="holds no .* file outside the dataset"):
        IngestStep(IngestParams(path=str(folder / "sub"))).plan(StageContext(str(folder / "sub"), {}, "plan"))



def test_new_prompts_are_checked_and_registered_without_reading_the_tables_shards(tmp_path):
    """The key index answers for prompts the dataset has not seen: with the dataset's shard
    files unreadable, a file of new prompts still ingests (a scan would fail on them). (The
    view's first file stays: DuckDB reads its footer for the view's columns.)"""
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(50)), run_id="a", shard_rows=10)
    shards = [store.root / shard["path"] for shard in store.shards("prompts")[1:]]
    assert len(shards) == 4
    saved = {shard: shard.read_bytes() for shard in shards}
    for shard in shards:
        shard.write_bytes(b"not parquet")
    _ingest(store, _jsonl(tmp_path / "b.jsonl", range(50, 80)), run_id="b")
    for shard, data in saved.items():
        shard.write_bytes(data)
    prompts = store.read("prompts")
    assert prompts.height == prompts["prompt_id"].n_unique() == 80
    # a file that shares ids with the dataset is checked against its rows: duplicates found
    _ingest(store, _jsonl(tmp_path / "c.jsonl", range(70, 90)), run_id="c")
    assert store.count("prompts") == 90 and _accounting(store)["duplicates"] == 10


def test_a_catalog_without_the_key_index_gets_it_filled_on_open(tmp_path):
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(40)), run_id="a")
    with duckdb.connect(str(store.catalog)) as con:  # what a version before the index left
        con.execute("DROP TABLE _prompt_keys; DELETE FROM _meta WHERE key IN ('schema', 'prompt_keys')")
    store_module._checked_catalogs.clear()  # a new process
    reopened = Store.open(store.root)
    assert reopened.query("SELECT count(*) AS n FROM _prompt_keys")["n"].item() == 40
    later = tmp_path / "b.jsonl"
    later.write_text("".join(json.dumps(record) + "\n" for record in [
        {"id": "s2", "prompt": "prompt number 2"}, {"id": "s3", "prompt": "another text"},
        {"id": "s99", "prompt": "prompt number 99"}]))
    _ingest(reopened, later, run_id="b")
    assert reopened.count("prompts") == 41
    assert reopened.read("quarantine")["reason"].to_list() == ["duplicate_id_conflict"]


def test_one_registration_keeps_the_first_shard_of_an_id_and_rewrites_only_the_later_ones(tmp_path, key_index):
    store = Store.init(tmp_path / "ds")

    def shard(key: str, ids: list[str]):
        frame = pl.DataFrame({"prompt_id": ids, "prompt": ids, "source_file": "f", "source_record": range(len(ids)),
                              "char_len": [1] * len(ids)}, schema_overrides={"char_len": pl.Int32})
        return store.write("prompts", frame, key=key, run_id="r", stage="ingest")

    store.commit("prompts", pl.DataFrame({"prompt_id": ["a"], "prompt": ["a"], "source_file": "f", "source_record": [0],
                                          "char_len": [1]}, schema_overrides={"char_len": pl.Int32}),
                 key="k0", run_id="r", stage="ingest")
    first, second, third = shard("k1", ["a", "b", "c"]), shard("k2", ["c", "d"]), shard("k3", ["e"])
    untouched = (store.root / third.path).stat().st_mtime_ns
    counts = {"rows_read": 6, "accepted": 6, "duplicates": 0}
    assert store.register([first, second, third, third], unit=("ingest", "u"), counts=counts) == 3
    assert sorted(store.read("prompts")["prompt_id"].to_list()) == ["a", "b", "c", "d", "e"]
    assert store.read_shard(first.path)["prompt_id"].to_list() == ["b", "c"]  # "a" was in the table
    assert store.read_shard(second.path)["prompt_id"].to_list() == ["d"]  # "c" is the first shard's
    assert (store.root / third.path).stat().st_mtime_ns == untouched  # nothing to leave out: not rewritten
    assert {s["shard_key"]: s["rows"] for s in store.shards("prompts")} == {"k0": 1, "k1": 2, "k2": 1, "k3": 1}
    recorded = store.recorded_units("ingest")["u"]
    assert (recorded["accepted"], recorded["duplicates"]) == (4, 2)


def test_units_registered_together_are_registered_as_one_after_the_other(tmp_path, key_index, monkeypatch):
    """``register_units``: one connection for several finished units; a prompt in two of
    them is kept by the first, counted a duplicate of the second; a unit without shards is
    recorded; a missing file registers none of them."""
    store = Store.init(tmp_path / "ds")

    def shard(key: str, ids: list[str]):
        frame = pl.DataFrame({"prompt_id": ids, "prompt": ids, "source_file": "f", "source_record": range(len(ids)),
                              "char_len": [1] * len(ids)}, schema_overrides={"char_len": pl.Int32})
        return store.write("prompts", frame, key=key, run_id="r", stage="ingest")

    first, second = shard("k1", ["a", "b"]), shard("k2", ["b", "c", "d"])
    missing = shard("k3", ["e"])
    (store.root / missing.path).unlink()
    with pytest.raises(store_module.StoreError, match="does not exist"):
        store.register_units("ingest", [("u1", [first], {}), ("u3", [missing], {})])
    assert store.count("prompts") == 0 and store.recorded_units("ingest") == {}

    opened = count_catalog_opens(monkeypatch)
    counts = {"rows_read": 3, "accepted": 3, "duplicates": 0}
    assert store.register_units("ingest", [("u1", [first], {"accepted": 2, "duplicates": 0}),
                                           ("u2", [second], counts), ("u0", [], {"files": 1})]) == 2
    assert opened == [False]
    assert sorted(store.read("prompts")["prompt_id"].to_list()) == ["a", "b", "c", "d"]
    assert store.read_shard(second.path)["prompt_id"].to_list() == ["c", "d"]
    recorded = store.recorded_units("ingest")
    assert recorded["u1"]["accepted"] == 2 and (recorded["u2"]["accepted"], recorded["u2"]["duplicates"]) == (2, 1)
    assert recorded["u0"] == {"files": 1}


CONCURRENT_INGEST = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from tests.unit.test_store_integrity import _ingest
    from prefcurate.store import Store
    store = Store.open(sys.argv[1])
    with store.writer_lock("ingest " + sys.argv[2]):
        _ingest(store, sys.argv[2], run_id=sys.argv[3], shard_rows=500)
""")


@pytest.mark.parametrize("overlap", ["overlapping_files", "same_file"])
def test_two_ingests_at_once(tmp_path, overlap):
    store = Store.init(tmp_path / "ds")
    first = _jsonl(tmp_path / "a.jsonl", range(3000))
    second = first if overlap == "same_file" else _jsonl(tmp_path / "b.jsonl", range(2000, 5000))
    repo = str(store_module.Path(__file__).resolve().parents[2])
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_INGEST, str(store.root), str(path), run, repo])
               for path, run in ((first, "run-1"), (second, "run-2"))]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    prompts = store.read("prompts")
    distinct = 3000 if overlap == "same_file" else 5000
    assert prompts.height == prompts["prompt_id"].n_unique() == distinct
    read = 3000 if overlap == "same_file" else 6000
    assert _accounting(store) == {"rows_read": read, "accepted": distinct, "quarantined": 0,
                                  "duplicates": read - distinct}


# ---- a coordinator killed between registration and the end of its run ---------------------
KILLED_AFTER_REGISTER = textwrap.dedent("""
    import os, signal, sys
    from prefcurate.steps.base import StageContext
    from prefcurate.steps.ingest import IngestStep
    from prefcurate.store import Store
    from prefcurate.tasks.ingest import IngestParams
    store = Store.open(sys.argv[1])
    ctx = StageContext(str(store.root), {"contracts": False}, "run-killed")
    store.start_run("ingest", {}, run_id="run-killed")
    step = IngestStep(IngestParams(path=sys.argv[2]))
    for unit in step.plan(ctx):
        result = step.run_unit(unit, ctx)
        store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
    os.kill(os.getpid(), signal.SIGKILL)  # before finish_run
""")


def test_a_kill_after_registration_keeps_the_accounting_and_shows_the_run_interrupted(tmp_path):
    store = Store.init(tmp_path / "ds")
    source = write_bad_file(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_REGISTER, str(store.root), str(source)])
    assert killed.returncode == -signal.SIGKILL
    runs = store.runs()
    assert runs.filter(pl.col("run_id") == "run-killed")["status"].to_list() == ["interrupted"]
    accounting = _accounting(store)
    assert accounting["rows_read"] > 0
    assert accounting["rows_read"] == accounting["accepted"] + accounting["quarantined"] + accounting["duplicates"]
    rows = store.count("prompts")
    assert _ingest(store, source, run_id="run-again") == 0  # the re-run adds nothing...
    assert store.count("prompts") == rows and _accounting(store) == accounting  # ...and counts hold
    status = CliRunner().invoke(app, ["status", "-d", str(store.root)]).output
    assert "interrupted" in status and "[holds]" in status and f"read {accounting['rows_read']} " in status


def test_a_running_run_of_a_live_process_stays_running(tmp_path):
    store = Store.init(tmp_path / "ds")
    store.start_run("ingest", {}, run_id="live")
    assert store.runs()["status"].to_list() == ["running"]


INIT = textwrap.dedent("""
    import sys
    from prefcurate.store import Store
    Store.init(sys.argv[1])
""")


def test_two_inits_of_one_new_directory_at_once_both_succeed(tmp_path):
    target = tmp_path / "new"
    inits = [subprocess.Popen([sys.executable, "-c", INIT, str(target)], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in inits] == [0, 0, 0], [p.stderr.read() for p in inits]
    assert Store.open(target).count("prompts") == 0


def test_a_stage_run_alone_over_empty_inputs_is_refused_before_prefect_starts(tmp_path, monkeypatch):
    from prefcurate.flows import common

    def started(*args, **kwargs):
        raise AssertionError("Prefect was started")

    monkeypatch.setattr(common, "start_prefect_api", started)
    store = Store.init(tmp_path / "ds")
    _ingest(store, write_bad_file(tmp_path), max_chars=200)  # prompts, and nothing judged yet
    for command, reads, before in ((["run", "filter"], "judgments", "ingest -> generate -> annotate"),
                                   (["run", "select"], "pairs", "-> filter -> score"),
                                   (["export"], "selections", "-> score -> select;")):
        result = CliRunner().invoke(app, [*command, "-d", str(store.root)])
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert f"reads {reads}, and the dataset {store.root} has no rows there" in result.output
        assert before in result.output and "Traceback" not in result.output
    assert [run["kind"] for run in store.runs().to_dicts()] == ["ingest"]  # no run was started
    # a dataset that is not there (a mistyped -d) is not created empty for a stage that reads one
    missing = tmp_path / "mistyped"
    for command in (["run", "select"], ["export"]):
        result = CliRunner().invoke(app, [*command, "-d", str(missing)])
        assert result.exit_code == 2 and f"there is no dataset at {missing}" in result.output, result.output
    assert not missing.exists()


def test_a_plan_refused_for_bad_input_is_said_before_prefect_starts(tmp_path, monkeypatch):
    from prefcurate.flows import common

    def started(*args, **kwargs):
        raise AssertionError("Prefect was started")

    monkeypatch.setattr(common, "start_prefect_api", started)
    store = Store.init(tmp_path / "ds")
    for command in (["ingest", str(tmp_path / "missing.jsonl")],
                    ["build", "--set", f"ingest.path={tmp_path / 'missing.jsonl'}"]):
        result = CliRunner().invoke(app, [*command, "-d", str(store.root)])
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert f"input file {tmp_path / 'missing.jsonl'} does not exist" in result.output
        assert "Traceback" not in result.output


def test_a_catalog_this_process_wrote_is_not_checked_again_but_one_changed_elsewhere_is(tmp_path, monkeypatch):
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(5)), run_id="a")
    checks = count_catalog_opens(monkeypatch)
    Store.open(store.root)
    assert checks == []  # its own registration left it checked
    with duckdb.connect(str(store.catalog)) as con:  # another process changes it
        con.execute("DELETE FROM _meta WHERE key = 'schema'")
    reopened = Store.open(store.root)
    assert checks[0] is True  # read again, and upgraded
    assert reopened.query("SELECT count(*) AS n FROM _meta WHERE key = 'schema'")["n"].item() == 1


def test_a_units_worker_does_not_check_the_catalog_its_coordinator_checked(tmp_path, monkeypatch):
    store = Store.init(tmp_path / "ds")
    _ingest(store, _jsonl(tmp_path / "a.jsonl", range(5)), run_id="a")
    opened = count_catalog_opens(monkeypatch)

    def run_in_a_fresh_worker(ctx: StageContext, file: str) -> int:
        """Connections a worker that never saw this catalog opens for one unit."""
        step = IngestStep(IngestParams(path=str(_jsonl(tmp_path / file, range(5, 9)))))
        (unit,) = step.plan(ctx)
        store_module._checked_catalogs.clear()  # the registrations since were the coordinator's
        opened.clear()
        step.run_unit(unit, ctx)
        return len(opened)

    checked = StageContext(str(store.root), {"contracts": False}, "b", catalog_checked=True)
    unchecked = StageContext(str(store.root), {"contracts": False}, "b")
    # the unit reads the catalog once (prompts sharing an id); the check would be one more
    assert run_in_a_fresh_worker(checked, "b.jsonl") == 1
    assert run_in_a_fresh_worker(unchecked, "c.jsonl") == 2
