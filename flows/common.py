"""Orchestration shared by every stage flow: plan, map units, register, report.

No stage logic lives here: a stage is a :class:`prefcurate.steps.base.Step`, and this module
only decides where its units run (the flow's task runner: Dask by default), retries them,
caches them by content, registers their shards as they finish, and records the run.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.config import PipelineConfig, load_config
from prefcurate.steps import get_step
from prefcurate.steps.base import StageContext, StageStats, Step, Unit, UnitResult, context_for
from prefcurate.store import Store


def share_prefect_tls_context() -> None:
    """Give every Prefect API client of this process one TLS context.

    Prefect 3.7 builds a new context for each client it makes, loading certifi's whole
    bundle (14 ms here), and a task run makes a few: 9% of a Dask worker's time in a
    100,000-prompt build (the upstream change that would allow sharing one is
    PrefectHQ/prefect#19106, open). The shared context is built from the same two settings
    Prefect reads, at the time each client is made, so verification is exactly as before.
    Runs on import: Dask workers import this module to run a unit.
    """
    import functools
    import ssl

    from prefect.client import orchestration
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    @functools.lru_cache(maxsize=4)
    def context(insecure: bool, cert_file: str | None) -> ssl.SSLContext:
        if insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            return ctx
        import certifi

        return ssl.create_default_context(cafile=cert_file or certifi.where())

    for client_class in (orchestration.PrefectClient, orchestration.SyncPrefectClient):
        original = client_class.__init__
        if getattr(original, "_shares_tls_context", False):
            continue

        @functools.wraps(original)
        def __init__(self, *args, httpx_settings=None, _original=original, **kwargs):
            settings = dict(httpx_settings or {})
            if not isinstance(settings.get("verify"), ssl.SSLContext):
                settings["verify"] = context(bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
                                             PREFECT_API_SSL_CERT_FILE.value() or None)
            _original(self, *args, httpx_settings=settings, **kwargs)

        __init__._shares_tls_context = True
        client_class.__init__ = __init__


share_prefect_tls_context()


class _InputErrorsWithoutTraceback(logging.Filter):
    """An :class:`~prefcurate.errors.InputError` (a bad file or config: the user's to fix) is
    logged by Prefect's engines as its message alone, not with the engine's 60-line traceback,
    so the one line that names the record and field is the one a user sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefcurate.errors import InputError

        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_error_tracebacks() -> None:
    """Runs on import (the CLI, a deployment's worker and Dask workers all import this module)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _InputErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_InputErrorsWithoutTraceback())


quiet_input_error_tracebacks()


class RunParameters(BaseModel):
    """What the Prefect UI asks for when a stage or build is run by hand."""

    model_config = ConfigDict(extra="forbid")
    config_path: str | None = Field(
        "examples/quickstart.yaml", description="pipeline config YAML (relative to the working directory)"
    )
    dataset: str | None = Field(None, description="dataset directory; default: the config's `dataset`")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted config overrides, e.g. {\"ingest.limit\": 20, \"select.budget\": 50}",
    )


def resolve(parameters: RunParameters) -> tuple[PipelineConfig, Store]:
    config = load_config(parameters.config_path, parameters.overrides)
    dataset = parameters.dataset or config.dataset
    return config, Store.open_or_init(dataset)


def _unit_cache_key(context, arguments) -> str:
    ctx: StageContext = arguments["ctx"]
    unit: Unit = arguments["unit"]
    # the dataset's instance id keeps a re-created dataset from reusing stale results
    return f"{ctx.store().instance_id()}:{unit.stage}:{unit.key}"


def _is_transient(task, task_run, state) -> bool:
    """Retry a failed unit unless its error is deterministic (bad input fails the same way again)."""
    from prefcurate.errors import InputError

    error = state.data
    return not isinstance(error, (InputError, FileNotFoundError))


#: characters of a unit's key in its task run's name: ``generate-3f9a0c1b2d4e``
UNIT_NAME_KEY_CHARS = 12


def unit_run_name(parameters: dict) -> str:
    """A unit's task run is named ``<stage>-<unit key prefix>`` in the Prefect UI."""
    return f"{parameters['stage']}-{parameters['unit'].key[:UNIT_NAME_KEY_CHARS]}"


@task(
    name="run-unit",
    task_run_name=unit_run_name,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_jitter_factor=0.5,
    retry_condition_fn=_is_transient,
    cache_key_fn=_unit_cache_key,
    persist_result=True,
)
def run_unit_task(stage: str, unit: Unit, ctx: StageContext) -> UnitResult:
    """One unit of a stage. Its persisted result holds shard ids only, never data.

    The pools' slots are the stage's, held by its coordinator (:func:`stage_pool_slots`)."""
    return get_step(stage).run_unit(unit, ctx)


POOL_LIMITS_ENV = "PREFCURATE_POOL_LIMITS"


@contextlib.contextmanager
def pool_slots(pools: list[str], mode: str | None = None, occupy: int = 1) -> Iterator[None]:
    """Hold ``occupy`` slots of the global concurrency limit ``pool-<name>`` of each pool used.

    So concurrent flow runs (a scheduled build and a UI run, say) queue for a pool instead
    of overloading it. ``mode`` (default: $PREFCURATE_POOL_LIMITS, else ``lenient``):
    ``strict`` fails when a limit does not exist (`make server` creates them; so does
    :func:`ensure_prefect_api` on the temporary server of a plain ``prefcurate build``),
    ``lenient`` takes the limits that exist, ``off`` asks no server.
    """
    mode = mode or os.environ.get(POOL_LIMITS_ENV, "lenient")
    if mode not in ("strict", "lenient", "off"):
        raise ValueError(f"{POOL_LIMITS_ENV}={mode!r}: expected strict, lenient or off")
    if not pools or mode == "off":
        yield
        return
    import threading

    from prefect.concurrency.sync import concurrency

    names = sorted(f"pool-{name}" for name in pools)  # one order everywhere: no two runs deadlock
    report_after = float(os.environ.get(POOL_WAIT_REPORT_ENV, "60"))
    reporter = threading.Timer(report_after, _report_slot_wait, args=(names, report_after, _unit_logger()))
    reporter.daemon = True
    reporter.start()
    try:
        # a stage may run longer than a lease: a missed renewal must not kill an hour of inference
        with concurrency(names, occupy=occupy, strict=mode == "strict", raise_on_lease_renewal_failure=False):
            reporter.cancel()
            yield
    finally:
        reporter.cancel()


def stage_width(pools: list[str], config: PipelineConfig, units: int) -> int | None:
    """How many of a stage's units run at once: the fewest slots among the pools it uses
    (an embedded engine serves one unit at a time, a server pool one per replica), at most
    its units; None (no bound but the workers) for a stage without pools."""
    from prefcurate.inference.pools import concurrency_limits

    limits = concurrency_limits(config.pools)
    slots = [limits[f"pool-{name}"] for name in pools if f"pool-{name}" in limits]
    return max(1, min([*slots, units])) if slots else None


@contextlib.contextmanager
def stage_pool_slots(pools: list[str], width: int | None) -> Iterator[None]:
    """The coordinator holds a stage's pool slots (``width`` of each) while its units run.

    Held per stage, not per unit: a unit's ask cost 0.1-0.3 s of the Prefect server's time,
    and a unit whose ask was denied slept the server's "retry after" while the slot it
    waited for stood free (10 units of the instant engine double: generate 9.6-18 s with
    per-unit slots, 3.9 s without). Units of a concurrent run wait for the stage to end.
    """
    if width is None:
        yield
        return
    with pool_slots(pools, occupy=width):
        yield


def submit_bounded(submit, units: list[Unit], width: int | None, in_order: bool = False):
    """Lists of the futures of ``units`` as they finish, each list every one finished by
    then (so they are registered together), with at most ``width`` submitted and unfinished;
    ``in_order``: one at a time, the next submitted only once the caller asks for it (after
    it has registered the one before)."""
    if in_order:
        for unit in units:
            yield [submit(unit)]
        return
    pending = list(units)
    running = [submit(pending.pop(0)) for _ in range(min(width or len(pending), len(pending)))]
    while running:
        first = next(iter(as_completed(running)))
        finished = [first, *(future for future in running if future is not first and future.wrapped_future.done())]
        running = [future for future in running if future not in finished]
        while pending and len(running) < (width or len(units)):
            running.append(submit(pending.pop(0)))
        yield finished


#: seconds a stage waits for its pools' slots before it says which slots and who holds them
POOL_WAIT_REPORT_ENV = "PREFCURATE_POOL_WAIT_REPORT_S"


def _unit_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # outside a run (tests, a plain call)
        return logging.getLogger(__name__)


def _report_slot_wait(names: list[str], waited: float, logger) -> None:
    """Say what a stage (or unit) is waiting for: each limit's taken and total slots on this API."""
    from prefect import get_client

    states = []
    try:
        with get_client(sync_client=True) as client:
            for name in names:
                limit = client.read_global_concurrency_limit_by_name(name)
                states.append(f"{name}: {limit.active_slots}/{limit.limit} slots taken")
    except Exception as error:
        states.append(f"(could not read the limits: {error})")
    logger.warning(
        "waiting %.0f s for a concurrency slot of %s at %s; %s. The holders are other runs on "
        "this Prefect API; a slot of a killed run is freed when its lease expires (or at the "
        "next start of a temporary server). `prefect gcl ls` shows the limits, "
        "`prefect gcl update NAME --active-slots 0` frees them by hand.",
        waited, ", ".join(names), os.environ.get("PREFECT_API_URL", "the temporary server"), "; ".join(states),
    )


def run_stage(stage: str, config: PipelineConfig, store: Store, config_path: str | None = None,
              parent_run: str | None = None, runner=None) -> dict:
    """Run one stage to completion; safe to re-run after a crash.

    ``runner``: an entered Prefect task runner the units go to (Dask, see
    :func:`task_runner_for`); default: the current flow's own.
    """
    with store.writer_lock(f"prefcurate run {stage}", notify=get_run_logger().warning):
        return _run_stage_locked(stage, config, store, config_path, parent_run, runner)


def _run_stage_locked(stage: str, config: PipelineConfig, store: Store, config_path: str | None,
                      parent_run: str | None, runner=None) -> dict:
    logger = get_run_logger()
    step: Step = get_step(stage)
    store.check_catalog()  # under the lock, so that its units' workers need not (free when unchanged since)
    run_id = store.start_run(stage, {"config_path": config_path, "parent_run": parent_run,
                                     "config": config.model_dump(mode="json")})
    ctx = context_for(store.root, config, run_id, config_path, catalog_checked=True)
    started = time.perf_counter()
    stats = StageStats()
    results: list[UnitResult] = []
    try:
        units = step.plan(ctx)
        todo, done = step.pending(ctx, units)
        logger.info("%s: %d units (%d already done)", stage, len(units), len(done))
        todo = step.batched(todo)
        progress = create_progress_artifact(progress=0.0, description=f"{stage}: units done") if todo else None

        def submit(unit: Unit):
            with _placement(step, ctx, config):
                return (runner.submit(run_unit_task, {"stage": stage, "unit": unit, "ctx": ctx}) if runner
                        else run_unit_task.submit(stage, unit, ctx))

        pools = step.pools(ctx) if todo else []
        width = stage_width(pools, config, len(todo))
        with stage_pool_slots(pools, width):
            for futures in submit_bounded(submit, todo, width, step.units_in_order):
                finished, failure = _results(futures)
                # visible as soon as they are complete (every unit finished by now, in one
                # transaction); their counts are recorded in the same transaction
                store.register_units(stage, [entry for result in finished for entry in result.registrations()])
                _test_kill_point("after_register")
                for result in finished:
                    results.append(result)
                    stats.add_unit(result)
                if failure is not None:
                    raise failure
                if progress is not None:
                    update_progress_artifact(progress, progress=100.0 * len(results) / len(todo))
        stats.add(step.finalize(ctx, results) or {}, "finalize")
        stats.add({"units": len(units), "units_skipped": len(done)}, "run")
        stats.timings["seconds"] = time.perf_counter() - started
        store.record_reports(run_id, stage, stats.reports)
        store.finish_run(run_id, "completed", stats.counts, stats.timings)
        logger.info("%s completed in %.1f s: %s", stage, stats.timings["seconds"], _short(stats.counts))
        quarantined = {k: v for k, v in stats.counts.items() if k.startswith("contract_quarantined")}
        if quarantined:
            logger.warning("%s: rows failed their data contract and were quarantined: %s", stage, quarantined)
        return {"stage": stage, "run_id": run_id, **stats.summary()}
    except BaseException as error:
        with contextlib.suppress(Exception):  # the stage's own error is the one to raise
            store.record_reports(run_id, stage, stats.reports)
        store.finish_run(run_id, "failed", stats.counts, {**stats.timings, "seconds": time.perf_counter() - started},
                         message=f"{type(error).__name__}: {error}")
        raise


def _results(futures: list) -> tuple[list[UnitResult], BaseException | None]:
    """The results of finished futures, and the first one's error of those that failed (the
    others' results are kept: registered before that error is raised)."""
    results, failure = [], None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as error:
            failure = failure or error
    return results, failure


def _placement(step: Step, ctx: StageContext, config: PipelineConfig):
    """Dask annotations for a stage's units: those that load an embedded model ask for
    ``executor.model_resources`` (e.g. GPU=1), so on a mixed cluster they run only on the
    workers that advertise it; units of HTTP pools and model-free stages run anywhere."""
    pools = config.pools
    embedded = [name for name in step.pools(ctx) if name in pools and pools[name].kind == "embedded"]
    if not (config.executor.model_resources and embedded):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=dict(config.executor.model_resources))


#: test-only: SIGKILL this process at a named point (``after_register``: a unit's shards and
#: counts are registered, the run is not finished), so tests can crash a real command there
TEST_KILL_ENV = "PREFCURATE_TEST_KILL_AT"


def _test_kill_point(name: str) -> None:
    if os.environ.get(TEST_KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _short(counts: dict) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in counts.items() if not isinstance(v, dict)
    )


def publish_report(title: str, markdown: str, key: str | None = None) -> None:
    create_markdown_artifact(markdown=f"# {title}\n\n{markdown}", key=key, description=title)


#: Dask's nanny starts workers with these at 1 (against oversubscription by many worker
#: threads); the compute in our workers is vLLM's, which binds its own OpenMP threads, and
#: MKL_NUM_THREADS=1 held its matrix products to one core (prefill 1.9x slower on 2 cores)
THREAD_LIMITS_LEFT_TO_VLLM = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


#: Dask's nanny sets MALLOC_TRIM_THRESHOLD_, and a malloc tunable set that way turns off
#: glibc's sliding mmap threshold: every block over 128 KiB (a numpy temporary of a few rows)
#: was then mapped and unmapped on each use, page faults and all (select at 100k pairs: 39 s,
#: 33 s of it in the kernel, against 24 s in a plain process). Blocks under 16 MiB come from
#: the heap again (19.7 s); the trim threshold still hands freed memory back.
MALLOC_MMAP_THRESHOLD = ("MALLOC_MMAP_THRESHOLD_", str(16 << 20))


def configure_dask() -> None:
    """Dask workers must not be daemonic (vLLM's engine starts its own worker processes),
    and must not pin the BLAS/OpenMP thread counts vLLM sets for its engine."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    for name in THREAD_LIMITS_LEFT_TO_VLLM:
        environ.pop(name, None)
    environ.setdefault(*MALLOC_MMAP_THRESHOLD)
    dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ})


#: how long at most a run waiting for a pool slot sleeps between asks. Prefect's server
#: answers a denied ask with "retry after" the limit's mean slot occupancy times the asks
#: it denied lately, capped at 30 s by default: a slot freed while its waiter slept stayed
#: idle up to that long. Asking once a second costs the server nothing at our scale.
SLOT_WAIT_ENV, SLOT_WAIT_S = "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "1"


def ensure_prefect_api(config: PipelineConfig | None = None) -> None:
    """Give this process and the Dask workers it starts one Prefect API (see :func:`start_prefect_api`)."""
    start_prefect_api().ready(config)


class PrefectApi:
    """The API a build talks to: the one PREFECT_API_URL names, or a temporary server of its
    own that :meth:`ready` waits for (so a caller can import its flows while it starts)."""

    def __init__(self, server: TemporaryPrefectServer | None = None):
        self.server = server

    def ready(self, config: PipelineConfig | None = None) -> None:
        if self.server is None:
            return
        self.server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
        release_stale_pool_slots()
        if config is not None:
            create_pool_limits(config)
        self.server = None


def start_prefect_api() -> PrefectApi:
    """Start a temporary Prefect server unless PREFECT_API_URL names one; returns at once.

    Without PREFECT_API_URL, Prefect starts a temporary server per process, so every Dask
    worker would start its own (slow, and their runs would not show in one place). We start
    the temporary server once and export its URL; workers inherit the environment. The
    temporary server gets the pools' concurrency limits that `make server` creates on a real
    one (in :meth:`PrefectApi.ready`), so stages take their pools' slots the same way everywhere.
    """
    if os.environ.get("PREFECT_API_URL"):
        return PrefectApi()
    os.environ.setdefault(SLOT_WAIT_ENV, SLOT_WAIT_S)
    server = TemporaryPrefectServer()
    _use_api(server.api_url)
    return PrefectApi(server)


def _use_api(url: str) -> None:
    """PREFECT_API_URL for this process and the ones it starts: Prefect read its settings from
    the environment when it was imported, and would start a temporary server of its own."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


class TemporaryPrefectServer:
    """Prefect's temporary API server, started as ``prefect.server.api.server.SubprocessASGIServer``
    starts it (the same uvicorn command and environment: ``tests/unit/test_prefect_clients.py``
    holds them to Prefect's), without importing the server into this process. That import
    (FastAPI, SQLAlchemy, the API's models) took ~1.7 s of every command here for a class whose
    ``start`` then also waited for the server; this one returns at once and :meth:`wait` waits,
    so the server's own ~4 s start overlaps the build's imports."""

    #: uvicorn's exit status when the port it was given was taken first
    PORT_TAKEN = 3

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._launch()
        atexit.register(self.stop)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def command(self) -> list[str]:
        import prefect

        return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]

    def environment(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}

    def _launch(self) -> None:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        logging.getLogger("prefect").info("Starting temporary server on %s", self.address)
        self.process = subprocess.Popen(self.command(), env=self.environment())

    def wait(self, timeout_s: float) -> None:
        """Until the server answers its health check; raises when it exits or ``timeout_s`` passes."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                status = self.process.poll()
                if status == self.PORT_TAKEN:
                    self._launch()
                    _use_api(self.api_url)
                    continue
                if status is not None:
                    raise RuntimeError(f"Prefect's temporary server exited with status {status} before it "
                                       "answered (its errors are above)")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS sets how long to wait)")

    def stop(self) -> None:
        if self.process is None:
            return
        logging.getLogger("prefect").info("Stopping temporary server on %s", self.address)
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def release_stale_pool_slots() -> list[str]:
    """Free the slots of ``pool-*`` limits taken on an earlier temporary server.

    The temporary server keeps slot leases in its memory: when a build is killed, its server
    dies with the leases while the taken slots stay counted in the database, and no later
    server would ever expire them (the next build waited forever). A temporary server that
    has just started holds no lease, so every slot counted taken is stale. Returns the limits
    freed. (Two builds sharing one PREFECT_HOME at once should use `make server` instead.)
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    freed = []
    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=200):
            if limit.name.startswith("pool-") and limit.active_slots:
                client.update_global_concurrency_limit(limit.name, GlobalConcurrencyLimitUpdate(active_slots=0))
                freed.append(limit.name)
    if freed:
        logging.getLogger(__name__).warning(
            "freed the slots of %s: taken by a build that died with its temporary server", ", ".join(freed))
    return freed


