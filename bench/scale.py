"""Non-model cost of a whole build at 1,000, 10,000 and 100,000 prompts (everything but the model).

Each size runs ``prefcurate build`` as a user would (Dask LocalCluster, the quickstart's
generators, judges, filters, score, select and export, contracts on) over a JSONL of distinct
synthetic prompts, with ``ingest.shard_rows`` 1,000 (many units, so per-unit cost shows), and
then runs the same command again on the finished dataset (the no-op re-run).

What is replaced: the models, nothing else. A Dask worker preload swaps
``prefcurate.inference.pools.open_engine`` for the instant engine double
(tests/support/instant_engine.py, answers at once) and ``prefcurate.tasks.embed.embed_texts``
for its hashed-vector stand-in of the same shape. Embeddings are a model too, and on 2 CPU
cores the real one runs at ~30 texts/s (100,000 prompts are 300,000 response texts: hours);
bench/embed.py measures the embedding model on its own. So these figures are planning,
reading inputs, id lookups, contract checks, shard writes, registration, Prefect and Dask;
a real build adds its model time (the user's GPUs) to them.

Reported per size, from the dataset's ``runs`` table: seconds per stage, the build's
seconds and ms per prompt, the whole command's seconds (Python, Prefect's temporary API
server and Dask start-up included), peak RSS of the command's process tree (sampled every
0.2 s; the coordinator, the Prefect server and the Dask workers together) and of its
largest process, and the no-op re-run's whole command.

Sizes: ``PREFCURATE_SCALE_SIZES`` (default ``1000,10000,100000``); shard rows:
``PREFCURATE_SCALE_SHARD_ROWS`` (default 1000); a build's time limit
``PREFCURATE_SCALE_TIMEOUT_S`` (default 1500). Run: ``.venv/bin/python bench/scale.py``.
Last line: ``RESULT ms_per_prompt_1k=.. ms_per_prompt_100k=.. growth=<100k per prompt / 1k
per prompt> noop_rerun_s=<the largest size's> peak_rss_mb_100k=..`` (keys of sizes not run
are left out; with other sizes the largest one stands in for 100k, named by its key).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import threading
import time

import psutil

from prefcurate.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
STAGES = list(STAGE_NAMES)

#: given to the Dask workers as text (a preload that is not a module name or path runs as a script)
INSTANT_MODELS_PRELOAD = textwrap.dedent(
    """
    def dask_setup(worker=None):
        import prefcurate.inference.pools as pools
        import prefcurate.tasks.embed as embed
        from tests.support.instant_engine import InstantEngine, instant_embed_texts

        pools.open_engine = lambda name, config=None: InstantEngine(f"instant-{name}")
        embed.embed_texts = instant_embed_texts
    """
)

WORDS = ["explain", "why", "how", "write", "a", "short", "list", "of", "steps", "to", "compare", "summarise", "plan", "story", "about", "the", "code", "math", "proof", "poem", "letter", "recipe", "history", "of", "science", "travel", "budget", "garden"]


def make_prompts(path: Path, rows: int) -> None:
    """Distinct prompts of 6-30 words (a row number makes each one unique)."""
    with open(path, "w") as handle:
        for i in range(rows):
            words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6 + i % 25))
            handle.write(json.dumps({"id": f"r{i}", "prompt": f"{words} (case {i})"}) + "\n")


def write_config(path: Path, prompts: Path, shard_rows: int) -> None:
    """The quickstart with the prompts file, every prompt, ``shard_rows`` per shard.

    The instant engine's verdicts are hashes, no better than chance on the gold pairs, so the
    calibration gate is set to warn (a real build would stop there and ask for a better judge).
    """
    import yaml

    config = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    config["ingest"].pop("limit", None)
    config["ingest"].update(path=str(prompts), shard_rows=shard_rows)
    config.setdefault("filter", {})["calibration"] = {"gate": "warn"}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class TreeMemory:
    """Peak RSS of a process and its descendants (sum) and of its largest process."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            sizes = []
            for process in processes:
                try:
                    sizes.append(process.memory_info().rss)
                except psutil.Error:
                    pass
            if sizes:
                self.peak_total = max(self.peak_total, sum(sizes))
                self.peak_single = max(self.peak_single, max(sizes))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_build(config: Path, dataset: Path, log: Path, timeout: float) -> tuple[float, TreeMemory]:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
               DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([INSTANT_MODELS_PRELOAD]))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    command = [sys.executable, "-m", "prefcurate.cli", "build", "-c", str(config), "-d", str(dataset)]
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # the build's watchdog ends its workers and server
            process.wait()
            code = "timeout"
        finally:
            memory.stop()
    seconds = time.perf_counter() - started
    if code != 0:
        sys.stderr.write(log.read_text(errors="replace")[-6000:])
        raise SystemExit(f"build failed ({code}) after {seconds:.0f} s; log: {log}")
    return seconds, memory


