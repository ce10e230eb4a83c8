"""Fixtures for integration tests: real CPU vLLM servers started with infra/vllm/launch.py.

``vllm_replicas`` (session scope) starts two OpenAI-compatible replicas of the embedded
Gemma 3 270M on loopback (free ports, ``VLLM_CPU_KVCACHE_SPACE=1``) once per session and
stops them by PID at the end; start-up takes ~1.5-4 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_launcher():
    """infra/vllm/launch.py is a script, not a package module: load it by path."""
    name = "prefcurate_infra_vllm_launch"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "infra" / "vllm" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def launcher():
    return load_launcher()


@pytest.fixture(scope="session")
def prepared_model() -> str:
    from prefcurate.inference.models import is_prepared, resolve_model_path

    if not is_prepared():
        pytest.skip("the embedded model is not prepared (run `prefcurate models prepare`)")
    return resolve_model_path("default")


@pytest.fixture(scope="session")
def vllm_replicas(prepared_model, launcher, tmp_path_factory):
    """Two live CPU vLLM replicas: a list of launch.ReplicaProcess (pid, port, url, log)."""
    launch = launcher
    workdir = tmp_path_factory.mktemp("vllm-pool")
    pid_file = workdir / "replicas.json"
    spec = launch.LaunchSpec(
        model=prepared_model,
        served_model_name="gemma3-270m",
        device="cpu",
        replicas=2,
        base_port=0,
        max_model_len=1024,
        kv_cache_space_gb=1,
        max_num_seqs=16,
    )
    replicas = launch.start(spec, pid_file, log_dir=workdir / "logs", wait_timeout_s=900)
    try:
        yield replicas
    finally:
        launch.stop(pid_file)
