"""Processes a build starts must not outlive it.

A build's children (the temporary Prefect server, Dask's nanny and workers, the
``VLLM::EngineCore`` and ``VLLM::Worker`` processes vLLM spawns itself) are started by
libraries we do not control, so no parent-death signal can be set on all of them. Instead a
watchdog process, in a session of its own so a kill of the build's process group does not
reach it, follows the build:

- while the build lives it records every descendant of the build (pid and start time from
  ``/proc/<pid>/stat``, and the ``/dev/shm/psm_*`` segments they map) in
  ``<dataset>/.build.processes``;
- when the build's end closes the pipe it holds (any exit, SIGKILL included), it ends the
  recorded processes and their descendants (SIGTERM, then SIGKILL), unlinks their shared
  memory segments and removes the record.

If the watchdog itself was killed too, the next build of the dataset ends the recorded
processes first (:func:`end_recorded`). Processes are matched by pid *and* start time, never
by name, so a reused pid is never touched.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

RECORD = ".build.processes"
SCAN_SECONDS = 0.5
SHM_SCAN_EVERY = 10  # scans: a vLLM process maps thousands of regions


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not exist or
    has exited (a zombie that its parent, or init, has yet to reap: ending it again waited out
    both signals' grace, ~10 s, for nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
                continue
    return parents


def descendants(roots: set[int]) -> set[int]:
    """Every living process below ``roots`` (the roots excluded)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in roots:
                found.add(child)
                todo.append(child)
    return found


def _shm_segments(pid: int) -> set[str]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "/dev/shm/psm_" in line}


def _write_record(path: Path, owner: tuple[int, int], processes: dict[int, int], segments: set[str]) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(json.dumps({"owner": list(owner), "processes": sorted(processes.items()),
                                     "shm": sorted(segments)}))
    os.replace(temporary, path)


def _read_record(path: Path) -> tuple[tuple[int, int] | None, dict[int, int], set[str]]:
    try:
        record = json.loads(path.read_text())
        owner = tuple(record["owner"]) if record.get("owner") else None
        processes = {int(pid): int(start) for pid, start in record.get("processes", [])}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None, {}, set()
    return owner, processes, set(record.get("shm", []))


def end_processes(processes: dict[int, int], grace_s: float = 5.0) -> list[int]:
    """End the processes still alive with their recorded start time, and their descendants."""
    alive = {pid: start for pid, start in processes.items() if start_time(pid) == start}
    alive.update({pid: start_time(pid) for pid in descendants(set(alive))})
    alive = {pid: start for pid, start in alive.items() if start is not None}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in alive.items():
            if start_time(pid) == start:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(start_time(p) == s for p, s in alive.items()):
            time.sleep(0.1)
    return sorted(alive)


def _unlink_segments(segments: set[str]) -> None:
    for segment in segments:
        if segment.startswith("/dev/shm/psm_"):
            Path(segment).unlink(missing_ok=True)


def end_recorded(dataset: Path) -> list[int]:
    """End what an earlier build of ``dataset`` left running; returns the pids ended."""
    path = Path(dataset) / RECORD
    owner, processes, segments = _read_record(path)
    if owner is not None and start_time(owner[0]) == owner[1]:
        return []  # its build still runs (the writer lock says it is this very process)
    ended = end_processes(processes) if processes else []
    _unlink_segments(segments)
    path.unlink(missing_ok=True)
    return ended


def watch(build_pid: int, build_start: int, dataset: Path, lifeline: int = 0) -> None:
    """Record the build's descendants until ``lifeline`` closes (the build ended), then end them."""
    path = Path(dataset) / RECORD
    _, processes, segments = _read_record(path)
    # what the build started before (a process running several commands: a test) is not ours
    since = start_time(os.getpid())
    scans, written = 0, None
    while start_time(build_pid) == build_start:
        for pid in descendants({build_pid}) - {os.getpid()}:
            start = start_time(pid)
            if start is not None and start >= since:
                processes[pid] = start
        if scans % SHM_SCAN_EVERY == 0:
            for pid in processes:
                segments |= _shm_segments(pid)
        scans += 1
        if written != (len(processes), len(segments)):  # rewritten only when it grows
            _write_record(path, (build_pid, build_start), processes, segments)
            written = (len(processes), len(segments))
        readable, _, _ = select.select([lifeline], [], [], SCAN_SECONDS)
        if readable and not os.read(lifeline, 1):
            break  # EOF: the build exited, whatever the way
    # the build's own descendants, reparented or not, plus what is still below the recorded ones
    end_processes(processes)
    _unlink_segments(segments)
    path.unlink(missing_ok=True)


def start_watchdog(dataset: Path) -> subprocess.Popen:
    """Start the watchdog of this process's build of ``dataset``, after ending an earlier one's orphans.

    Call while holding the dataset's writer lock. The watchdog keeps the read end of a pipe
    whose write end only this process holds: it sees EOF when this process ends. One
    watchdog per process (a second command in the same process is followed by the first).
    """
    if getattr(start_watchdog, "watchdog", None) is not None:
        return start_watchdog.watchdog
    ended = end_recorded(dataset)
    if ended:
        print(f"ended {len(ended)} processes left running by an earlier build of {dataset}: "
              f"pids {' '.join(map(str, ended))}", file=sys.stderr)
    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "prefcurate.procwatch", str(os.getpid()), str(start_time(os.getpid())),
         str(Path(dataset).resolve())],
        stdin=read_end, start_new_session=True, close_fds=True,
        # it outlives the build by the moments it takes to end what is left: holding the build's
        # stdout or stderr, it would keep `prefcurate build | tee log` waiting for it
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(read_end)
    os.set_inheritable(write_end, False)  # children must not keep the build's lifeline open
    start_watchdog.lifeline = write_end  # held open for the life of this process
    start_watchdog.watchdog = watchdog
    return watchdog


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the build; the watchdog follows it
    watch(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
