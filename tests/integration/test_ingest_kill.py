"""`prefcurate ingest` killed with SIGKILL, then run again: the dataset and its accounting equal
an uninterrupted ingest (same ids, no duplicates, no gaps, no visible temporary file).

Real command lines against one Prefect server for the module (see test_crash_resume.py):

- ``test_kill_after_registration_then_rerun``: the test-only hook
  ``PREFCURATE_TEST_KILL_AT=after_register`` kills the coordinator right after it registered
  the unit (shards and counts) and before the run is finished. ``status`` must show the run
  ``interrupted`` and the file's accounting; the re-run adds nothing.
- ``test_two_ingest_commands_at_once``: overlapping files, or the same file twice: the second
  command waits for the writer lock; distinct ids == rows and the accounting counts each once.
- ``test_sigkill_at_random_points_of_a_large_ingest``: 200,000 prompts (with duplicates and
  bad rows), SIGKILL of the command's process group at seeded random moments across the run's
  duration, each followed by a re-run; the figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefcurate.steps.ingest import ingest_accounting
from prefcurate.store import Store
from tests.integration import test_crash_resume
from tests.integration.test_crash_resume import REPO, _assert_clean, _env, _kill_group, _start

prefect_server = test_crash_resume.prefect_server  # the fixture, shared with the crash-resume tests

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3000)]


def _prompts_file(path: Path, n: int) -> Path:
    distinct = n - n // 10  # the last tenth repeat earlier prompts (under other ids): duplicates
    lines = [json.dumps({"id": f"p{i}", "prompt": f"Prompt {i % distinct}: explain topic {i % distinct % 97}."})
             for i in range(n)]
    lines[7] = '{"id": "broken'  # malformed: quarantined
    path.write_text("\n".join(lines) + "\n")
    return path


def _ingest_command(source: Path, dataset: Path) -> list[str]:
    return [sys.executable, "-m", "prefcurate.cli", "ingest", str(source), "-d", str(dataset),
            "--set", "ingest.shard_rows=20000"]


def _run(command, env, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    return done


def _state(dataset: Path) -> tuple[list[str], dict]:
    store = Store.open(dataset)
    _assert_clean(store, "prompts", "prompt_id")
    ids = sorted(store.read("prompts", ["prompt_id"])["prompt_id"].to_list())
    return ids, ingest_accounting(store).row(0, named=True)


def test_kill_after_registration_then_rerun(prefect_server, tmp_path):
    env = _env(prefect_server, tmp_path / "prefect-home")
    source = _prompts_file(tmp_path / "prompts.jsonl", 20_000)
    reference = tmp_path / "reference"
    assert _run(_ingest_command(source, reference), env, tmp_path / "ref.log").returncode == 0
    expected = _state(reference)
    said = (tmp_path / "ref.log").read_text()  # the accounting, and where the malformed line is
    assert f"read {expected[1]['rows_read']} = accepted" in said and "quarantined 1 " in said
    assert f"see them: prefcurate sql -d {reference} " in said

    dataset = tmp_path / "ds"
    killed = _start(_ingest_command(source, dataset), {**env, "PREFCURATE_TEST_KILL_AT": "after_register"},
                    tmp_path / "killed.log")
    assert killed.wait(timeout=900) == -9, (tmp_path / "killed.log").read_text()[-3000:]
    _kill_group(killed)  # its Dask workers
    assert _state(dataset) == expected  # the accounting was registered with the shards
    status = subprocess.run([sys.executable, "-m", "prefcurate.cli", "status", "-d", str(dataset)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert "interrupted" in status.stdout and "[holds]" in status.stdout, status.stdout
    assert f"read {expected[1]['rows_read']} " in status.stdout
    rerun = _run(_ingest_command(source, dataset), env, tmp_path / "rerun.log")
    assert rerun.returncode == 0 and "nothing added" in (tmp_path / "rerun.log").read_text()
    assert _state(dataset) == expected


def test_sigkill_at_random_points_of_a_large_ingest(prefect_server, tmp_path):
    env = _env(prefect_server, tmp_path / "prefect-home")
    source = _prompts_file(tmp_path / "prompts.jsonl", 200_000)
    reference = tmp_path / "reference"
    started = time.monotonic()
    assert _run(_ingest_command(source, reference), env, tmp_path / "ref.log").returncode == 0
    duration = time.monotonic() - started
    expected = _state(reference)
    rng = random.Random(17)
    points, lost, duplicated, leftovers = [], 0, 0, 0
    for attempt in range(4):
        dataset = tmp_path / f"ds{attempt}"
        delay = rng.uniform(0.1, 1.0) * duration
        process = _start(_ingest_command(source, dataset), env, tmp_path / f"killed{attempt}.log")
        time.sleep(delay)
        _kill_group(process)
        points.append(round(delay, 1))
        rerun = _run(_ingest_command(source, dataset), env, tmp_path / f"rerun{attempt}.log")
        assert rerun.returncode == 0, (tmp_path / f"rerun{attempt}.log").read_text()[-3000:]
        ids, accounting = _state(dataset)
        lost += len(set(expected[0]) - set(ids))
        duplicated += len(ids) - len(set(ids))
        leftovers += sum(1 for _ in dataset.rglob("*.tmp"))
        assert ids == expected[0] and accounting == expected[1], (delay, accounting, expected[1])
    print(f"\nRESULT ingest SIGKILL points (s of {duration:.0f}): {points}; rows lost {lost}, "
          f"duplicated {duplicated}; hidden temporary files left {leftovers}")


@pytest.mark.parametrize("overlap", ["overlapping_files", "same_file"])
def test_two_ingest_commands_at_once(prefect_server, tmp_path, overlap):
    """The second writer waits for the first (and says who holds the dataset); nothing doubles."""
    env = _env(prefect_server, tmp_path / "prefect-home")
    first = _prompts_file(tmp_path / "a.jsonl", 20_000)
    second = first if overlap == "same_file" else tmp_path / "b.jsonl"
    if overlap != "same_file":
        lines = first.read_text().splitlines()
        second.write_text("\n".join(lines[10_000:] + [json.dumps({"prompt": f"New prompt {i}"}) for i in range(5000)])
                          + "\n")
    dataset = tmp_path / "ds"
    writers = [_start(_ingest_command(path, dataset), env, tmp_path / f"writer{n}.log")
               for n, path in enumerate((first, second))]
    assert [w.wait(timeout=900) for w in writers] == [0, 0]
    logs = [(tmp_path / f"writer{n}.log").read_text() for n in range(2)]
    assert any("dataset busy" in log and "held by pid" in log for log in logs)
    store = Store.open(dataset)
    prompts = store.read("prompts", ["prompt_id"])
    distinct = 18_000 + (0 if overlap == "same_file" else 5000)  # (line 7's text comes again later)
    assert prompts.height == prompts["prompt_id"].n_unique() == distinct
    accounting = ingest_accounting(store).row(0, named=True)
    read = 20_000 + (0 if overlap == "same_file" else 15_000)
    assert accounting["rows_read"] == read and accounting["accepted"] == distinct
    assert read == accounting["accepted"] + accounting["quarantined"] + accounting["duplicates"]
