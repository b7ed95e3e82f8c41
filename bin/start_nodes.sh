#!/usr/bin/env bash
# Starts every node of a cluster file in the background, on this machine:
#   bin/start_nodes.sh [--config FILE]        (default conf/cluster.json)
# Builds the release binaries first (cargo does nothing when they are up to
# date), runs `kvserver --config FILE --id N` per node under nohup with its
# output in logs/<config name>/node<N>.log and its pid in node<N>.pid, then
# waits until `clerk status` shows exactly one leader. A node whose pid file
# names a live kvserver is left alone, so starting twice starts no
# duplicates. Nodes run with the project root as their working directory, so
# a relative data_dir in the config is under the project root.
set -euo pipefail

usage() { echo "usage: bin/start_nodes.sh [--config FILE]"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="conf/cluster.json"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config)
            [[ $# -ge 2 ]] || { echo "start_nodes.sh: --config needs a FILE" >&2; exit 3; }
            CONFIG="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "start_nodes.sh: unexpected argument '$1' ($(usage))" >&2; exit 3 ;;
    esac
done
# A relative --config is relative to where the script was called from, or
# failing that to the project root (the default is).
if [[ "$CONFIG" != /* ]]; then
    if [[ -f "$PWD/$CONFIG" ]]; then CONFIG="$PWD/$CONFIG"; else CONFIG="$ROOT/$CONFIG"; fi
fi
[[ -f "$CONFIG" ]] || { echo "start_nodes.sh: config file $CONFIG does not exist" >&2; exit 3; }
cd "$ROOT"

# How long to wait for a leader, and how many log lines to show when a node dies.
LEADER_WAIT_SECS=30
LOG_TAIL_LINES=20

NAME="$(basename "$CONFIG" .json)"
LOG_DIR="$ROOT/logs/$NAME"
mkdir -p "$LOG_DIR"

if command -v cargo >/dev/null; then
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    echo "building release binaries in $TARGET_DIR ..."
    cargo build --release --bins --quiet
else
    TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    echo "cargo not found: using the binaries already in $TARGET_DIR/release"
fi
KVSERVER="$TARGET_DIR/release/kvserver"
CLERK="$TARGET_DIR/release/clerk"
for binary in "$KVSERVER" "$CLERK"; do
    [[ -x "$binary" ]] || { echo "start_nodes.sh: $binary is missing; build failed?" >&2; exit 1; }
done

# The whole config is checked by the same code the nodes use before any node
# starts, so a typo never leaves a half-started cluster: clerk exits 3 on a
# bad config (2 only means no node answers yet).
if config_error="$("$CLERK" --config "$CONFIG" --timeout 1 status --json 2>&1 >/dev/null)"; then
    :
elif [[ $? -eq 3 ]]; then
    echo "start_nodes.sh: bad config: ${config_error#clerk: }" >&2
    exit 3
fi

# The node ids, one per line; a file that is not JSON with a raft_nodes list
# is reported in one line (kvserver names any finer problem itself).
IDS="$(python3 - "$CONFIG" <<'PY'
import json, sys
path = sys.argv[1]
try:
    with open(path) as f:
        nodes = json.load(f)["raft_nodes"]
    for node in nodes:
        print(int(node["id"]))
except Exception as e:
    print(f"start_nodes.sh: {path}: cannot read the node ids: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
PY
)"

# Whether PID is a live kvserver process (and not an unrelated process that
# reused the pid of one that exited).
is_kvserver() {
    local pid="$1" argv0
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    argv0="$(head -z -n 1 "/proc/$pid/cmdline" 2>/dev/null | tr -d '\0')" || return 1
    [[ "$(basename -- "$argv0")" == kvserver ]]
}

STARTED=()
for id in $IDS; do
    pid_file="$LOG_DIR/node$id.pid"
    log_file="$LOG_DIR/node$id.log"
    if [[ -f "$pid_file" ]] && is_kvserver "$(cat "$pid_file")"; then
        echo "node $id is already running (pid $(cat "$pid_file")); not starting it again"
        continue
    fi
    echo "=== start_nodes.sh: starting node $id at $(date '+%F %T') ===" >>"$log_file"
    nohup "$KVSERVER" --config "$CONFIG" --id "$id" >>"$log_file" 2>&1 </dev/null &
    echo $! >"$pid_file"
    STARTED+=("$id")
    echo "started node $id (pid $!), log $log_file"
done

# Fails with the tail of its log when a node started above has exited.
check_started_alive() {
    local id pid
    for id in "${STARTED[@]+"${STARTED[@]}"}"; do
        pid="$(cat "$LOG_DIR/node$id.pid")"
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "start_nodes.sh: node $id (pid $pid) exited at start; last lines of $LOG_DIR/node$id.log:" >&2
            tail -n "$LOG_TAIL_LINES" "$LOG_DIR/node$id.log" >&2
            rm -f "$LOG_DIR/node$id.pid"
            echo "start_nodes.sh: the other nodes may still run; stop them with bin/stop_nodes.sh --config $CONFIG" >&2
            exit 1
        fi
    done
}

# Prints the leader's id when exactly one node says it leads.
one_leader() {
    "$CLERK" --config "$CONFIG" --timeout 1 status --json 2>/dev/null | python3 -c '
import json, sys
try:
    nodes = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
leaders = [n for n in nodes if n["role"] == "leader"]
if len(leaders) != 1:
    sys.exit(1)
print(leaders[0]["id"], leaders[0]["term"])
'
}

deadline=$((SECONDS + LEADER_WAIT_SECS))
while true; do
    check_started_alive
    if leader="$(one_leader)"; then
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "start_nodes.sh: no single leader after ${LEADER_WAIT_SECS} s; logs are in $LOG_DIR; status:" >&2
        "$CLERK" --config "$CONFIG" --timeout 1 status >&2 || true
        exit 1
    fi
    sleep 0.2
done

read -r leader_id leader_term <<<"$leader"
clerk_cmd="$CLERK"
[[ "$clerk_cmd" == "$ROOT"/* ]] && clerk_cmd="${clerk_cmd#"$ROOT"/}"
config_arg=""
[[ "$CONFIG" != "$ROOT/conf/cluster.json" ]] && config_arg=" --config $CONFIG"
cat <<USAGE
cluster is up: node $leader_id leads (term $leader_term); logs in $LOG_DIR
try:
  $clerk_cmd$config_arg put a 1
  $clerk_cmd$config_arg get a
  $clerk_cmd$config_arg status
  $clerk_cmd$config_arg shell
stop it with: bin/stop_nodes.sh$config_arg
USAGE
# The Redis-protocol ports, when the file gives nodes a resp_port.
resp_ports="$(python3 -c 'import json, sys
print(" ".join(str(n["resp_port"]) for n in json.load(open(sys.argv[1]))["raft_nodes"] if "resp_port" in n))' "$CONFIG")"
if [[ -n "$resp_ports" ]]; then
    echo "Redis clients: redis-cli -p PORT, PORT one of: $resp_ports (any node accepts any command)"
fi
