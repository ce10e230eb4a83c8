"""A pool slot must not outlive its holder.

A build's temporary Prefect server keeps slot leases in memory: when the build is killed the
leases die with it while the taken slot stays counted in the PREFECT_HOME database, so the
next build waited forever at its first annotate unit. Here a real process starts a temporary
server (as `prefcurate build` does), takes the only ``pool-judges`` slot and is SIGKILLed
with its server; a second process on the same PREFECT_HOME must then get that slot, and a
unit that waits for a slot says which one and how many are taken.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

HOLDER = textwrap.dedent("""
    import time
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefcurate.flows.common import ensure_prefect_api

    ensure_prefect_api()
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="pool-judges", limit=1))
    with concurrency("pool-judges", occupy=1, strict=True):
        print("held", flush=True)
        time.sleep(3600)
""")

NEXT_BUILD = textwrap.dedent("""
    import contextvars, logging, os, threading
    from prefect.concurrency.sync import concurrency
    from prefcurate.flows.common import POOL_WAIT_REPORT_ENV, ensure_prefect_api, pool_slots

    logging.basicConfig(level=logging.WARNING)
    ensure_prefect_api()
    with pool_slots(["judges"], mode="strict"):
        print("entered", flush=True)
    os.environ[POOL_WAIT_REPORT_ENV] = "2"
    entered = threading.Event()
    def waiting_unit():
        with pool_slots(["judges"], mode="strict"):
            entered.set()
    with concurrency("pool-judges", occupy=1, strict=True):
        waiter = threading.Thread(target=contextvars.copy_context().run, args=(waiting_unit,), daemon=True)
        waiter.start()
        assert not entered.wait(timeout=6)
    assert entered.wait(timeout=120)
    print("second entered", flush=True)
""")


def test_a_killed_holders_slot_is_freed_for_the_next_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFCURATE_POOL_LIMITS="strict")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        lines = []
        for line in holder.stdout:
            lines.append(line)
            if line.strip() == "held" or time.monotonic() > deadline:
                break
        assert lines and lines[-1].strip() == "held", "".join(lines)[-3000:]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the build and its temporary server, as a kill -9 of the group
        holder.wait(timeout=30)

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", NEXT_BUILD], env=env, capture_output=True, text=True,
                            timeout=600, start_new_session=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "freed the slots of pool-judges" in output
    assert "entered" in result.stdout and "second entered" in result.stdout
    # the unit that had to wait said what for
    assert "concurrency slot of pool-judges" in output and "1/1 slots taken" in output, output[-4000:]
    print(f"next build got the slot {time.monotonic() - started:.0f} s after the kill (server start included)")
