#!/usr/bin/env bash
# The Redis-protocol benchmark (issue 15): redis-benchmark against a fresh 3-node
# kvstore-raft cluster (through the leader's resp_port), the same runs against one real
# redis-server with appendonly yes + appendfsync always (durable, not replicated), and
# loadgen on the native protocol at the same client count, value size and key count.
#
#   bench/redis.sh [--requests N (200000)] [--clients C (50)] [--out FILE]
#
# Installs redis-server and redis-tools with apt-get when redis-benchmark or redis-server
# is missing. Prints a markdown table and writes it (with the exact commands) to
# bench/results/<date>-redis.md unless --out names another file. Data lives under
# ${TMPDIR:-/tmp} (fsync on; a warning is printed when that is tmpfs). Every process it
# starts is stopped on exit, failure or Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUESTS=200000
CLIENTS=50
VALUE_SIZE=256
KEYS=10000
PIPELINE=16
LOADGEN_SECS="${LOADGEN_SECS:-15}"
OUT_FILE="$ROOT/bench/results/$(date -u +%Y-%m-%d)-redis.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --requests) REQUESTS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --out) OUT_FILE="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "redis.sh: unexpected argument '$1' (see --help)" >&2; exit 3 ;;
    esac
done

say() { echo "redis.sh: $*" >&2; }
fail() { say "$*"; exit 1; }

if ! command -v redis-benchmark >/dev/null || ! command -v redis-server >/dev/null; then
    say "installing redis-server and redis-tools with apt-get"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get install -y -q redis-server redis-tools >/dev/null \
        || fail "apt-get install redis-server redis-tools failed"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/redis-bench.XXXXXX")"
if [[ "$(stat -f -c %T "$WORK")" == tmpfs ]]; then
    say "warning: $WORK is on tmpfs, where fsync costs nothing: the figures flatter both sides"
fi
CONFIG="$WORK/cluster.json"
REDIS_PID=""
cleanup() {
    [[ -n "$REDIS_PID" ]] && kill "$REDIS_PID" 2>/dev/null || true
    [[ -f "$CONFIG" ]] && (cd "$ROOT" && timeout -k 5 30 bin/stop_nodes.sh --config "$CONFIG") >/dev/null 2>&1 || true
    rm -rf "$WORK" "$ROOT/logs/$(basename "$CONFIG" .json)"
}
trap cleanup EXIT INT TERM

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
say "building release binaries"
(cd "$ROOT" && cargo build --release --bins --quiet) || fail "cargo build failed"
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
LOADGEN="$TARGET_DIR/release/loadgen"

# Three nodes, each with an RPC port and a resp_port, free on loopback; one more port for
# the reference redis-server.
python3 - "$CONFIG" "$WORK/data" "$WORK/redis-port" <<'PY'
import json, socket, sys
path, data_dir, redis_port_file = sys.argv[1:]
ports, held = [], []
for _ in range(7):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s); ports.append(s.getsockname()[1])
for s in held: s.close()
nodes = [{"id": i + 1, "ip": "127.0.0.1", "port": ports[i], "resp_port": ports[3 + i]} for i in range(3)]
json.dump({"raft_nodes": nodes, "data_dir": data_dir, "cluster_id": "redis-bench"}, open(path, "w"), indent=1)
open(redis_port_file, "w").write(str(ports[6]))
PY
REDIS_PORT="$(cat "$WORK/redis-port")"

# redis-benchmark's CSV lines: "SET","45177.23",... -> SET 45177 p50 p99
bench() { # PORT EXTRA...
    local port="$1"; shift
    redis-benchmark -h 127.0.0.1 -p "$port" -t set,get -c "$CLIENTS" -n "$REQUESTS" \
        -d "$VALUE_SIZE" -r "$KEYS" "$@" --csv 2>/dev/null \
        | python3 -c '
import csv, sys
for row in csv.reader(sys.stdin):
    if row and row[0] in ("SET", "GET"):
        print(row[0], round(float(row[1])), row[4] if len(row) > 4 else "?", row[6] if len(row) > 6 else "?")
'
}

declare -A RESULT
record() { # LABEL PORT EXTRA...
    local label="$1"; shift
    while read -r test rps p50 p99; do
        RESULT["$label/$test"]="$rps|$p50|$p99"
        say "$label $test: $rps/s (p50 $p50 ms, p99 $p99 ms)"
    done < <(bench "$@")
}

say "starting the 3-node cluster"
(cd "$ROOT" && bin/start_nodes.sh --config "$CONFIG") >"$WORK/start.log" 2>&1 \
    || { cat "$WORK/start.log" >&2; fail "the cluster did not start"; }
