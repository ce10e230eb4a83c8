"""Which concurrency limits guard which pools, and which pools each stage's units hold."""

from prefcurate.config import load_config
from prefcurate.inference.pools import concurrency_limits
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
    held = {stage: get_step(stage).pools(ctx) for stage in ("ingest", "generate", "annotate", "filter",
                                                            "score", "select", "export")}
    assert held == {"ingest": [], "generate": ["generators"], "annotate": ["judges"], "filter": [],
                    "score": ["critic", "judges"], "select": [], "export": []}
