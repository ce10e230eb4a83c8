"""`prefcurate build` on hosted (kind: openai) pools through the real CLI, Prefect and a Dask
worker: `budget.max_usd` stops the build with one clear error and resumes once raised, and the
API key appears in no file the build writes (dataset, Prefect's home).

The API is the loopback OpenAI double of tests/support/openai_api.py (there is no hosted
provider here); the real-server path is tests/integration/test_openai_pool_vllm.py. Slow: two
builds with a temporary Prefect server each, ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefcurate.store import Store
from tests.support.openai_api import KEY, KEY_ENV, StubAPI

pytestmark = pytest.mark.slow


def test_a_build_stops_at_the_budget_and_resumes(tmp_path):
    stub = StubAPI()
    dataset = tmp_path / "ds"
    pool = {"kind": "openai", "base_url": stub.url, "model": "stub-model", "api_key_env": KEY_ENV,
            "price": {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 10.0}}
    config = tmp_path / "hosted.yaml"
    config.write_text(json.dumps({
        "dataset": str(dataset), "pools": {"generators": pool, "judges": pool},
        "ingest": {"limit": 12, "shard_rows": 3},
        "generate": {"generators": [{"name": "g", "pool": "generators", "n": 2, "sampling": {"max_tokens": 16}}]},
        "annotate": {"judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v1"}],
                     "rubric_aspects": [], "calibration_pairs": 1},
        "stages": ["ingest", "generate", "annotate"], "budget": {"max_usd": 0.0005},
    }))
    env = {**os.environ, KEY_ENV: KEY, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)

    def build(*extra):
        return subprocess.run([sys.executable, "-m", "prefcurate.cli", "build", "-c", str(config), *extra],
                              capture_output=True, text=True, env=env, timeout=900)

    try:
        stopped = build()
        assert stopped.returncode == 2, stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert "error: budget.max_usd reached: this dataset's requests cost $" in stopped.stderr
        store = Store.open(dataset)
        spent_first = float(store.query("SELECT sum(cost_usd) AS usd FROM request_metrics")["usd"][0])
        assert spent_first >= 0.0005
        runs = store.query("SELECT kind, status, message FROM runs WHERE status = 'failed'")
        assert runs.height >= 1 and "budget.max_usd reached" in runs["message"][0]
        assert store.count("judgments") == 0  # annotate never started

        resumed = build("--set", "budget.max_usd=1")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        store = Store.open(dataset)
        assert store.count("current_responses") == 12 * 2 and store.count("judgments") == 12
        paths = store.query("SELECT DISTINCT verdict_path FROM request_metrics WHERE kind = 'score_choices'")
        assert paths["verdict_path"].to_list() == ["top_logprobs"]
    finally:
        stub.close()
    for folder in (dataset, tmp_path / "prefect-home"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