sleep 1
LEADER="$(redis-cli -p "$(python3 -c "import json;print(json.load(open('$CONFIG'))['raft_nodes'][0]['resp_port'])")" info \
    | tr -d '\r' | sed -n 's/^leader_id://p')"
LEADER_PORT="$(python3 -c "import json;print([n['resp_port'] for n in json.load(open('$CONFIG'))['raft_nodes'] if n['id']==$LEADER][0])")"
FOLLOWER_PORT="$(python3 -c "import json;print([n['resp_port'] for n in json.load(open('$CONFIG'))['raft_nodes'] if n['id']!=$LEADER][0])")"
say "leader is node $LEADER (resp_port $LEADER_PORT)"

record "ours" "$LEADER_PORT"
record "ours-P$PIPELINE" "$LEADER_PORT" -P "$PIPELINE"
record "ours-follower" "$FOLLOWER_PORT"
# Native: loadgen's default (the clients share one connection per node, so replies are
# coalesced) and one connection per client, as redis-benchmark has.
for conns in 1 "$CLIENTS"; do
    label=$([[ $conns == 1 ]] && echo native || echo "native-conns$conns")
    for ratio in 0 1; do
        "$LOADGEN" --config "$CONFIG" --clients "$CLIENTS" --conns "$conns" --duration "$LOADGEN_SECS" \
            --value-size "$VALUE_SIZE" --keys "$KEYS" --read-ratio "$ratio" --json \
            >"$WORK/loadgen.json" 2>"$WORK/loadgen.err" \
            || { cat "$WORK/loadgen.err" >&2; fail "loadgen failed"; }
        test=$([[ $ratio == 0 ]] && echo SET || echo GET)
        RESULT["$label/$test"]="$(python3 -c "
import json; r = json.load(open('$WORK/loadgen.json'))
print(f\"{round(r['ops_per_sec'])}|{r['p50_ms']}|{r['p99_ms']}\")")"
        say "$label $test: ${RESULT["$label/$test"]}"
    done
done
(cd "$ROOT" && timeout -k 5 30 bin/stop_nodes.sh --config "$CONFIG") >/dev/null 2>&1

say "starting redis-server (appendonly yes, appendfsync always) on $REDIS_PORT"
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
    --appendfsync always --save "" --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS_VERSION="$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
record "redis" "$REDIS_PORT"
record "redis-P$PIPELINE" "$REDIS_PORT" -P "$PIPELINE"
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=""

cell() { local v="${RESULT[$1]:-?||}"; IFS='|' read -r rps p50 p99 <<<"$v"; echo "$rps | $p50 | $p99"; }
ratio() { python3 -c "a='${RESULT[$1]%%|*}'; b='${RESULT[$2]%%|*}'; print(f'{float(a)/float(b):.2f}' if a.replace('.','').isdigit() and b.replace('.','').isdigit() else '?')"; }
{
    echo "# Redis protocol: redis-benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $(nproc) cores, $(uname -r); commit $(cd "$ROOT" && git rev-parse --short HEAD); redis-server $REDIS_VERSION."
    echo "Data under ${TMPDIR:-/tmp} ($(stat -f -c %T "$WORK")). Command: \`bench/redis.sh --requests $REQUESTS --clients $CLIENTS\`."
    echo
    echo "\`redis-benchmark -t set,get -c $CLIENTS -n $REQUESTS -d $VALUE_SIZE -r $KEYS [-P $PIPELINE] --csv\`;"
    echo "native: \`loadgen --clients $CLIENTS --conns 1|$CLIENTS --duration $LOADGEN_SECS --value-size $VALUE_SIZE --keys $KEYS --read-ratio 0|1\`; load average before: $LOAD_BEFORE."
    echo
    echo "| target | test | ops/s | p50 ms | p99 ms |"
    echo "|---|---|---|---|---|"
    for label in ours "ours-P$PIPELINE" ours-follower native "native-conns$CLIENTS" redis "redis-P$PIPELINE"; do
        for test in SET GET; do
            echo "| $label | $test | $(cell "$label/$test") |"
        done
    done
    echo
    echo "- RESP SET / native put: $(ratio ours/SET native/SET) (target >= 0.80); with one connection per client on both sides: $(ratio ours/SET "native-conns$CLIENTS/SET")"
    echo "- RESP SET -P $PIPELINE / unpipelined: $(ratio "ours-P$PIPELINE/SET" ours/SET) (target >= 2)"
    echo "- ours / durable redis: SET $(ratio ours/SET redis/SET), GET $(ratio ours/GET redis/GET) (goal >= 1)"
} | tee "$OUT_FILE"
say "written to $OUT_FILE"
