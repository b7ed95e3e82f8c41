#!/usr/bin/env bash
# Stops the nodes bin/start_nodes.sh started for a cluster file:
#   bin/stop_nodes.sh [--config FILE]         (default conf/cluster.json)
# Sends SIGTERM to each pid in logs/<config name>/node<N>.pid that is a live
# kvserver, waits up to 10 s for them to exit, then sends SIGKILL to any that
# remain. Pid files are removed. Processes are found by pid file only, never
# by name, so other clusters and other programs are left alone.
set -euo pipefail

usage() { echo "usage: bin/stop_nodes.sh [--config FILE]"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="conf/cluster.json"
while [[ $# -gt 0 ]]; do
    case "$1" in
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

shopt -s nullglob
PID_FILES=("$LOG_DIR"/node*.pid)
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
