"""prefect.yaml end to end: a real Prefect server, `prefect deploy --all`, a process worker,
and an ad-hoc build triggered through the API whose rows are then queryable.

The stack is started by ``infra/prefect/start_server.sh`` itself (on a free loopback port,
with a temporary PREFECT_HOME), so the test covers the script users run, and stopped by
``infra/prefect/stop_server.sh`` at teardown. The build runs the ingest stage only (no model)
with the sequential executor: what is under test is the deployment path (pull step, worker,
parameters from the API), not the stages. Takes ~3-5 minutes on a loaded 2-core machine,
most of it the server's start and `prefect deploy`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
START = REPO / "infra" / "prefect" / "start_server.sh"
STOP = REPO / "infra" / "prefect" / "stop_server.sh"
from prefcurate.stages import STAGE_NAMES, STAGES, load

STAGE_FLOWS = list(STAGE_NAMES)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """Server + work pool + limits + deployments + worker, as start_server.sh makes them."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_HOST="127.0.0.1",
        PREFECT_SERVER_PORT=str(port),
        PREFECT_BIN=str(Path(sys.executable).with_name("prefect")),
        PREFECT_STARTUP_TIMEOUT_S="400",
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick the run up quickly
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        started = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=1200)
        if started.returncode != 0:
            pytest.fail(
                f"start_server.sh failed ({started.returncode}):\n{started.stdout}\n{started.stderr}\n"
                f"server.log:\n{_tail(home / 'server.log')}"
            )
        yield SimpleNamespace(home=home, port=port, api_url=api_url, env=env, output=started.stdout)
    finally:
        subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def api(prefect_stack):
    """This process's Prefect client settings, pointed at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_stack.api_url}):
        yield prefect_stack


def test_start_script_sets_up_pool_limits_and_deployments(api):
    from prefect import get_client

    assert f"Prefect UI:   http://127.0.0.1:{api.port}" in api.output
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("prefcurate-process")
        assert pool.type == "process"
        for name in ("pool-generators", "pool-judges"):  # the pools of examples/quickstart.yaml
            limit = client.read_global_concurrency_limit_by_name(name)
            assert limit.limit == 1 and limit.active

        nightly = client.read_deployment_by_name("build-dataset/nightly-build")
        assert nightly.entrypoint == "flows/build_dataset.py:build_dataset"
        assert nightly.work_pool_name == "prefcurate-process"
        [schedule] = nightly.schedules
        assert schedule.active
        assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
        assert nightly.parameters["parameters"]["config_path"] == "examples/quickstart.yaml"
        assert nightly.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]

        adhoc = client.read_deployment_by_name("build-dataset/adhoc-build")
        assert not adhoc.schedules
        # the UI form: RunParameters' fields plus the optional stage subset
        schema = adhoc.parameter_openapi_schema
        assert set(schema["properties"]) == {"parameters", "stages"}
        run_parameters = schema["definitions"]["RunParameters"]["properties"]
        assert set(run_parameters) == {"config_path", "dataset", "overrides"}

        for spec in STAGES:
            deployment = client.read_deployment_by_name(f"{spec.name}/{spec.name}-adhoc")
            assert deployment.entrypoint == f"flows/{spec.name}.py:{spec.name}_flow"
            assert deployment.work_pool_name == "prefcurate-process"
            # the UI form shows the stage's own parameters, from its params model
            schema = deployment.parameter_openapi_schema
            assert set(schema["properties"]) == {"parameters", "stage_params", "cluster", "parent_run"}
            params_model = load(spec.params)
            assert set(schema["definitions"][params_model.__name__]["properties"]) == set(params_model.model_fields)


def test_deploying_one_deployment_by_name(api):
    """`prefect deploy --name <one>` deploys that one from prefect.yaml (names are unique)."""
    from prefect import get_client

    env = {**api.env, "PREFECT_API_URL": api.api_url, "PREFCURATE_HOME": str(REPO),
           "PYTHONPATH": str(REPO)}
    with get_client(sync_client=True) as client:
        before = client.read_deployment_by_name("filter/filter-adhoc").updated
    deployed = subprocess.run([env["PREFECT_BIN"], "--no-prompt", "deploy", "--name", "filter-adhoc"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, f"{deployed.stdout}\n{deployed.stderr}"
    with get_client(sync_client=True) as client:
        again = client.read_deployment_by_name("filter/filter-adhoc")
        assert again.updated > before and again.entrypoint == "flows/filter.py:filter_flow"
        # only that one: the other deployments were left as they were
        assert client.read_deployment_by_name("ingest/ingest-adhoc").updated <= before


def test_adhoc_build_through_the_api(api, tmp_path):
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from prefcurate.sql import run_read_only
    from prefcurate.store import Store

    dataset = tmp_path / "adhoc"
    flow_run: FlowRun = run_deployment(
        name="build-dataset/adhoc-build",
        parameters={
            "parameters": {
                # relative: resolved in the repository, where the deployment's pull step puts the run
                "config_path": "examples/quickstart.yaml",
                "dataset": str(dataset),
                "overrides": {"ingest.limit": 10, "executor.kind": "sequential"},
            },
            "stages": ["ingest"],
        },
        timeout=900,
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"flow run {flow_run.name} ended {flow_run.state}; worker log:\n{_tail(api.home / 'worker.log')}"
    )

    store = Store.open(dataset)
    assert store.count("prompts") == 10
    distinct = run_read_only(store, "SELECT count(DISTINCT prompt_id) AS n FROM prompts")["n"][0]
    assert distinct == 10
    runs = {row["kind"]: row for row in store.runs().to_dicts()}
    assert set(runs) == {"build", "ingest"}
    assert runs["build"]["status"] == "completed" and runs["ingest"]["status"] == "completed"
    build_parameters = json.loads(runs["build"]["parameters"])
    assert build_parameters["stages"] == ["ingest"]
    assert build_parameters["overrides"]["ingest.limit"] == 10
    assert json.loads(runs["ingest"]["parameters"])["parent_run"] == runs["build"]["run_id"]


def test_a_unit_waits_for_its_pools_slot(api):
    """Two runs wanting one embedded pool: the second unit waits until the first lets go."""
    import contextvars
    import threading
    import time

    from prefcurate.flows.common import pool_slots
    from prefect import get_client
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    entered = threading.Event()

    def second_unit():
        with pool_slots(["judges"], mode="strict"):
            entered.set()

    with concurrency("pool-judges", occupy=1, strict=True):  # the first run's unit holds the slot
        # the thread runs in this context: Prefect's settings (the test server's URL) are a
        # context variable, and without them the release would go to a temporary server
        waiting = threading.Thread(target=contextvars.copy_context().run, args=(second_unit,), daemon=True)
        waiting.start()
        assert not entered.wait(timeout=5), "the unit ran while the pool's only slot was taken"
    assert entered.wait(timeout=120), "the unit never got the slot after it was released"
    waiting.join(timeout=30)
    with get_client(sync_client=True) as client:  # both units gave their slot back to this server
        assert client.read_global_concurrency_limit_by_name("pool-judges").active_slots == 0

    with pytest.raises(ConcurrencySlotAcquisitionError):  # strict: a pool without a limit is an error
        with pool_slots(["no-such-pool"], mode="strict"):
            pass
    started = time.perf_counter()
    with pool_slots(["no-such-pool"], mode="lenient"):  # lenient: limits that exist, none here
        assert time.perf_counter() - started < 60
