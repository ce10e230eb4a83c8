#!/usr/bin/env bash
# Stop the Prefect server and worker started by start_server.sh (PIDs in $PREFECT_HOME/pids).
# Each was started in its own session, so its whole process group (the worker's flow runs,
# the server's services) is ended: TERM first, KILL after a grace period.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PREFECT_HOME="${PREFECT_HOME:-$REPO/.prefect}"
PIDS="$PREFECT_HOME/pids"
GRACE_S="${PREFECT_STOP_GRACE_S:-20}"

if [[ ! -f "$PIDS" ]]; then
    echo "nothing to stop (no $PIDS)"
    exit 0
fi

# the worker first, so it does not log connection errors while the server goes away
for name in worker server; do
    awk -v name="$name" '$1 == name {print $2}' "$PIDS" | while read -r pid; do
        # the group outlives its leader when a child ignores TERM: check the group
        alive() { kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; }
        alive || continue
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        for _ in $(seq "$GRACE_S"); do
            alive || break
            sleep 1
        done
        if alive; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
        echo "stopped $name (pid $pid)"
    done
done
rm -f "$PIDS"
