"""`prefcurate sql` under attack: every escape is refused and the dataset stays byte-identical.

ESCAPES is the suite, kept as data: (statement, expected refusal). Placeholders: {root} the
dataset, {shard} a registered shard, {link} a symlink planted in the dataset pointing outside,
{scratch} a folder outside the dataset, {secret} a file in it. Each statement runs through the
CLI; then, to prove the second layer alone holds, straight in the sandbox connection past the
classifier. Both times every file of the dataset (names and contents) and of the scratch
folder is hashed before and after.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from prefcurate.cli import app
from prefcurate.sql import ReadOnlyViolation, SqlError, check_read_only, run_read_only, sandbox, terminal_safe
from prefcurate.store import Store

README = Path(__file__).resolve().parents[2] / "README.md"

REFUSED_READ_ONLY = "is read-only"
REFUSED_FILES = "disabled by configuration"  # DuckDB: the sandbox has no file system
COPY_IN = "EXPLAIN of COPY"

ESCAPES: list[tuple[str, str]] = [
    # the reported hole: EXPLAIN ANALYZE runs what it wraps
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{root}/catalog.duckdb' (FORMAT csv)", COPY_IN),
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet)", COPY_IN),
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{root}/prompts/new.parquet' (FORMAT parquet)", COPY_IN),
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{scratch}/new.csv'", COPY_IN),
    ("EXPLAIN (ANALYZE) COPY (SELECT 1 AS a) TO '{root}/x.csv'", COPY_IN),
    ("EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 1 AS a) TO '{root}/x.csv'", COPY_IN),
    ("EXPLAIN /* c */ ANALYZE -- c\n COPY (SELECT 1 AS a) TO '{root}/x.csv'", COPY_IN),
    ("explain analyse copy (from prompts) to '{root}/x.csv'", COPY_IN),
    ("EXPLAIN COPY prompts TO '{root}/x.csv'", COPY_IN),
    ("EXPLAIN ANALYZE INSERT INTO runs SELECT * FROM runs", "EXPLAIN of INSERT"),
    ("EXPLAIN ANALYZE UPDATE runs SET status = 'x'", "EXPLAIN of UPDATE"),
    ("EXPLAIN ANALYZE DELETE FROM runs", "EXPLAIN of DELETE"),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "EXPLAIN of CREATE"),
    ("EXPLAIN ANALYZE DROP TABLE runs", "EXPLAIN of DROP"),
    ("EXPLAIN ANALYZE EXPORT DATABASE '{root}/export'", "cannot parse"),
    ("EXPLAIN ANALYZE ATTACH '{root}/catalog.duckdb' AS c", "cannot parse"),
    ("EXPLAIN ANALYZE SET memory_limit = '100GB'", "EXPLAIN of SET"),
    ("EXPLAIN ANALYZE PRAGMA enable_profiling", "EXPLAIN of PRAGMA"),
    ("EXPLAIN EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv'", "cannot parse"),
    ("EXPLAIN ANALYZE WITH x AS (COPY (SELECT 1 AS a) TO '{root}/x.csv') SELECT 1", "contains COPY"),
    ("EXPLAIN WITH x AS (INSERT INTO runs SELECT * FROM runs RETURNING *) SELECT * FROM x", "contains INSERT"),
    # plain writes
    ("COPY (SELECT 1 AS a) TO '{root}/catalog.duckdb' (FORMAT csv)", "COPY statements are refused"),
    ("COPY prompts TO '{scratch}/p.csv'", "COPY statements are refused"),
    ("COPY runs FROM '{secret}'", "COPY statements are refused"),
    ("EXPORT DATABASE '{root}/export'", "EXPORT statements are refused"),
    ("EXPORT DATABASE '{scratch}/export' (FORMAT parquet)", "EXPORT statements are refused"),
    ("IMPORT DATABASE '{scratch}'", REFUSED_READ_ONLY),
    ("COPY FROM DATABASE memory TO other", REFUSED_READ_ONLY),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("CREATE TEMP TABLE t AS FROM prompts", "CREATE statements are refused"),
    ("CREATE OR REPLACE VIEW prompts AS SELECT 1", "CREATE statements are refused"),
    ("CREATE MACRO m(a) AS a", "CREATE statements are refused"),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')", "CREATE statements are refused"),
    ("CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')", "CREATE statements are refused"),
    ("CREATE TYPE mood AS ENUM ('a')", "CREATE statements are refused"),
    ("INSERT INTO runs SELECT * FROM runs", "INSERT statements are refused"),
    ("INSERT OR REPLACE INTO runs FROM runs", "INSERT statements are refused"),
    ("UPDATE runs SET status = 'done'", "UPDATE statements are refused"),
    ("DELETE FROM runs", "DELETE statements are refused"),
    ("TRUNCATE runs", "DELETE statements are refused"),
    ("DROP TABLE runs", "DROP statements are refused"),
    ("DROP VIEW curated_pairs", "DROP statements are refused"),
    ("ALTER TABLE runs ADD COLUMN x INTEGER", "ALTER statements are refused"),
    ("MERGE INTO runs USING (SELECT 1 AS a) s ON true WHEN MATCHED THEN DELETE", "MERGE_INTO statements are refused"),
    # configuration
    ("SET memory_limit = '100GB'", "SET statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("SET allowed_directories = ['/']", "SET statements are refused"),
    ("SET temp_directory = '{root}'", "SET statements are refused"),
    ("RESET lock_configuration", "SET statements are refused"),
    ("SET VARIABLE x = 1", "SET statements are refused"),
    ("USE memory", "SET statements are refused"),
    ("PRAGMA enable_profiling", "PRAGMA statements are refused"),
    ("PRAGMA profiling_output = '{root}/profile.json'", "SET statements are refused"),
    ("PRAGMA memory_limit = '100GB'", "SET statements are refused"),
    ("PRAGMA version", "PRAGMA statements are refused"),
    ("CALL enable_logging(storage := 'file')", "CALL statements are refused"),
    # databases, extensions, storage
    ("ATTACH '{root}/catalog.duckdb' AS c", "ATTACH statements are refused"),
    ("ATTACH '{scratch}/new.duckdb' AS n", "ATTACH statements are refused"),
    ("ATTACH ':memory:' AS m", "ATTACH statements are refused"),
    ("DETACH memory", "DETACH statements are refused"),
    ("INSTALL httpfs", "LOAD statements are refused"),
    ("FORCE INSTALL httpfs FROM core_nightly", "LOAD statements are refused"),
    ("LOAD httpfs", "LOAD statements are refused"),
    ("LOAD '{secret}'", "LOAD statements are refused"),
    ("UPDATE EXTENSIONS", "this kind of statement is refused"),
    ("CHECKPOINT", "CALL statements are refused"),
    ("FORCE CHECKPOINT", "CALL statements are refused"),
    ("CALL checkpoint()", "CALL statements are refused"),
    ("VACUUM", "VACUUM statements are refused"),
    ("ANALYZE", "VACUUM statements are refused"),
    ("BEGIN TRANSACTION", "TRANSACTION statements are refused"),
    ("PREPARE p AS SELECT 1", "PREPARE statements are refused"),
    ("EXECUTE p", "EXECUTE statements are refused"),
    ("PIVOT prompts ON category USING count(*)", "multi-statement"),
    # several statements, comment tricks
    ("SELECT 1; COPY (SELECT 1) TO '{root}/x.csv'", "exactly one statement"),
    ("SELECT 1; DROP TABLE runs", "exactly one statement"),
    ("SELECT 1 /* ; */ ; DELETE FROM runs", "exactly one statement"),
    ("SELECT 1 -- ; \n; DELETE FROM runs", "exactly one statement"),
    ("-- SELECT\nCOPY (SELECT 1) TO '{root}/x.csv'", "COPY statements are refused"),
    ("/* SELECT 1 */ COPY (SELECT 1) TO '{root}/x.csv'", "COPY statements are refused"),
    ("SELECT 'COPY' AS x; COPY (SELECT 1) TO '{root}/x.csv'", "exactly one statement"),
    # writes inside WITH clauses and subqueries (DuckDB 2 parses these as SELECT)
    ("WITH x AS (INSERT INTO runs SELECT * FROM runs RETURNING *) SELECT * FROM x", "contains INSERT"),
    ("WITH x AS (UPDATE runs SET status = 'x' RETURNING *) SELECT 1", "contains UPDATE"),
    ("WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x", "contains DELETE"),
    ("WITH x AS (COPY (SELECT 1 AS a) TO '{root}/catalog.duckdb' (FORMAT csv)) SELECT 1", "contains COPY"),
    ("WITH x AS MATERIALIZED (COPY prompts TO '{shard}') SELECT 1", "contains COPY"),
    ("WITH a AS (SELECT 1), b AS (DELETE FROM runs RETURNING 1) SELECT * FROM a", "contains DELETE"),
    ("SELECT * FROM (WITH y AS (COPY (SELECT 1) TO '{root}/x.csv') SELECT 1)", "contains COPY"),
    ("SELECT 1 WHERE 1 IN (WITH y AS (DELETE FROM runs RETURNING 1) SELECT 1)", "contains DELETE"),
    ("FROM runs WHERE EXISTS (WITH y AS (INSERT INTO runs FROM runs RETURNING 1) FROM y)", "contains INSERT"),
    ("SELECT 1 UNION ALL (WITH y AS (UPDATE runs SET status = 'x' RETURNING 1) SELECT 1 FROM y)", "contains UPDATE"),
    ("WITH x AS (CREATE TABLE z AS SELECT 1) SELECT 1", "cannot parse"),
    ("WITH x AS (ATTACH '{root}/catalog.duckdb') SELECT 1", "cannot parse"),
    ("SELECT * FROM query('COPY (SELECT 1) TO ''{root}/x.csv''')", "single SELECT"),
    ("SELECT * FROM query('WITH x AS (COPY (SELECT 1) TO ''{root}/x.csv'') SELECT 1')", "must be at the top level"),
    ("SELECT * FROM query('WITH x AS (DELETE FROM runs RETURNING 1) SELECT 1')", "must be at the top level"),
    ("SELECT * FROM enable_logging(storage := 'file')", "configuration has been locked"),
    # reads that reach outside, or into the dataset's files by path
    ("SELECT * FROM read_text('/etc/passwd')", REFUSED_FILES),
    ("FROM read_text('/proc/self/environ')", REFUSED_FILES),
    ("SELECT * FROM read_text('{root}/../secret.csv')", REFUSED_FILES),
    ("SELECT * FROM read_csv('{secret}')", REFUSED_FILES),
    ("SELECT * FROM '{secret}'", REFUSED_FILES),
    ("FROM '{root}/../secret.csv'", REFUSED_FILES),
    ("SELECT * FROM read_parquet('{link}')", REFUSED_FILES),
    ("SELECT * FROM read_parquet('{shard}')", REFUSED_FILES),
    ("SELECT * FROM read_parquet(['{shard}', '/etc/passwd'])", REFUSED_FILES),
    ("SELECT * FROM read_blob('{root}/catalog.duckdb')", REFUSED_FILES),
    ("SELECT * FROM read_blob('file:///etc/passwd')", REFUSED_FILES),
    ("SELECT * FROM read_csv('https://example.com/x.csv')", REFUSED_FILES),
    ("SELECT * FROM read_json('s3://bucket/x.json')", REFUSED_FILES),
    ("SELECT * FROM read_csv('/dev/stdin')", REFUSED_FILES),
    ("SELECT * FROM glob('/etc/*')", REFUSED_FILES),
    ("SELECT * FROM glob('{root}/../*')", REFUSED_FILES),
    ("SELECT * FROM read_csv('{scratch}/*.csv')", REFUSED_FILES),
    ("SELECT * FROM sniff_csv('{secret}')", REFUSED_FILES),
    ("SELECT * FROM parquet_metadata('{shard}')", REFUSED_FILES),
    ("DESCRIBE SELECT * FROM read_csv('{secret}')", REFUSED_FILES),
    ("SUMMARIZE SELECT * FROM read_text('/etc/passwd')", REFUSED_FILES),
    ("EXPLAIN ANALYZE SELECT * FROM read_text('/etc/passwd')", REFUSED_FILES),
    ("SELECT * FROM duckdb_extensions()", REFUSED_FILES),
    ("SELECT * FROM read_duckdb('{root}/catalog.duckdb')", REFUSED_FILES),
    ("SELECT * FROM query_table('{root}/catalog.duckdb')", REFUSED_FILES),
    ("DESCRIBE '{root}/catalog.duckdb'", REFUSED_FILES),
    ("SELECT * FROM parquet_scan('{shard}')", REFUSED_FILES),
    ("SELECT * FROM read_csv('{root}/prompts/', union_by_name = true)", REFUSED_FILES),
    ("SELECT * FROM glob('{root}/**')", REFUSED_FILES),
    # writes nested where a SELECT may stand
    ("FROM prompts t, LATERAL (WITH q AS (COPY (SELECT 1) TO '{root}/y.csv') SELECT 1)", "contains COPY"),
    ("SELECT * FROM (EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv')", "cannot parse"),
    ("EXPLAIN ANALYZE SELECT * FROM (WITH q AS (COPY (SELECT 1) TO '{root}/x.csv') SELECT 1)", "contains COPY"),
]

# statements whose whole point is writing a file: the sandbox alone must answer "no access"
FILE_WRITES = [
    "COPY (SELECT 1 AS a) TO '{root}/catalog.duckdb' (FORMAT csv)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{root}/catalog.duckdb' (FORMAT csv)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{scratch}/new.csv'",
    "COPY prompts TO '{root}/prompts/new.parquet'",
    "WITH x AS (COPY (SELECT 1 AS a) TO '{root}/x.csv') SELECT 1",
    "EXPORT DATABASE '{root}/export'",
    "ATTACH '{root}/catalog.duckdb' AS c",
    "ATTACH '{scratch}/new.duckdb' AS n",
    "INSTALL httpfs",
]

LEGITIMATE = [
    "SELECT count(*) AS n FROM prompts",
    "FROM prompts SELECT prompt_id ORDER BY prompt_id",
    "WITH p AS (SELECT * FROM prompts) SELECT count(*) FROM p",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT * FROM prompts WHERE prompt_id IN (SELECT prompt_id FROM prompts)",
    "PIVOT prompts ON category IN ('x', 'y') USING count(*)",
    "DESCRIBE prompts",
    "SHOW TABLES",
    "SUMMARIZE prompts",
    "EXPLAIN SELECT * FROM curated_pairs",
    "EXPLAIN ANALYZE SELECT count(*) FROM prompts",
    "EXPLAIN (FORMAT json) SELECT 1",
    "EXPLAIN (SELECT 1)",
    "SELECT * FROM pragma_table_info('runs')",
    "SELECT 'COPY (SELECT 1) TO ''x''' AS not_a_write",
    "SELECT 1;",
]


def _prompts(ids: list[str], texts: list[str] | None = None) -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": ids, "prompt": texts or [f"text {i}" for i in ids], "source_file": ["f"] * len(ids),
        "source_record": list(range(1, len(ids) + 1)), "char_len": [6] * len(ids),
        "category": ["x"] * len(ids),
    })


def _small_dataset(root: Path) -> tuple[Store, Path]:
    store = Store.init(root)
    shard = store.commit("prompts", _prompts(["a", "b", "c"]), key="k1", run_id="r1", stage="ingest")
    store.commit("prompts", _prompts(["d"], ["\x1b[2J\x1b[31mred\x07"]), key="k2", run_id="r1", stage="ingest")
    store.commit("quarantine", pl.DataFrame({"reason": ["wrong_type"], "message": ["m"], "source_record": [4]}),
                 key="q1", run_id="r1", stage="ingest")
    store.finish_run(store.start_run("ingest"), "done", {"read": 5})
    return store, store.root / shard.path


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    base = tmp_path_factory.mktemp("attack")
    scratch = base / "scratch"
    scratch.mkdir()
    secret = scratch / "secret.csv"
    secret.write_text("a\n1\n")
    (base / "secret.csv").write_text("a\n1\n")
    store, shard = _small_dataset(base / "ds")
    link = store.root / "prompts" / "planted.parquet"
    link.symlink_to(secret)
    names = {"root": str(store.root), "shard": str(shard), "scratch": str(scratch), "secret": str(secret),
             "link": str(link)}
    return store, scratch, names


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file contents, link targets and folders, by relative path."""
    prints = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(directory, name)
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                prints[relative] = "link:" + os.readlink(path)
            elif path.is_dir():
                prints[relative] = "dir"
            else:
                prints[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def _sql(*args: str):
    return CliRunner().invoke(app, ["sql", *args])


@pytest.mark.parametrize("template, refusal", ESCAPES, ids=[f"{i:03d}" for i in range(len(ESCAPES))])
def test_escape_is_refused_and_changes_nothing(attacked, template, refusal):
    store, scratch, names = attacked
    statement = template.format(**names)
    before = (_fingerprint(store.root), _fingerprint(scratch))
    result = _sql("-d", str(store.root), "--timeout", "20", "--", statement)
    after = (_fingerprint(store.root), _fingerprint(scratch))
    assert after == before, f"{statement!r} changed files"
    assert result.exit_code != 0, f"{statement!r} ran: {result.output}"
    assert "error:" in result.output and "Traceback" not in result.output
    assert refusal in result.output, result.output


@pytest.mark.parametrize("template, _refusal", ESCAPES, ids=[f"{i:03d}" for i in range(len(ESCAPES))])
def test_sandbox_alone_writes_nothing(attacked, template, _refusal):
    """Past the classifier, straight into the connection: whatever runs, no file changes."""
    store, scratch, names = attacked
    statement = template.format(**names)
    before = (_fingerprint(store.root), _fingerprint(scratch))
    with sandbox(store) as con:
        try:
            relation = con.sql(statement)
            if relation is not None:
                relation.fetchall()
        except duckdb.Error:
            pass
    assert (_fingerprint(store.root), _fingerprint(scratch)) == before, f"{statement!r} changed files"


@pytest.mark.parametrize("template", FILE_WRITES)
def test_sandbox_alone_refuses_file_writes(attacked, template):
    store, scratch, names = attacked
    before = (_fingerprint(store.root), _fingerprint(scratch))
    with sandbox(store) as con, pytest.raises(duckdb.PermissionException, match=REFUSED_FILES):
        con.sql(template.format(**names)).fetchall()
    assert (_fingerprint(store.root), _fingerprint(scratch)) == before


@pytest.mark.parametrize("query", LEGITIMATE)
def test_reads_pass_the_classifier_and_run(attacked, query):
    store, _, _ = attacked
    check_read_only(query)
    run_read_only(store, query)


def test_readme_sql_examples_run(attacked):
    store, scratch, _ = attacked
    section = README.read_text().split("## SQL over curated shards", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r'^prefcurate sql -d \S+ "(.+?)"(.*)$', section, flags=re.MULTILINE)
    assert len(commands) >= 8
    before = _fingerprint(store.root)
    for query, flags in commands:
        extra = flags.split()
        if "--output" in extra:
            extra[extra.index("--output") + 1] = str(scratch / extra[extra.index("--output") + 1])
        result = _sql("-d", str(store.root), query, *extra)
        assert result.exit_code == 0, f"{query}: {result.output}"
    assert _fingerprint(store.root) == before
    assert pl.read_parquet(scratch / "curated.parquet").columns[:2] == ["pair_id", "prompt_id"]


def test_reads_see_registered_shards_and_catalog_tables(attacked):
    store, _, _ = attacked
    assert run_read_only(store, "SELECT count(*) AS n FROM prompts")["n"][0] == 4
    assert run_read_only(store, "SELECT reason FROM quarantine_summary")["reason"].to_list() == ["wrong_type"]
    runs = run_read_only(store, "SELECT status, counts->>'read' AS r FROM runs")
    assert runs.row(0) == ("done", "5")


def test_a_misspelt_table_is_answered_with_the_datasets_tables(attacked):
    store, _, _ = attacked
    result = _sql("-d", str(store.root), "SELECT * FROM curated_pair")
    assert result.exit_code == 2 and "curated_pair does not exist" in result.output
    listed = result.output.split("the dataset's tables and views: ")[1]
    assert {"prompts", "curated_pairs", "runs", "quarantine_summary"} <= set(listed.replace(",", " ").split())
    assert "pg_" not in result.output and "Traceback" not in result.output


def test_first_use_after_a_copy_reads_the_copy_and_writes_nothing(tmp_path):
    original, _ = _small_dataset(tmp_path / "ds")
    shutil.copytree(original.root, tmp_path / "copy")
    shutil.rmtree(original.root)  # the copy's catalog still names the old root
    copy = Store.open(tmp_path / "copy")
    before = _fingerprint(copy.root)
    assert run_read_only(copy, "SELECT count(*) AS n FROM prompts")["n"][0] == 4
    assert _sql("-d", str(copy.root), "SELECT * FROM curated_pairs").exit_code == 0
    assert _fingerprint(copy.root) == before


def test_timeout_stops_a_cross_join(attacked):
    store, _, _ = attacked
    started = time.monotonic()
    with pytest.raises(SqlError, match="stopped after 0.5 s"):
        run_read_only(store, "SELECT count(*) FROM range(1e6::BIGINT) a, range(1e6::BIGINT) b", timeout_s=0.5)
    assert time.monotonic() - started < 30
    result = _sql("-d", str(store.root), "SELECT count(*) FROM range(1e6::BIGINT) a, range(1e6::BIGINT) b",
                  "--timeout", "0.5")
    assert result.exit_code != 0 and "error: the query was stopped after 0.5 s" in result.output


def test_memory_limit_stops_a_hungry_query_without_spilling(attacked):
    store, scratch, _ = attacked
    before = _fingerprint(store.root)
    result = _sql("-d", str(store.root), "SELECT list(range) FROM range(50000000)", "--memory-limit", "64MB")
    assert result.exit_code != 0 and "error: the query needs more than the memory limit 64MB" in result.output
    assert _fingerprint(store.root) == before  # no temp files: nothing spills anywhere
    # the result handed back is outside DuckDB's buffers: it is held to the same limit
    big = _sql("-d", str(store.root), "SELECT range AS a FROM range(20000000)", "--memory-limit", "64MB")
    assert big.exit_code != 0 and "error: the result is larger than the memory limit" in big.output
    assert "error:" in _sql("-d", str(store.root), "SELECT 1", "--memory-limit", "lots").output


def test_output_inside_the_dataset_is_refused(attacked, tmp_path):
    store, _, _ = attacked
    before = _fingerprint(store.root)
    (tmp_path / "into").symlink_to(store.root)
    for target in [store.root / "catalog.duckdb", store.root / "prompts" / "new.csv",
                   tmp_path / "into" / "catalog.duckdb", store.root / ".." / store.root.name / "x.csv"]:
        result = _sql("-d", str(store.root), "SELECT 1 AS a", "--format", "csv", "--output", str(target))
        assert result.exit_code != 0 and "is inside the dataset" in result.output, target
    assert _fingerprint(store.root) == before


def test_output_errors_are_clear(attacked, tmp_path):
    store, _, _ = attacked
    cases = [
        (["SELECT 1 AS a", "-f", "csv", "-o", str(tmp_path / "missing" / "x.csv")], "does not exist"),
        (["SELECT 1 AS a", "-f", "csv", "-o", str(tmp_path)], "is a directory"),
        (["SELECT [1, 2] AS l", "-f", "csv"], "csv cannot hold nested or binary columns: l"),
        (["SELECT {'k': 1} AS s", "-f", "csv", "-o", str(tmp_path / "s.csv")], "csv cannot hold"),
        (["SELECT 'x'::BLOB AS b", "-f", "json"], "json cannot hold binary columns: b"),
        (["SELECT ['x'::BLOB] AS b", "-f", "json", "-o", str(tmp_path / "b.json")], "json cannot hold"),
        (["SELECT INTERVAL 1 DAY AS i"], "cast such columns"),
        (["SELECT 1 AS a", "-f", "parquet"], "needs --output"),
        (["SELECT 1 AS a", "-o", str(tmp_path / "t.txt")], "--output needs --format"),
        (["SELECT nope FROM prompts"], "query failed: Binder Error"),
    ]
    for args, message in cases:
        result = _sql("-d", str(store.root), *args)
        assert result.exit_code != 0 and "error:" in result.output and message in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # failed writes leave no partial file


def test_outputs_round_trip_and_replace_a_hard_link_instead_of_writing_through(attacked, tmp_path):
    store, _, names = attacked
    query = "SELECT prompt_id, char_len FROM prompts ORDER BY prompt_id"
    expected = run_read_only(store, query)
    for fmt, read in [("csv", pl.read_csv), ("json", pl.read_ndjson), ("parquet", pl.read_parquet)]:
        target = tmp_path / f"out.{fmt}"
        result = _sql("-d", str(store.root), query, "-f", fmt, "-o", str(target))
        assert result.exit_code == 0 and f"wrote 4 rows to {target}" in result.output
        assert read(target).cast(expected.schema).equals(expected)
    shard_bytes = Path(names["shard"]).read_bytes()
    linked = tmp_path / "linked.parquet"
    os.link(names["shard"], linked)
    assert _sql("-d", str(store.root), "SELECT 1 AS a", "-f", "parquet", "-o", str(linked)).exit_code == 0
    assert Path(names["shard"]).read_bytes() == shard_bytes and pl.read_parquet(linked).columns == ["a"]


def test_terminal_escape_sequences_are_shown_escaped(attacked):
    store, _, _ = attacked
    table = _sql("-d", str(store.root), "SELECT prompt FROM prompts WHERE prompt_id = 'd'")
    assert table.exit_code == 0 and "\x1b" not in table.output and "\x07" not in table.output
    assert "\\x1b[2J\\x1b[31mred\\x07" in table.output
    error = _sql("-d", str(store.root), "SELECT '\x1b[31m' || 'x'::INTEGER")
    assert error.exit_code != 0 and "\x1b" not in error.output
    assert terminal_safe("a\x1b[0m\u202eb\x9bc\nd\te") == "a\\x1b[0m\\u202eb\\x9bc\nd\\x09e"


def test_the_classifier_alone_refuses_every_write_form():
    writes = [t for t, refusal in ESCAPES if refusal != REFUSED_FILES and "query(" not in t
              and "enable_logging(" not in t]
    for template in writes:
        with pytest.raises(ReadOnlyViolation):
            check_read_only(template.format(root="/r", shard="/r/s", scratch="/s", secret="/s/x", link="/r/l"))



def test_a_shard_written_before_a_column_existed_reads_it_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefcurate.store import ShardInfo

    store = Store.init(tmp_path / "ds")
    (store.root / "prompts").mkdir(exist_ok=True)
    old = pa.table({"prompt_id": ["a"], "prompt": ["x"], "source_file": ["f"],
                    "source_record": pa.array([1], pa.int32()), "char_len": pa.array([1], pa.int32())})
    pq.write_table(old, store.root / "prompts" / "shard-old.parquet")
    store.register([ShardInfo("prompts", "old", "prompts/shard-old.parquet", 1, "r", "ingest")])
    row = run_read_only(store, "SELECT prompt_id, category, source_record FROM prompts").row(0)
    assert row == ("a", None, 1)


def test_a_catalog_pointing_outside_the_dataset_is_not_followed(tmp_path):
    from prefcurate.store import ShardInfo

    outside, outside_shard = _small_dataset(tmp_path / "other")
    by_dots = Store.init(tmp_path / "dots")
    by_dots.register([ShardInfo("prompts", "p", f"../other/prompts/{outside_shard.name}", 3, "r", "ingest")])
    by_link = Store.init(tmp_path / "link")
    (by_link.root / "prompts").mkdir(exist_ok=True)
    (by_link.root / "prompts" / "shard-p.parquet").symlink_to(outside_shard)
    by_link.register([ShardInfo("prompts", "p", "prompts/shard-p.parquet", 3, "r", "ingest")])
    for store in (by_dots, by_link):
        with pytest.raises(SqlError, match="outside the dataset"):
            run_read_only(store, "SELECT count(*) FROM prompts")


def test_the_sandbox_cannot_see_python_objects_in_scope(attacked):
    """No replacement scans: a query names only the dataset's registered tables and views."""
    import pyarrow as pa

    store, _, _ = attacked
    private_rows = pa.table({"secret": ["s"]})  # noqa: F841 - what a replacement scan would find
    with sandbox(store) as con:
        with pytest.raises(duckdb.CatalogException, match="private_rows"):
            con.sql("SELECT * FROM private_rows").fetchall()
        assert con.sql("SELECT count(*) FROM prompts").fetchall() == [(4,)]


def test_an_earlier_versions_catalog_is_read_as_it_is(tmp_path):
    """Other commands upgrade such a catalog; `sql` reads it and writes nothing."""
    store, _ = _small_dataset(tmp_path / "ds")
    with duckdb.connect(str(store.catalog)) as con:  # as an earlier version left it
        con.execute("UPDATE _meta SET value = 'earlier' WHERE key = 'schema'")
        con.execute("ALTER TABLE runs DROP COLUMN host")
    before = _fingerprint(store.root)
    result = _sql("-d", str(store.root), "SELECT count(*) AS n FROM runs, prompts")
    assert result.exit_code == 0 and "4" in result.output, result.output
    assert _sql("-d", str(store.root), "SELECT * FROM curated_pairs").exit_code == 0
    assert _fingerprint(store.root) == before
