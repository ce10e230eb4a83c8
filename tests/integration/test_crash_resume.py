"""A build killed with SIGKILL mid-stage resumes to exactly the dataset an uninterrupted build
makes: same ids, no duplicates, no half-written shard ever visible.

Each build is the real command line (`python -m prefcurate.cli build`) in its own process
group, talking to one Prefect server started for the module (outside those groups); the
crash is ``killpg(SIGKILL)`` of the build's group (the coordinator and its Dask workers),
triggered by watching the dataset directory, never the catalog (a reader there would
contend for DuckDB's lock):

- ``test_kill_during_ingest_then_resume`` (fast, no model): one ingest unit writes 24
  small shards one after another; the kill lands after some shard files are complete and
  before the unit's manifest (so before anything is registered).
- ``test_kill_between_generate_units_then_resume`` (slow, the embedded model): four
  generate units of one prompt each on a Dask worker; the kill lands after at least one
  unit finished (manifest written, maybe registered) and before the last, so the resume must
  skip registered units, adopt finished-but-unregistered ones and compute the rest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from prefcurate.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "quickstart.yaml"
PROVENANCE = ("run_id", "stage", "code_version", "created_at")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One Prefect server for every build of the module, outside the builds' process groups:
    it survives the kills, and the builds skip a temporary server's minute-long start."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 400
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield SimpleNamespace(url=url, home=home)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()


def _env(prefect_server, prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_server.url,
        PREFECT_HOME=str(prefect_home),  # isolated profile and task result cache
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        GX_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def _build_command(dataset: Path, settings: dict, stages: str) -> list[str]:
    command = [sys.executable, "-m", "prefcurate.cli", "build", "-c", str(CONFIG), "-d", str(dataset),
               "--stages", stages]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    # a session of its own: the kill takes the whole group (Dask workers, vLLM engine processes)
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run_to_completion(command: list[str], env: dict, log: Path, timeout: float) -> None:
    process = _start(command, env, log)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        pytest.fail(f"build did not finish in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    assert code == 0, f"build failed ({code}):\n{log.read_text()[-6000:]}"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return members


def _crash_when(command: list[str], env: dict, log: Path, ready, timeout: float) -> None:
    """Start the build, SIGKILL its process group as soon as ``ready()`` holds."""
    process = _start(command, env, log)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the build ended ({process.returncode}) before the crash point:\n"
                            f"{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"crash point not reached in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.02)
    finally:
        _kill_group(process)
    for _ in range(100):  # SIGKILL is delivered asynchronously to the other members
        if not _group_members(process.pid):
            break
        time.sleep(0.1)
    assert not _group_members(process.pid), "processes of the killed build survived"


def _table(store: Store, table: str, key: str):
    frame = store.read(table).drop(*PROVENANCE)
    return frame.sort(key)


def _assert_clean(store: Store, table: str, key: str) -> None:
    """Only complete, registered shards are visible; no id appears twice."""
    shards = store.shards(table)
    assert shards, f"no {table} shards registered"
    assert all(s["path"].endswith(".parquet") and "/shard-" in s["path"] for s in shards)
    with store.connect(read_only=True) as con:
        view_sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ?", [table]).fetchone()[0]
    assert ".tmp" not in view_sql
    counts = store.query(f"SELECT count(*) AS n, count(DISTINCT {key}) AS d FROM {table}")
    assert counts["n"][0] == counts["d"][0], f"duplicate {key} in {table}"
    assert counts["n"][0] == sum(s["rows"] for s in shards)


# ---------------------------------------------------------------------------------- ingest


@pytest.fixture
def many_prompts(tmp_path) -> Path:
    """1200 distinct prompts: with shard_rows=50, one ingest unit writes 24 shards."""
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"id": f"p{i:05d}", "prompt": f"Prompt number {i}: explain topic {i % 97} in {i % 7 + 1} steps."})
        for i in range(1200)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kill_during_ingest_then_resume(tmp_path, many_prompts, prefect_server):
    env = _env(prefect_server, tmp_path / "prefect-home")
    settings = {"ingest.path": str(many_prompts), "ingest.limit": None, "ingest.shard_rows": 50,
                "executor.kind": "sequential"}
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"

    _run_to_completion(_build_command(reference, settings, "ingest"), env, tmp_path / "reference.log", 900)

    def some_shards_written() -> bool:
        return len(list((crashed / "prompts").glob("shard-*.parquet"))) >= 3

    _crash_when(_build_command(crashed, settings, "ingest"), env, tmp_path / "crashed.log",
                some_shards_written, timeout=900)

    # after the crash: complete shard files on disk, none visible, the unit not done
    store = Store.open(crashed)
    on_disk = list((crashed / "prompts").glob("shard-*.parquet"))
    assert 3 <= len(on_disk) < 24, f"{len(on_disk)} shard files: the kill missed the unit"
    assert not list((crashed / "_units" / "ingest").glob("*.json")), "the unit finished before the kill"
    assert store.count("prompts") == 0
    assert store.shards("prompts") == []
    runs = store.runs().to_dicts()
    assert sorted(r["kind"] for r in runs) == ["build", "ingest"]
    # the kill left no chance to record more; the dead process shows as interrupted, not running
    assert {r["status"] for r in runs} == {"interrupted"}

    _run_to_completion(_build_command(crashed, settings, "ingest"), env, tmp_path / "resumed.log", 900)

    resumed, expected = Store.open(crashed), Store.open(reference)
    _assert_clean(resumed, "prompts", "prompt_id")
    assert resumed.count("prompts") == 1200
    assert _table(resumed, "prompts", "prompt_id").equals(_table(expected, "prompts", "prompt_id"))
    assert {s["shard_key"] for s in resumed.shards("prompts")} == {s["shard_key"] for s in expected.shards("prompts")}
    # the resumed run rewrote the same deterministic names: no orphan shard files either
    assert sorted(p.name for p in (crashed / "prompts").glob("shard-*.parquet")) == sorted(
        p.name for p in (reference / "prompts").glob("shard-*.parquet")
    )
    assert resumed.count("quarantine") == expected.count("quarantine") == 0


def test_a_folder_ingested_then_grown_reads_only_the_new_file(tmp_path, prefect_server):
    """`prefcurate ingest FOLDER` as a user runs it: every data file of the folder, each once."""
    env = _env(prefect_server, tmp_path / "prefect-home")
    folder, dataset = tmp_path / "dumps", tmp_path / "ds"
    folder.mkdir()
    for name, first in (("part-0.jsonl", 0), ("part-1.jsonl", 30)):  # part-1 repeats ten of part-0
        (folder / name).write_text("".join(json.dumps({"prompt": f"Prompt {i}: explain topic {i}."}) + "\n"
                                           for i in range(first, first + 40)))
    command = [sys.executable, "-m", "prefcurate.cli", "ingest", str(folder), "-d", str(dataset)]

    def ingest() -> str:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    assert "read 80 = accepted 70 + quarantined 0 + duplicates 10 (2 files)" in ingest()
    command[4:5] = sorted(str(path) for path in folder.glob("*.jsonl"))  # as a shell expands dumps/*.jsonl
    assert "these 2 files were already ingested with these settings: nothing added" in ingest()
    (folder / "part-2.jsonl").write_text(json.dumps({"prompt": "Prompt 0: explain topic 0."}) + "\n"
                                         + json.dumps({"prompt": "A new one."}) + "\n")
    command[4:6] = [str(folder)]
    assert "read 2 = accepted 1 + quarantined 0 + duplicates 1 (1 file; 2 already ingested)" in ingest()
    store = Store.open(dataset)
    _assert_clean(store, "prompts", "prompt_id")
    assert store.count("prompts") == 71


# -------------------------------------------------------------------------------- generate


@pytest.mark.slow
def test_kill_between_generate_units_then_resume(tmp_path, prefect_server):
    from prefcurate.inference.models import is_prepared

    if not is_prepared():
        pytest.skip("the embedded model is not prepared (run `prefcurate models prepare`)")
    env = _env(prefect_server, tmp_path / "prefect-home")
    settings = {
        "ingest.limit": 4,
        "ingest.shard_rows": 1,  # four prompt shards -> four generate units
        "generate.generators": [
            {"name": "gemma-short", "pool": "generators", "n": 2,
             "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8, "seed": 1}},
        ],
        "executor.kind": "dask",
        "executor.n_workers": 1,
    }
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run_to_completion(_build_command(reference, settings, "ingest,generate"), env,
                       tmp_path / "reference.log", 1500)
    assert Store.open(reference).count("responses") == 8

    def generate_units_done() -> int:
        return len(list((crashed / "_units" / "generate").glob("*.json")))

    _crash_when(_build_command(crashed, settings, "ingest,generate"), env, tmp_path / "crashed.log",
                lambda: generate_units_done() >= 1, timeout=1500)
    done_at_kill = generate_units_done()
    assert 1 <= done_at_kill < 4, f"{done_at_kill} of 4 units done at the kill"
    visible = Store.open(crashed).count("responses")
    assert visible in (0, 2, 4, 6)  # whole units only: 2 responses per prompt shard

    _run_to_completion(_build_command(crashed, settings, "ingest,generate"), env,
                       tmp_path / "resumed.log", 1500)

    resumed, expected = Store.open(crashed), Store.open(reference)
    _assert_clean(resumed, "responses", "response_id")
    _assert_clean(resumed, "prompts", "prompt_id")
    assert resumed.ids("responses", "response_id").sort().equals(expected.ids("responses", "response_id").sort())
    assert resumed.ids("prompts", "prompt_id").sort().equals(expected.ids("prompts", "prompt_id").sort())
    assert resumed.count("responses") == 8
    killed_run, resumed_run = [r for r in resumed.runs().to_dicts() if r["kind"] == "generate"]
    assert killed_run["status"] == "interrupted" and resumed_run["status"] == "completed"
    assert json.loads(resumed_run["counts"])["units"] == 4
    # units finished before the kill were not computed again: their shards (registered then,
    # or adopted/taken from the task cache now) still carry the killed run's id
    from_killed_run = [s for s in resumed.shards("responses") if s["run_id"] == killed_run["run_id"]]
    assert len(from_killed_run) >= done_at_kill
    assert len(resumed.shards("responses")) == 4
