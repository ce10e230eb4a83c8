"""A build on a real Dask cluster, as several machines would run it, with a worker killed mid-stage.

The test starts what an operator would: a Prefect server, a separate `dask scheduler` and two
`dask worker` processes on loopback (no nanny, so a killed worker stays dead), and points
`executor.address` at the scheduler. Model stages use the session's two CPU `vllm serve`
replicas through a `servers` pool, so the Dask workers are thin clients, as on a cluster whose
GPUs sit behind vLLM servers. While the generate stage runs, the worker holding a unit is
SIGKILLed; the scheduler hands the unit to the survivor and the build must complete with every
response present exactly once. A second, quick check runs a Prefect task with the placement
that `executor.model_resources` gives embedded-model units and shows Dask honours it through
prefect-dask's client (it only ever lands on the worker advertising the resource).

Slow (a Prefect server, two vLLM replicas and a small build: ~4-8 min on a loaded 2-core
machine); run with `pytest -m slow tests/integration/test_dask_cluster.py`.
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

import httpx
import pytest

from prefcurate.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPTS = 6
SAMPLES_PER_PROMPT = 3  # quickstart: gemma-warm n=2 + gemma-cool n=1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready after {timeout:.0f} s\n{tail}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = home / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, 600, "the Prefect server", log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_api):
    """A scheduler and two single-threaded workers (``gpu0`` advertises GPU=1, ``cpu0`` not)."""
    workdir = tmp_path_factory.mktemp("dask")
    scheduler_file = workdir / "scheduler.json"
    # PYTHONPATH: workers unpickle the test's probe task from tests.support by module name
    env = dict(os.environ, PREFECT_API_URL=prefect_api, DASK_DISTRIBUTED__WORKER__DAEMON="False",
               PYTHONPATH=str(REPO))
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, args: list[str]) -> None:
        sink = (workdir / f"{name}.log").open("w")
        processes[name] = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=REPO)

    start("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)])
    _wait(scheduler_file.exists, 120, "the Dask scheduler", workdir / "scheduler.log")
    for name, extra in (("gpu0", ["--resources", "GPU=1"]), ("cpu0", [])):
        start(name, [str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                     "--nthreads", "1", "--no-nanny", "--name", name, *extra])
    from distributed import Client

    client = Client(scheduler_file=str(scheduler_file), timeout=60)
    try:
        client.wait_for_workers(2, timeout=300)
        yield client, processes, json.loads(scheduler_file.read_text())["address"]
    finally:
        client.close()
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_model_units_land_only_on_workers_with_the_resource(cluster, prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    from tests.support.dask_probe import placement_probe

    _, _, address = cluster
    probe = placement_probe.with_options(task_runner=DaskTaskRunner(address=address))
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        on_gpu, unplaced = probe(str(REPO / "examples" / "quickstart.yaml"), "generate", {"GPU": 1})
    assert set(on_gpu) == {"gpu0"}  # the quickstart's generators pool is embedded
    assert len(unplaced) == 6 and set(unplaced) <= {"gpu0", "cpu0"}


def test_a_build_survives_a_worker_killed_mid_stage(cluster, prefect_api, vllm_replicas, prepared_model,
                                                     tmp_path):
    client, processes, address = cluster
    dataset = tmp_path / "ds"
    pool = json.dumps({"kind": "servers", "model": prepared_model, "served_model_name": "gemma3-270m",
                       "urls": [r.url for r in vllm_replicas], "max_model_len": 1024})
    overrides = [
        f"ingest.limit={PROMPTS}", "ingest.shard_rows=2",
        "generate.generators.0.sampling.max_tokens=24", "generate.generators.1.sampling.max_tokens=24",
        "annotate.max_response_chars=300", "annotate.calibration_pairs=6",
        "score.qurating.sample_size=6", "score.qurating.pairs_per_item=2",
        "score.qurating.criteria=[{name: educational_value, description: 'has more educational value'}]",
        f"pools.generators={pool}", f"pools.judges={pool}", f"executor.address={address}",
    ]
    args = [sys.executable, "-m", "prefcurate.cli", "build", "-c", "examples/quickstart.yaml", "-d", str(dataset)]
    for item in overrides:
        args += ["--set", item]
    log = tmp_path / "build.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    with log.open("w") as sink:
        build = subprocess.Popen(args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)

    # kill the first worker seen holding a unit once generation (a model stage) is under way
    names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
    victim = None
    deadline = time.monotonic() + 1200
    while victim is None and build.poll() is None and time.monotonic() < deadline:
        if "generate: " in log.read_text(errors="replace"):
            busy = [worker for worker, keys in client.processing().items() if keys]
            if busy:
                victim = names[busy[0]]
                os.kill(processes[victim].pid, signal.SIGKILL)
                processes[victim].wait()
                break
        time.sleep(0.2)
    assert victim is not None, f"no worker was ever seen running a generate unit:\n{log.read_text()[-3000:]}"
    try:
        build.wait(timeout=1800)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert build.returncode == 0, output[-4000:]

    store = Store.open(dataset)
    prompts = store.count("prompts")
    rows, distinct, low, high = store.query(
        "SELECT count(*), count(DISTINCT response_id), min(n), max(n) FROM "
        "(SELECT response_id, count(*) OVER (PARTITION BY prompt_id) AS n FROM responses)").row(0)
    per_prompt = (low, high)
    runs = store.runs()
    stages = {row["kind"]: row["status"] for row in runs.filter(runs["kind"] != "build").iter_rows(named=True)}
    pairs = store.count("pairs")
    assert prompts == PROMPTS
    assert rows == distinct == PROMPTS * SAMPLES_PER_PROMPT  # nothing lost, nothing twice
    assert per_prompt == (SAMPLES_PER_PROMPT, SAMPLES_PER_PROMPT)
    assert all(status == "completed" for status in stages.values()), stages
    assert set(stages) >= {"ingest", "generate", "annotate", "filter", "score", "select", "export"}
    assert pairs > 0
    survivor = ({"gpu0", "cpu0"} - {victim}).pop()
    assert processes[survivor].poll() is None
