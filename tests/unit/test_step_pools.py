"""What units hold and record about the inference pools they use: concurrency slots, request metrics."""

from prefcurate.config import load_config
from prefcurate.inference.pools import concurrency_limits
from prefcurate.stages import STAGE_NAMES
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for


def test_one_slot_per_engine_and_one_per_replica():
    limits = concurrency_limits({
        "generators": {"kind": "embedded", "model": "default"},
        "judges": {"kind": "servers", "urls": ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]},
    })
    assert limits == {"pool-generators": 1, "pool-judges": 3}


def test_units_hold_the_pools_their_stage_uses(tmp_path):
    config = load_config("examples/quickstart.yaml", {
        "pools.critic": {"kind": "embedded", "model": "default"},
        "score.critiq.enabled": True, "score.critiq.pool": "critic",
    })
    ctx = context_for(tmp_path, config, "run-1", None)
    held = {stage: get_step(stage).pools(ctx) for stage in STAGE_NAMES}
    assert held == {"ingest": [], "generate": ["generators"], "annotate": ["judges"], "filter": [],
                    "score": ["critic", "judges"], "select": [], "export": []}


class _MeteredScriptedEngine:
    """A scripted test double: an engine that has served two requests."""

    model = "scripted"

    def __init__(self):
        self.rows = [
            {"pool": "judges", "replica": "in-process", "kind": "score_choices", "ok": True, "attempts": 1,
             "tokens_in": 120, "tokens_out": 1, "latency_s": 0.2, "error": None},
            {"pool": "judges", "replica": "in-process", "kind": "generate", "ok": False, "attempts": 3,
             "tokens_in": 4000, "tokens_out": None, "latency_s": 0.01, "error": "too_long: 4000 > 1024"},
        ]

    def drain_metrics(self):
        rows, self.rows = self.rows, []
        return rows


def test_a_units_request_metrics_drain_each_engine_once():
    from prefcurate.schemas.tables import PROVENANCE, REQUEST_METRICS

    from prefcurate.steps.engines import TimedEngine, request_metrics

    engine = _MeteredScriptedEngine()
    warm, cool = TimedEngine(engine), TimedEngine(engine)  # two generator settings, one engine
    frame = request_metrics(warm, cool, None)
    assert frame.height == 2
    assert frame.columns == [f.name for f in REQUEST_METRICS if f not in PROVENANCE]
    assert frame.filter(~frame["ok"])["error"].to_list() == ["too_long: 4000 > 1024"]
    assert request_metrics(warm).height == 0  # drained: the next unit starts from nothing


def test_build_workers_leave_thread_counts_to_vllm():
    """Dask's nanny pins OMP/MKL/OpenBLAS to 1 thread; in a build's LocalCluster the model
    engine must get the machine's cores, Dask's other worker settings stay, and the mmap
    threshold its trim setting froze is raised."""
    import os

    from distributed import Client
    from prefcurate.flows.common import dask_cluster

    threads = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

    def worker_environ():
        return {name: os.environ.get(name) for name in (*threads, "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}

    config = load_config("examples/quickstart.yaml")
    here = worker_environ()  # before the nanny starts: it writes its settings into this process too
    with dask_cluster(config) as address, Client(address) as client:
        [seen] = client.run(worker_environ).values()
    # the workers inherit this process's settings, and Dask adds none
    assert {name: seen[name] for name in threads} == {name: here[name] for name in threads}
    assert seen["MALLOC_TRIM_THRESHOLD_"] == "65536"
    # and large numpy temporaries come from the heap, not a fresh mapping each time
    assert seen["MALLOC_MMAP_THRESHOLD_"] == str(16 << 20)