def create_pool_limits(config: PipelineConfig) -> dict[str, int]:
    """Create the missing ``pool-<name>`` limits for the config's pools; returns them all."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from prefcurate.inference.pools import concurrency_limits

    limits = concurrency_limits(config.pools)
    with get_client(sync_client=True) as client:
        for name, slots in limits.items():
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    return limits


@contextlib.contextmanager
def dask_cluster(config: PipelineConfig, address: str | None = None) -> Iterator[str | None]:
    """The scheduler address units go to: ``address``, the config's, or a LocalCluster's.

    A LocalCluster lives as long as the ``with`` block, so workers keep loaded models across
    the stages of a build. Before it closes, every worker closes its engines: vLLM's engine
    processes are the workers' children and would otherwise outlive them, busy-polling.
    """
    address = address or config.executor.address
    if config.executor.kind != "dask" or address:
        yield address
        return
    from distributed import Client, LocalCluster

    from prefcurate.steps.engines import close_all

    configure_dask()
    _quiet_resource_tracker()
    cluster = LocalCluster(
        n_workers=config.executor.n_workers,
        threads_per_worker=config.executor.threads_per_worker,
        processes=True,
        dashboard_address=None,
    )
    try:
        yield cluster.scheduler_address
    finally:
        closing = time.perf_counter()
        try:
            with Client(cluster, timeout=30) as client:
                client.run(close_all)
                client.run(exit_at_once_when_closed)
        except Exception as error:  # a dead worker took its engines with it; close the rest
            logging.getLogger(__name__).warning("closing the workers' engines failed: %s", error)
        engines_closed = time.perf_counter()
        cluster.close()
        _unit_logger().info("closed the workers' engines in %.1f s, the Dask cluster in %.1f s",
                            engines_closed - closing, time.perf_counter() - engines_closed)


#: a warnings filter for the resource tracker that multiprocessing starts for our LocalCluster
RESOURCE_TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Keep the resource tracker from warning about what it cleans up at a build's end.

    Our workers leave through ``os._exit`` once closed (:func:`exit_at_once_when_closed`),
    so the shared memory and semaphores vLLM's engine registered are unlinked by the
    tracker instead of by the worker, and it warns about each ("leaked ... objects to clean
    up") although nothing is left behind. It gets this process's ``-W`` options when it starts.
    """
    import sys

    if RESOURCE_TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(RESOURCE_TRACKER_QUIET)


def exit_at_once_when_closed() -> None:
    """Make this (LocalCluster worker) process exit the moment its worker has closed.

    Run in each worker of our own LocalCluster once its engines are closed, right before the
    cluster closes: the interpreter's own exit (atexit handlers and module teardown of torch,
    vLLM, OpenVINO) took 2-4 s a worker, and the Nanny waits for it. Shards are complete
    files (fsynced, renamed) before a unit returns, so nothing is left to flush but logs.
    """
    import atexit
    import sys

    def exit_now() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream has nothing to flush
                pass
        os._exit(0)

    atexit.register(exit_now)  # atexit runs last-registered first: before every other handler


def task_runner_for(config: PipelineConfig, address: str | None):
    """Dask at ``address`` (see :func:`dask_cluster`), or one thread for ``sequential``."""
    if config.executor.kind == "sequential" or address is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    configure_dask()
    return DaskTaskRunner(address=address)
