"""A SIGKILLed `prefcurate build` leaves no process behind, and the next build finishes.

The build is the real command line on the embedded CPU engine with a tiny config, in a
session of its own; it is killed (the build process alone, as `kill -9 PID` does, not its
group) once vLLM's EngineCore runs. Then every process of the build's session and every
process its watchdog recorded (pid and start time) must be gone within seconds, and a re-run
on the same dataset (with the default lenient pool limits, so slots too) completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefcurate.procwatch import RECORD, start_time

BUILD_TIMEOUT_S = 2400
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 300)]
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "ingest.limit=2", "ingest.shard_rows=2",
    "generate.generators.0.sampling.max_tokens=16", "generate.generators.1.sampling.max_tokens=16",
    "annotate.max_response_chars=200", "annotate.calibration_pairs=4",
    "score.qurating.sample_size=4", "score.qurating.pairs_per_item=2",
    "score.qurating.criteria=[{name: educational_value, description: 'has more educational value'}]",
]


def _build(dataset: Path, log: Path, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "prefcurate.cli", "build", "-c", "examples/quickstart.yaml", "-d", str(dataset)]
    for item in TINY:
        args += ["--set", item]
    with open(log, "w") as sink:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _living(predicate) -> dict[int, str]:
    """pid -> command name of the living (not zombie) processes whose stat fields match."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and predicate(int(entry.name), fields):
            found[int(entry.name)] = name
    return found


def test_a_killed_build_leaves_no_process_and_the_next_build_finishes(tmp_path, prepared_model):
    dataset = tmp_path / "dataset"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    build = _build(dataset, tmp_path / "killed.log", env)
    session = build.pid
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while not _living(lambda pid, f: int(f[3]) == session and "VLLM" in Path(f"/proc/{pid}/stat").read_text()):
        assert build.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "vLLM never started"
        time.sleep(1)
    time.sleep(3)  # let the watchdog's next scan record the engine's workers
    recorded = json.loads((dataset / RECORD).read_text())["processes"]
    before = _living(lambda pid, f: int(f[3]) == session)
    build.send_signal(signal.SIGKILL)
    build.wait()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = _living(lambda pid, f: int(f[3]) == session)
        left.update({pid: "recorded" for pid, start in recorded if start_time(pid) == start})
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes of the killed build remain: {left} (before the kill: {before})"
    assert not (dataset / RECORD).exists()

    rerun = _build(dataset, tmp_path / "rerun.log", env)
    assert rerun.wait(timeout=BUILD_TIMEOUT_S) == 0, (tmp_path / "rerun.log").read_text()[-4000:]
