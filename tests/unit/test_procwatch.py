"""The build's watchdog with real processes: what a killed build started ends with it, and a
later build ends an earlier one's recorded leftovers by pid and start time only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from prefcurate.procwatch import RECORD, end_recorded, start_time

# a "build": the watchdog, then a child in a session of its own (as an escaping server would)
# that starts a grandchild, as vLLM's EngineCore starts its workers
BUILD = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from prefcurate.procwatch import start_watchdog
    start_watchdog(Path(sys.argv[1]))
    child = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; g = subprocess.Popen(['sleep', '300']); print(g.pid, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = child.stdout.readline().strip()
    print(child.pid, grandchild, flush=True)
    time.sleep(300)
""")


def _gone(pids, timeout_s=15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(start_time(pid) is None or _zombie(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _zombie(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_children_of_a_sigkilled_build_end_with_it(tmp_path):
    build = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child, grandchild = map(int, build.stdout.readline().split())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the watchdog has seen both
        recorded = json.loads((tmp_path / RECORD).read_text()) if (tmp_path / RECORD).exists() else {}
        if {child, grandchild} <= {pid for pid, _ in recorded.get("processes", [])}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the watchdog did not record the build's processes: {recorded}")
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert _gone([child, grandchild]), "the killed build's processes outlived it"
    deadline = time.monotonic() + 10
    while (tmp_path / RECORD).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (tmp_path / RECORD).exists()


def test_a_new_build_ends_only_the_recorded_leftovers(tmp_path):
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = {"owner": [2 ** 22 + 7, 1],  # no such process: its build is gone
                  "processes": [[leftover.pid, start_time(leftover.pid)],
                                # same pid as a living process, another start time: a reused pid
                                [stranger.pid, start_time(stranger.pid) - 1]],
                  "shm": []}
        (tmp_path / RECORD).write_text(json.dumps(record))
        assert end_recorded(tmp_path) == [leftover.pid]
        assert leftover.wait(timeout=10) is not None
        assert stranger.poll() is None, "a process with a reused pid was killed"
        assert not (tmp_path / RECORD).exists()

        # a record whose build still runs is left alone
        record["owner"] = [os.getpid(), start_time(os.getpid())]
        record["processes"] = [[stranger.pid, start_time(stranger.pid)]]
        (tmp_path / RECORD).write_text(json.dumps(record))
        assert end_recorded(tmp_path) == [] and stranger.poll() is None
    finally:
        for process in (leftover, stranger):
            process.kill()
            process.wait()


def test_the_watchdog_holds_neither_output_of_the_build(tmp_path):
    """`prefcurate build | tee log` ends when the build does, not when its watchdog, which
    outlives the build while it ends what is left, lets go of the pipe."""
    script = ("import sys; from pathlib import Path; from prefcurate.procwatch import start_watchdog; "
              "print(start_watchdog(Path(sys.argv[1])).pid, flush=True); sys.stdin.readline()")
    build = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        watchdog = int(build.stdout.readline())
        assert [os.readlink(f"/proc/{watchdog}/fd/{fd}") for fd in (1, 2)] == [os.devnull, os.devnull]
    finally:
        build.stdin.close()
        build.wait(timeout=30)
    assert build.stdout.read() == "" and build.stderr.read() == ""  # EOF: nothing else holds them


def test_an_exited_process_not_yet_reaped_counts_as_ended():
    """A zombie keeps its /proc entry until its parent (or init) reaps it: counted alive, ending
    it waited out the grace of both signals for a process that could not die."""
    from prefcurate.procwatch import end_processes

    child = subprocess.Popen(["sleep", "0.3"])
    started = start_time(child.pid)
    try:
        deadline = time.monotonic() + 10
        while not _zombie(child.pid) and time.monotonic() < deadline:  # exited; not reaped: no wait()
            time.sleep(0.05)
        assert _zombie(child.pid) and started is not None
        assert start_time(child.pid) is None
        assert end_processes({child.pid: started}) == []
    finally:
        child.wait()
