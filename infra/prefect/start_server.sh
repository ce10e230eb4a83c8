#!/usr/bin/env bash
# Start a local Prefect server (SQLite) + a process worker, and deploy prefect.yaml.
#
#   bash infra/prefect/start_server.sh        # or: make server
#   bash infra/prefect/stop_server.sh         # stops what this started (PIDs in $PREFECT_HOME/pids)
#
# Steps, each skipped when already done (the script is safe to re-run):
#   1. `prefect server start` on $PREFECT_SERVER_HOST:$PREFECT_SERVER_PORT, in the background,
#      then wait until /api/health answers (a loaded 2-core machine needs a minute or more);
#   2. the process work pool `prefcurate-process`;
#   3. one global concurrency limit per inference pool of the configs in $PREFCURATE_CONFIGS,
#      named `pool-<name>`: 1 for an embedded pool (one engine), the number of replicas for a
#      `servers` pool; a stage holds the slots of its pools while its units run;
#   4. `prefect --no-prompt deploy --all` from the repository root (prefect.yaml);
#   5. `prefect worker start --pool prefcurate-process`, in the background, with
#      PREFCURATE_HOME (the pull step's working directory) and PYTHONPATH set.
#
# Environment (all optional):
#   PREFECT_HOME                 server database, logs, pids       (default: <repo>/.prefect)
#   PREFECT_SERVER_HOST / _PORT  where the API and UI listen       (default: 127.0.0.1 / 4200)
#   PREFCURATE_CONFIGS           configs whose pools get limits    (default: examples/quickstart.yaml)
#   PREFECT_STARTUP_TIMEOUT_S    wait for the server's health      (default: 180)
#   PREFECT_BIN                  the prefect executable            (default: .venv/bin/prefect, else PATH)
#   PREFCURATE_DEPLOY=0          skip step 4;  PREFCURATE_WORKER=0  skip step 5
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

if [[ -z "${PREFECT_BIN:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/prefect" ]]; then
        PREFECT_BIN="$REPO/.venv/bin/prefect"
    else
        PREFECT_BIN="$(command -v prefect || true)"
    fi
fi
if [[ -z "$PREFECT_BIN" || ! -x "$PREFECT_BIN" ]]; then
    echo "error: no prefect executable (run \`make setup\` or set PREFECT_BIN)" >&2
    exit 2
fi
PYTHON_BIN="$(dirname "$PREFECT_BIN")/python"

export PREFECT_HOME="${PREFECT_HOME:-$REPO/.prefect}"
HOST="${PREFECT_SERVER_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_PORT:-4200}"
TIMEOUT_S="${PREFECT_STARTUP_TIMEOUT_S:-180}"
CONFIGS="${PREFCURATE_CONFIGS:-examples/quickstart.yaml}"
PIDS="$PREFECT_HOME/pids"

export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}"
# a run waiting for a pool slot asks again within 1 s (Prefect's default cap is 30 s: a freed
# slot stayed idle while its waiters slept; see SLOT_WAIT_S in flows/common.py)
export PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="${PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS:-1}"
export GX_ANALYTICS_ENABLED="${GX_ANALYTICS_ENABLED:-false}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
# the package need not be installed: flow runs and deploy import it from the repository
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PREFCURATE_HOME="$REPO"
# units must find their pool's concurrency limit on this server (they exist: step 3)
export PREFCURATE_POOL_LIMITS="${PREFCURATE_POOL_LIMITS:-strict}"

mkdir -p "$PREFECT_HOME"
prefect() { "$PREFECT_BIN" --no-prompt "$@"; }

healthy() { curl -fsS --max-time 5 "$PREFECT_API_URL/health" >/dev/null 2>&1; }

