#!/usr/bin/env bash
# Stops the nodes bin/start_nodes.sh started for a cluster file:
#   bin/stop_nodes.sh [--config FILE] [--id N] (default conf/cluster.json)
# With --id N only node N is stopped (a rolling restart: stop one, start it
# again with bin/start_nodes.sh, which leaves running nodes alone); when N
# leads, leadership is first handed to another voter (`clerk
# transfer-leader`), so clients see no election gap.
# Sends SIGTERM to each pid in logs/<config name>/node<N>.pid that is a live
# kvserver, waits up to 10 s for them to exit, then sends SIGKILL to any that
# remain. Pid files are removed. KVSTORE_CLERK names the clerk binary used for
# the transfer (default target/release/clerk). Processes are found by pid file only, never
# by name, so other clusters and other programs are left alone.
set -euo pipefail

usage() { echo "usage: bin/stop_nodes.sh [--config FILE] [--id N]"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="conf/cluster.json"
ONLY_ID=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --id)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "stop_nodes.sh: --id needs a node id" >&2; exit 3; }
            ONLY_ID="$2"; shift 2 ;;
        --config)
            [[ $# -ge 2 ]] || { echo "stop_nodes.sh: --config needs a FILE" >&2; exit 3; }
            CONFIG="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "stop_nodes.sh: unexpected argument '$1' ($(usage))" >&2; exit 3 ;;
    esac
done

# How long the nodes get to shut down cleanly before SIGKILL.
STOP_WAIT_SECS=10

LOG_DIR="$ROOT/logs/$(basename "$CONFIG" .json)"

# Whether PID is a live kvserver process (and not an unrelated process that
# reused the pid of one that exited).
is_kvserver() {
    local pid="$1" argv0
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    argv0="$(head -z -n 1 "/proc/$pid/cmdline" 2>/dev/null | tr -d '\0')" || return 1
    [[ "$(basename -- "$argv0")" == kvserver ]]
}

# Hands leadership away from node $1 if it leads: asks the cluster who leads
# and which voters there are, and transfers to the first other voter. A
# failure is reported and the stop goes on (an election then replaces it).
transfer_away_from() {
    local id="$1" clerk="${KVSTORE_CLERK:-$ROOT/target/release/clerk}" config="$CONFIG" list leader target
    [[ -x "$clerk" ]] || return 0
    [[ "$config" == /* || -f "$config" ]] || config="$ROOT/$config"
    CONFIG="$config"
    list="$("$clerk" --config "$CONFIG" --timeout 5 member list --json 2>/dev/null)" || return 0
    leader="$(grep -o '"leader":[0-9]*' <<<"$list" | head -n 1 | cut -d: -f2)"
    [[ "$leader" == "$id" ]] || return 0
    target="$(grep -o '"id":[0-9]*,"address":"[^"]*","role":"voter"' <<<"$list" \
        | cut -d, -f1 | cut -d: -f2 | grep -vx "$id" | head -n 1)"
    if [[ -z "$target" ]]; then
        echo "node $id leads and no other voter can take over" >&2
        return 0
    fi
    if "$clerk" --config "$CONFIG" --timeout 5 transfer-leader "$target"; then
        echo "node$id: handed leadership to node $target"
    else
        echo "node$id: leadership transfer to node $target failed; stopping anyway" >&2
    fi
}

shopt -s nullglob
if [[ -n "$ONLY_ID" ]]; then
    PID_FILES=("$LOG_DIR"/node"$ONLY_ID".pid)
    [[ ${#PID_FILES[@]} -gt 0 ]] && transfer_away_from "$ONLY_ID"
else
    PID_FILES=("$LOG_DIR"/node*.pid)
fi
if [[ ${#PID_FILES[@]} -eq 0 ]]; then
    echo "no pid files in $LOG_DIR: no nodes to stop"
    exit 0
fi

STOPPING=()
for pid_file in "${PID_FILES[@]}"; do
    node="$(basename "$pid_file" .pid)"
    pid="$(cat "$pid_file")"
    if is_kvserver "$pid"; then
        kill -TERM "$pid"
        STOPPING+=("$pid")
        echo "$node (pid $pid): sent SIGTERM"
    else
        echo "$node: not running (pid file named $pid)"
        rm -f "$pid_file"
    fi
done

deadline=$((SECONDS + STOP_WAIT_SECS))
for pid in "${STOPPING[@]+"${STOPPING[@]}"}"; do
    while is_kvserver "$pid" && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if is_kvserver "$pid"; then
        echo "pid $pid did not exit within ${STOP_WAIT_SECS} s: sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
rm -f "${PID_FILES[@]}"
echo "stopped"