def stage_seconds(dataset: Path) -> tuple[float, dict[str, float]]:
    """(the last build run's seconds, {stage: seconds}) from the runs table."""
    from prefcurate.store import Store

    runs = Store.open(dataset, upgrade=False).runs().to_dicts()
    build = [r for r in runs if r["kind"] == "build" and r["status"] == "completed"][-1]
    stages = {}
    for run in runs:
        if json.loads(run["parameters"] or "{}").get("parent_run") == build["run_id"]:
            stages[run["kind"]] = float(json.loads(run["timings"] or "{}").get("seconds", 0.0))
    return float(json.loads(build["timings"])["seconds"]), stages


def size_key(rows: int) -> str:
    return f"{rows // 1000}k" if rows % 1000 == 0 and rows >= 1000 else str(rows)


def main() -> None:
    sizes = [int(s) for s in os.environ.get("PREFCURATE_SCALE_SIZES", "1000,10000,100000").split(",") if s]
    shard_rows = int(os.environ.get("PREFCURATE_SCALE_SHARD_ROWS", "1000"))
    timeout = float(os.environ.get("PREFCURATE_SCALE_TIMEOUT_S", "1500"))
    keep = os.environ.get("PREFCURATE_BENCH_KEEP") == "1"
    scratch = Path(tempfile.mkdtemp(prefix="prefcurate-scale-"))
    print(f"instant engine double and hashed embeddings (no model); shard_rows={shard_rows}; "
          f"Dask LocalCluster; scratch {scratch}")
    header = f"{'prompts':>8} " + " ".join(f"{s:>8}" for s in STAGES) + \
        f" {'build_s':>8} {'ms/prompt':>9} {'command_s':>9} {'noop_s':>7} {'rss_mb':>7} {'max_proc_mb':>11}"
    rows = []
    try:
        for size in sizes:
            folder = scratch / size_key(size)
            folder.mkdir()
            prompts, config, dataset = folder / "prompts.jsonl", folder / "config.yaml", folder / "dataset"
            make_prompts(prompts, size)
            write_config(config, prompts, shard_rows)
            command_s, memory = run_build(config, dataset, folder / "build.log", timeout)
            build_s, stages = stage_seconds(dataset)
            noop_s, _ = run_build(config, dataset, folder / "noop.log", timeout)
            row = {"prompts": size, "stages": stages, "build_s": build_s, "ms_per_prompt": 1000 * build_s / size,
                   "command_s": command_s, "noop_s": noop_s, "rss_mb": memory.peak_total / 2**20,
                   "max_proc_mb": memory.peak_single / 2**20}
            rows.append(row)
            print(f"{size:>8} " + " ".join(f"{stages.get(s, float('nan')):8.1f}" for s in STAGES)
                  + f" {build_s:8.1f} {row['ms_per_prompt']:9.2f} {command_s:9.1f} {noop_s:7.1f}"
                    f" {row['rss_mb']:7.0f} {row['max_proc_mb']:11.0f}", flush=True)
    finally:
        if keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(header)
    for row in rows:
        print(f"{row['prompts']:>8} " + " ".join(f"{row['stages'].get(s, float('nan')):8.1f}" for s in STAGES)
              + f" {row['build_s']:8.1f} {row['ms_per_prompt']:9.2f} {row['command_s']:9.1f} {row['noop_s']:7.1f}"
                f" {row['rss_mb']:7.0f} {row['max_proc_mb']:11.0f}")
    first, last = rows[0], rows[-1]
    last_key = "100k" if last["prompts"] == 100_000 else size_key(last["prompts"])
    result = [f"ms_per_prompt_{size_key(first['prompts'])}={first['ms_per_prompt']:.2f}"]
    if last is not first:
        result.append(f"ms_per_prompt_{last_key}={last['ms_per_prompt']:.2f}")
        result.append(f"growth={last['ms_per_prompt'] / first['ms_per_prompt']:.2f}")
    result.append(f"noop_rerun_s={last['noop_s']:.1f}")
    result.append(f"peak_rss_mb_{last_key}={last['rss_mb']:.0f}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