pid_alive() {  # pid_alive NAME: the recorded process of that name is running
    local pid
    pid="$(awk -v name="$1" '$1 == name {print $2}' "$PIDS" 2>/dev/null | tail -n 1)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

record_pid() { echo "$1 $2" >>"$PIDS"; }

# ---- 1. server -------------------------------------------------------------------------
if healthy; then
    echo "Prefect server already answers at $PREFECT_API_URL"
else
    if pid_alive server; then
        echo "Prefect server (pid $(awk '$1 == "server" {print $2}' "$PIDS" | tail -n 1)) is starting; waiting"
    else
        echo "starting Prefect server on $HOST:$PORT (PREFECT_HOME=$PREFECT_HOME, log: $PREFECT_HOME/server.log)"
        # setsid: the server gets its own process group, which stop_server.sh ends as a whole
        setsid "$PREFECT_BIN" server start --host "$HOST" --port "$PORT" \
            >"$PREFECT_HOME/server.log" 2>&1 </dev/null &
        record_pid server $!
    fi
    waited=0
    until healthy; do
        if ! pid_alive server; then
            echo "error: the Prefect server exited; last lines of $PREFECT_HOME/server.log:" >&2
            tail -n 30 "$PREFECT_HOME/server.log" >&2 || true
            exit 1
        fi
        if (( waited >= TIMEOUT_S )); then
            echo "error: no answer from $PREFECT_API_URL/health after ${TIMEOUT_S}s (see $PREFECT_HOME/server.log)" >&2
            exit 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    echo "Prefect server is up (${waited}s)"
fi

# ---- 2. work pool ----------------------------------------------------------------------
if prefect work-pool inspect prefcurate-process >/dev/null 2>&1; then
    echo "work pool prefcurate-process exists"
else
    prefect work-pool create prefcurate-process --type process >/dev/null
    echo "created work pool prefcurate-process (type process)"
fi

# ---- 3. one global concurrency limit per inference pool ---------------------------------
# shellcheck disable=SC2086
"$PYTHON_BIN" - $CONFIGS <<'PY' >"$PREFECT_HOME/pool_limits.txt"
import sys

from prefcurate.config import load_config
from prefcurate.inference.pools import concurrency_limits

limits = {}
for path in sys.argv[1:]:
    for name, slots in concurrency_limits(load_config(path).pools).items():
        limits[name] = max(limits.get(name, 0), slots)
for name, slots in sorted(limits.items()):
    print(name, slots)
PY
while read -r name slots; do
    if prefect gcl inspect "$name" >/dev/null 2>&1; then
        echo "concurrency limit $name exists"
    else
        prefect gcl create "$name" --limit "$slots" >/dev/null
        echo "created concurrency limit $name (limit $slots)"
    fi
done <"$PREFECT_HOME/pool_limits.txt"

# ---- 4. deployments --------------------------------------------------------------------
if [[ "${PREFCURATE_DEPLOY:-1}" != "0" ]]; then
    echo "deploying prefect.yaml (log: $PREFECT_HOME/deploy.log)"
    if ! prefect deploy --all >"$PREFECT_HOME/deploy.log" 2>&1; then
        echo "error: prefect deploy failed; last lines of $PREFECT_HOME/deploy.log:" >&2
        tail -n 40 "$PREFECT_HOME/deploy.log" >&2
        exit 1
    fi
    prefect deployment ls 2>/dev/null | grep -E "build-dataset|adhoc" || true
fi

# ---- 5. worker -------------------------------------------------------------------------
if [[ "${PREFCURATE_WORKER:-1}" != "0" ]]; then
    if pid_alive worker; then
        echo "worker already running (pid $(awk '$1 == "worker" {print $2}' "$PIDS" | tail -n 1))"
    else
        setsid "$PREFECT_BIN" worker start --pool prefcurate-process --type process \
            >"$PREFECT_HOME/worker.log" 2>&1 </dev/null &
        record_pid worker $!
        echo "started process worker for prefcurate-process (pid $!, log: $PREFECT_HOME/worker.log)"
    fi
fi

cat <<EOF

Prefect UI:   http://$HOST:$PORT
API:          export PREFECT_API_URL=$PREFECT_API_URL
Run a build:  prefect deployment run 'build-dataset/adhoc-build' \\
                -p parameters='{"config_path": "examples/quickstart.yaml", "dataset": "datasets/adhoc", "overrides": {"ingest.limit": 8}}'
One stage:    prefect deployment run 'ingest/ingest-adhoc'
Stop:         bash infra/prefect/stop_server.sh
EOF
