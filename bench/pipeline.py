"""End-to-end build on the embedded default: what share of the wall time is not the model?

Runs ``prefcurate build -c examples/quickstart.yaml`` as a user would (Dask LocalCluster,
embedded vLLM CPU engine, contracts on), into a temporary dataset, with a smaller
``ingest.limit`` (4 prompts: one prompt shard) so it fits in ~20 minutes on a loaded 2-core
machine, where starting the engine alone takes minutes. Then, from the
dataset's ``runs`` table:

- ``wall_s``: the build run's seconds (build flow start to end). Starting Python and
  Prefect's temporary API server is left out: a deployed build on a running server does not
  pay it. It is printed separately (``process_s``).
- ``calls_s``: model calls, the sum of ``model_seconds`` over the build's stage runs
  (``parent_run`` = the build's run id). ``TimedEngine`` (prefcurate/steps/engines.py) counts
  the wall seconds inside ``generate`` / ``score_choices`` only.
- ``load_s``: starting engines (loading weights, vLLM's profile and warm-up). TimedEngine does
  not count it, so this script times it itself: a Dask worker preload
  (``ENGINE_TIMER_PRELOAD`` below) wraps ``prefcurate.inference.pools.open_engine`` in each
  worker and appends each engine start's seconds to a file (failed starts too: on a shared
  machine vLLM may find no memory for its KV cache, and Prefect retries the unit). A failed
  unit attempt's model calls are not in the runs table, so they land in the overhead; the
  script lists Prefect's retries so such a run can be told apart.
- ``model_s = calls_s + load_s``. Decision: loading the model is model time, not
  orchestration, storage or validation overhead (it is the same cost a bare ``vllm.LLM``
  script pays, and it does not grow with the orchestration); the share without it is printed
  too (``overhead_share_excl_load``).

Baseline: the model's own time in the same run; the target is ``overhead_share < 0.15``.

Usage: python bench/pipeline.py [ingest_limit] [--keep]   (default 4 prompts -> 12 responses;
--keep leaves the dataset, the build log and the engine timings in a printed directory)
Last line: ``RESULT overhead_share=<(wall_s - model_s) / wall_s> wall_s=.. model_s=..``
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time

REPO = Path(__file__).resolve().parents[1]
ENGINE_LOG_ENV = "PREFCURATE_BENCH_ENGINE_LOG"
DEFAULT_LIMIT = 4


# ---- the Dask worker preload: time every engine start in the worker ----------------------

#: given to the workers as text (distributed runs a preload that is not a name or a path as a
#: script), so no worker imports this file
ENGINE_TIMER_PRELOAD = textwrap.dedent(
    """
    import json, os, time


    def dask_setup(worker=None):
        log = os.environ.get("PREFCURATE_BENCH_ENGINE_LOG")
        if not log:
            return
        import prefcurate.inference.pools as pools

        if getattr(pools.open_engine, "_bench_timed", False):
            return
        original = pools.open_engine

        def timed_open_engine(name, config=None):
            started, ok = time.perf_counter(), False
            try:
                engine = original(name, config)
                ok = True
                return engine
            finally:  # a failed start (e.g. no memory for the KV cache) is engine time too
                record = {"pool": name, "seconds": time.perf_counter() - started, "ok": ok,
                          "pid": os.getpid()}
                with open(log, "a") as handle:
                    handle.write(json.dumps(record) + "\\n")

        timed_open_engine._bench_timed = True
        pools.open_engine = timed_open_engine
    """
)


# ---- the benchmark ---------------------------------------------------------------------------


def run_build(dataset: Path, limit: int, engine_log: Path, log: Path) -> float:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([ENGINE_TIMER_PRELOAD]),
        **{ENGINE_LOG_ENV: str(engine_log)},
    )
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    command = [sys.executable, "-m", "prefcurate.cli", "build", "-c", str(REPO / "examples" / "quickstart.yaml"),
               "-d", str(dataset), "--set", f"ingest.limit={limit}"]
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"build failed ({code}); log: {log}")
    return seconds


def build_accounting(dataset: Path) -> tuple[dict, list[dict]]:
    sys.path.insert(0, str(REPO))
    from prefcurate.store import Store

    runs = Store.open(dataset).runs().to_dicts()
    [build] = [r for r in runs if r["kind"] == "build" and r["status"] == "completed"]
    stages = [r for r in runs if r["kind"] != "build"
              and json.loads(r["parameters"] or "{}").get("parent_run") == build["run_id"]]
    return build, stages


def unit_retries(build_log: Path) -> list[str]:
    """Prefect's retry lines: a retried unit's failed attempt (and its model calls) is lost time."""
    return [line.strip() for line in build_log.read_text(errors="replace").splitlines()
            if re.search(r"Retry \d+/\d+ will start", line)]


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--keep"]
    keep = "--keep" in sys.argv[1:] or os.environ.get("PREFCURATE_BENCH_KEEP") == "1"
    limit = int(args[0]) if args else DEFAULT_LIMIT
    scratch = Path(tempfile.mkdtemp(prefix="prefcurate-bench-"))
    try:
        dataset, engine_log, build_log = scratch / "dataset", scratch / "engines.jsonl", scratch / "build.log"
        process_s = run_build(dataset, limit, engine_log, build_log)
        build, stages = build_accounting(dataset)
        loads = [json.loads(line) for line in engine_log.read_text().splitlines()] if engine_log.exists() else []
        retries = unit_retries(build_log)
    finally:
        if keep:
            print(f"kept {scratch} (dataset/, build.log, engines.jsonl)")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    wall_s = float(json.loads(build["timings"])["seconds"])
    print(f"build on the embedded default, ingest.limit={limit}: {wall_s:.1f} s in the build flow, "
          f"{process_s:.1f} s for the whole command")
    print(f"{'stage':<10}{'seconds':>9}{'model calls s':>15}{'units':>7}  counts")
    calls_s = reported_load_s = 0.0
    for run in stages:
        counts = json.loads(run["counts"] or "{}")
        seconds = float(json.loads(run["timings"] or "{}").get("seconds", 0.0))
        model = float(json.loads(run["timings"] or "{}").get("model_seconds", 0.0))
        calls_s += model
        reported_load_s += float(counts.get("model_load_seconds", 0.0))
        shown = {k: v for k, v in counts.items()
                 if k in ("accepted", "responses", "judgments", "ratings", "pairs", "tokens_out")}
        print(f"{run['kind']:<10}{seconds:9.1f}{model:15.1f}{counts.get('units', 0):7}  {shown}")
    # the runs' own figure once steps report engine starts (``model_load_seconds``), else ours
    load_s = reported_load_s or sum(item["seconds"] for item in loads)
    model_s = calls_s + load_s
    other_s = wall_s - model_s
    share = other_s / wall_s
    share_excl_load = (wall_s - calls_s) / wall_s
    starts = ", ".join(
        f"{item['pool']} {item['seconds']:.1f} s{'' if item.get('ok', True) else ' FAILED'} (pid {item['pid']})"
        for item in loads
    ) or "none"
    print(f"engine starts: {len(loads)} ({starts})")
    if retries:
        print(f"unit retries: {len(retries)} (a failed attempt's model calls count as overhead here):")
        for line in retries:
            print(f"  {line[:200]}")
    print(f"model calls {calls_s:.1f} s + engine start {load_s:.1f} s = model {model_s:.1f} s "
          f"({model_s / wall_s:.1%} of the build)")
    print(f"orchestration, storage, validation and the rest: {other_s:.1f} s = {share:.1%} "
          f"(target < 15%: {'met' if share < 0.15 else 'NOT met'}); "
          f"counting engine start as overhead: {share_excl_load:.1%}")
    print(f"calls_s={calls_s:.1f} load_s={load_s:.1f} overhead_share_excl_load={share_excl_load:.3f} "
          f"process_s={process_s:.1f}")
    print(f"RESULT overhead_share={share:.3f} wall_s={wall_s:.1f} model_s={model_s:.1f}")


if __name__ == "__main__":
    main()
