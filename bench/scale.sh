#!/usr/bin/env bash
# Measurements for issue 11's restart and catch-up targets; see bench/README.md.
#   bench/scale.sh restart [--keys K] [--victim follower|leader] [--out DIR]
#   bench/scale.sh catchup [--keys K] [--clients N] [--baseline S] [--load S] [--add-member] [--out DIR]
# Either takes --random-values: loadgen fills values with random letters
# (incompressible: the snapshot stream's LZ4 cannot shrink them) instead of
# one repeated byte (which shrinks ~28x and so flatters a transfer).
# Both start a fresh 3-node cluster (bin/start_nodes.sh on a temporary config:
# free loopback ports, data under ${TMPDIR:-/tmp}, fsync on) and write every
# key once with `loadgen --preload-only`.
#   restart: SIGKILLs one node, starts it again at once, and times how long
#     until it answers `clerk status` and until its applied index reaches the
#     highest commit index the cluster had when it was killed (no writes
#     meanwhile).
#   catchup: measures the 64-client put load alone (baseline), then starts the
#     same load again, SIGKILLs a follower, deletes its data directory, removes
#     it (`clerk member remove`: a wiped node may not return under its old id)
#     and replaces it by a new node 4 started with `kvserver --join` and added
#     with `clerk member add` (learner, streamed snapshot, catch-up,
#     promotion); it has caught up when that command returns. It reports the
#     clients' p99 during that load against the baseline's, and every node's
#     RSS, the new one's included, while it receives (sampled every
#     RSS_SAMPLE_S). With --add-member no follower is touched: node 4 is
#     added to the three (bench/membership.sh add runs this).
# Reads indexes with `clerk status --json`. Prints one JSON object (also in
# OUT/restart.json or OUT/catchup.json) after a few human-readable lines. The
# cluster is stopped on exit, on failure and on Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# write_config, node_pids, rss_kib and the RSS sampler.
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

VALUE_SIZE="${VALUE_SIZE:-256}"
PRELOAD_CLIENTS="${PRELOAD_CLIENTS:-512}"
PRELOAD_TIMEOUT_S="${PRELOAD_TIMEOUT_S:-3600}"
RSS_SAMPLE_S="${RSS_SAMPLE_S:-0.5}"
# How long a node may take to come back and catch up before we give up.
MAX_WAIT_S="${MAX_WAIT_S:-1800}"
# Seconds between two `clerk status` polls while waiting.
POLL_S=0.2
# catchup: the load runs this long before the follower is killed.
LEAD_S=3
START_TIMEOUT_S=300
STOP_TIMEOUT_S=60
RUN_SLACK_S=120

MODE=""
KEYS=1000000
VICTIM=follower
CLIENTS=64
BASELINE_S=15
LOAD_S=60
OUT=""
ADD_MEMBER=0
RANDOM_VALUES=()

usage() {
    echo "usage: bench/scale.sh restart [--keys K (default $KEYS)] [--victim follower|leader] [--out DIR]"
    echo "       bench/scale.sh catchup [--keys K (default $KEYS)] [--clients N (default $CLIENTS)]" \
        "[--baseline S (default $BASELINE_S)] [--load S (default $LOAD_S)] [--add-member] [--random-values] [--out DIR]"
}
die_usage() { echo "scale.sh: $1" >&2; usage >&2; exit 2; }
say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
fail() { echo "scale.sh: FAIL: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die_usage "a subcommand is required"
case "$1" in
    restart|catchup) MODE="$1"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die_usage "unknown subcommand '$1'" ;;
esac
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keys|--victim|--clients|--baseline|--load|--out)
            [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
            case "$1" in
                --keys) KEYS="$2" ;;
                --victim) VICTIM="$2" ;;
                --clients) CLIENTS="$2" ;;
                --baseline) BASELINE_S="$2" ;;
                --load) LOAD_S="$2" ;;
                --out) OUT="$2" ;;
            esac
            shift 2 ;;
        --add-member) ADD_MEMBER=1; shift ;;
        --random-values) RANDOM_VALUES=(--random-values); shift ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unexpected argument '$1'" ;;
    esac
done
for pair in "keys:$KEYS" "clients:$CLIENTS" "baseline:$BASELINE_S" "load:$LOAD_S" \
    "PRELOAD_CLIENTS:$PRELOAD_CLIENTS" "PRELOAD_TIMEOUT_S:$PRELOAD_TIMEOUT_S" "MAX_WAIT_S:$MAX_WAIT_S"; do
    [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die_usage "${pair%%:*} '${pair#*:}' is not a positive whole number"
done
[[ "$VICTIM" == follower || "$VICTIM" == leader ]] || die_usage "--victim must be follower or leader, not '$VICTIM'"
[[ "$MODE" == restart || "$VICTIM" == follower ]] || die_usage "catchup always wipes a follower (no --victim)"
command -v python3 >/dev/null || { echo "scale.sh: python3 is required" >&2; exit 2; }

OUT="${OUT:-${TMPDIR:-/tmp}/kv-scale/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/logs"
[[ ! -e "$OUT/$MODE.json" ]] || die_usage "$OUT already holds a $MODE.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kv-scale-work.XXXXXX")"

CUR_CONFIG=""
LOAD_PID=""
stop_cluster() {
    [[ -n "$CUR_CONFIG" ]] || return 0
    stop_nodes_keep_logs
    CUR_CONFIG=""
}
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    rss_stop
    if [[ -n "$LOAD_PID" ]]; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
    fi
    stop_cluster
    rm -rf "$WORK"
    exit "$status"
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT TERM

build_release
LOADGEN="$TARGET_DIR/release/loadgen"
CLERK="$TARGET_DIR/release/clerk"
KVSERVER="$TARGET_DIR/release/kvserver"
for binary in "$LOADGEN" "$CLERK" "$KVSERVER"; do
    [[ -x "$binary" ]] || fail "$binary is missing after the build"
done
{
    echo "date: $(date -u '+%F %T UTC')"
    echo "machine: $(nproc) CPUs, $(uname -sr), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "data dir: $WORK ($(df -T "$WORK" | awk 'NR == 2 { print $2 }'))"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "parameters: $MODE, keys $KEYS, value ${VALUE_SIZE} B, victim $VICTIM, clients $CLIENTS, baseline ${BASELINE_S}s, load ${LOAD_S}s"
    echo "config_json: ${CONFIG_JSON:-none}"
    echo "loadavg_before: $(cat /proc/loadavg)"
} >"$OUT/machine.txt"

# Microseconds on the wall clock.
now_us() { echo "${EPOCHREALTIME/./}"; }
# Milliseconds as seconds with 3 decimals.
ms_as_s() { printf '%d.%03d' "$(($1 / 1000))" "$(($1 % 1000))"; }

# `clerk status --json` of the current cluster, or "[]" when no node answers.
status_json() {
    timeout -k 2 10 "$CLERK" --config "$CUR_CONFIG" --timeout 1 status --json 2>/dev/null || echo "[]"
}
# From a status JSON: "LEADER_ID LEADER_COMMIT MAX_COMMIT" then, for node ID,
# "REACHABLE ROLE APPLIED" (0 - 0 when unreachable).
status_fields() { # JSON ID
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    nodes = json.loads(sys.argv[1])
except ValueError:
    nodes = []
node_id = int(sys.argv[2])
leaders = [n for n in nodes if n.get("role") == "leader"]
commits = [n["commit"] for n in nodes if isinstance(n.get("commit"), int)]
me = [n for n in nodes if n.get("id") == node_id and isinstance(n.get("applied"), int)]
print(leaders[0]["id"] if leaders else 0, leaders[0]["commit"] if leaders else 0, max(commits or [0]),
      1 if me else 0, me[0]["role"] if me else "-", me[0]["applied"] if me else 0)
PY
}

LOG_DIR=""
pid_of() { cat "$LOG_DIR/node$1.pid"; }

start_cluster() {
    CUR_CONFIG="$WORK/scale-$MODE-$$.json"
    write_config "$CUR_CONFIG" "$WORK/data" || fail "no free ports"
    LOG_DIR="$ROOT/logs/$(basename "$CUR_CONFIG" .json)"
    (cd "$ROOT" && timeout -k 10 "$START_TIMEOUT_S" bin/start_nodes.sh --config "$CUR_CONFIG") \
        >"$OUT/logs/start.log" 2>&1 \
        || fail "bin/start_nodes.sh failed: $(tail -n 1 "$OUT/logs/start.log") (log: $OUT/logs/start.log)"
    sleep 1
}

preload() {
    local status=0
    say "preloading $KEYS keys ($PRELOAD_CLIENTS writes in flight; progress: $OUT/logs/preload.err)"
    timeout --foreground -k 10 "$((PRELOAD_TIMEOUT_S + RUN_SLACK_S))" "$LOADGEN" --config "$CUR_CONFIG" \
        --clients 64 --value-size "$VALUE_SIZE" ${RANDOM_VALUES[@]+"${RANDOM_VALUES[@]}"} --keys "$KEYS" --preload-only \
        --preload-clients "$PRELOAD_CLIENTS" --preload-timeout "$PRELOAD_TIMEOUT_S" --json \
        >"$OUT/logs/preload.out" 2>"$OUT/logs/preload.err" || status=$?
    [[ "$status" == 0 ]] || fail "loadgen --preload-only exited with status $status: $(grep '^loadgen:' "$OUT/logs/preload.err" | tail -n 1) (log: $OUT/logs/preload.err)"
    say "  $(grep '^\[preload' "$OUT/logs/preload.err" | tail -n 1 | sed 's/  */ /g')"
}

# The id of a node in ROLE (leader or follower), from clerk status.
pick_node() { # ROLE
    local json
    json="$(status_json)"
    python3 - "$json" "$1" <<'PY'
import json, sys
nodes = [n for n in json.loads(sys.argv[1]) if n.get("role") == sys.argv[2]]
if not nodes:
    sys.exit(1)
print(sorted(n["id"] for n in nodes)[-1])
PY
}

# SIGKILLs node ID and waits until it is gone (bounded).
kill_node() { # ID
    local pid i
    pid="$(pid_of "$1")"
    kill -KILL "$pid" 2>/dev/null || fail "node $1 (pid $pid) is not running"
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "node $1 (pid $pid) still runs 10 s after SIGKILL"
}

# Starts node ID again as bin/start_nodes.sh does (its log and pid file).
restart_node() { # ID
    (
        cd "$ROOT"
        echo "=== scale.sh: restarting node $1 at $(date '+%F %T') ===" >>"$LOG_DIR/node$1.log"
        nohup "$KVSERVER" --config "$CUR_CONFIG" --id "$1" >>"$LOG_DIR/node$1.log" 2>&1 </dev/null &
        echo $! >"$LOG_DIR/node$1.pid"
    )
}

# Polls clerk status until node ID answers and its applied index reaches
# TARGET; sets REACHABLE_S and CAUGHT_UP_S (seconds since START_US).
wait_caught_up() { # ID TARGET START_US
    local id="$1" target="$2" start="$3" leader commit reachable role applied
    local last_say=0 elapsed_ms elapsed
    REACHABLE_S=""
    CAUGHT_UP_S=""
    while true; do
        read -r leader commit _ reachable role applied <<<"$(status_fields "$(status_json)" "$id")"
        elapsed_ms="$((($(now_us) - start) / 1000))"
        elapsed="$(ms_as_s "$elapsed_ms")"
        if [[ "$reachable" == 1 && -z "$REACHABLE_S" ]]; then
            REACHABLE_S="$elapsed"
            say "  node $id answers after ${elapsed}s (role $role, applied $applied)"
        fi
        if [[ "$reachable" == 1 ]] && ((applied >= target)); then
            CAUGHT_UP_S="$elapsed"
            say "  node $id caught up after ${elapsed}s (applied $applied >= $target; leader $leader at commit $commit)"
            return 0
        fi
        if ! kill -0 "$(pid_of "$id")" 2>/dev/null; then
            fail "node $id exited while catching up; last lines of its log: $(tail -n 3 "$LOG_DIR/node$id.log" | tr '\n' ' ')"
        fi
        if ((elapsed_ms > MAX_WAIT_S * 1000)); then
            fail "node $id did not catch up within ${MAX_WAIT_S}s (applied $applied, target $target)"
        fi
        if ((elapsed_ms - last_say >= 5000)); then
            say "  ${elapsed}s: node $id applied $applied of $target (leader $leader commit $commit)"
            last_say="$elapsed_ms"
        fi
        sleep "$POLL_S"
    done
}

data_bytes() { du -sb "$1" 2>/dev/null | cut -f1 || echo 0; }

run_restart() {
    local id target start json rss_file data_dir size
    start_cluster
    preload
    id="$(pick_node "$VICTIM")" || fail "no $VICTIM in clerk status"
    json="$(status_json)"
    read -r _ _ target _ _ _ <<<"$(status_fields "$json" "$id")"
    data_dir="$WORK/data/node$id"
    size="$(data_bytes "$data_dir")"
    say "SIGKILL node $id ($VICTIM; $size bytes in $data_dir), then start it again; target applied index $target"
    kill_node "$id"
    start="$(now_us)"
    restart_node "$id"
    rss_file="$OUT/logs/restart.rss"
    rss_start "$rss_file" "$(pid_of "$id")"
    wait_caught_up "$id" "$target" "$start"
    rss_stop
    python3 - "$OUT/restart.json" "$KEYS" "$VICTIM" "$id" "$target" "$size" "$REACHABLE_S" "$CAUGHT_UP_S" \
        "$(rss_max "$rss_file")" "$OUT/logs/preload.out" <<'PY'
import json, sys
path, keys, victim, node, target, size, reachable, caught, rss, preload = sys.argv[1:]
pre = [l for l in open(preload).read().splitlines() if l.startswith("{")]
pre = json.loads(pre[-1]) if pre else {}
result = {"mode": "restart", "keys": int(keys), "victim": victim, "node": int(node),
          "target_applied": int(target), "data_dir_bytes": int(size),
          "answers_after_s": float(reachable), "caught_up_after_s": float(caught),
          "restarted_node_rss_kib_max": (json.loads(rss) or [0])[0],
          "preload_s": pre.get("preload_s"), "preload_keys": pre.get("preload_keys")}
open(path, "w").write(json.dumps(result) + "\n")
print(f"restart of a {victim} holding {int(keys)} keys ({int(size) / 2**20:.0f} MiB on disk): answers after "
      f"{float(reachable):.2f} s, caught up (applied >= {target}) after {float(caught):.2f} s; its RSS "
      f"at most {result['restarted_node_rss_kib_max'] / 1024:.0f} MiB meanwhile", file=sys.stderr)
print(json.dumps(result))
PY
}

# Sets LOAD: loadgen's closed-loop puts with CLIENTS clients for SECONDS,
# bounded; TAG names its plot.
load_args() { # TAG SECONDS
    LOAD=(timeout -k 10 "$(($2 + RUN_SLACK_S))" "$LOADGEN" --config "$CUR_CONFIG"
        --clients "$CLIENTS" --duration "$2" --value-size "$VALUE_SIZE" ${RANDOM_VALUES[@]+"${RANDOM_VALUES[@]}"} --keys "$KEYS"
        --read-ratio 0 --json --plot "$OUT/$1.svg")
}

# Starts node 4 with --join on a free loopback port (its log and pid file
# beside the others) and adds it with `clerk member add`, which returns once
# it has caught up and been promoted; sets CAUGHT_UP_S (since START_US).
add_member() { # START_US
    local port addr
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    addr="127.0.0.1:$port"
    (
        cd "$ROOT"
        nohup "$KVSERVER" --config "$CUR_CONFIG" --id 4 --join --listen "$addr" \
            --data-dir "$WORK/data/node4" >>"$LOG_DIR/node4.log" 2>&1 </dev/null &
        echo $! >"$LOG_DIR/node4.pid"
    )
    # The new node's RSS is sampled too (fourth column): it receives the snapshot.
    # shellcheck disable=SC2046
    rss_start "$RSS_FILE" $(for n in 1 2 3 4; do pid_of "$n"; done)
    timeout -k 5 "$((MAX_WAIT_S + 10))" "$CLERK" --config "$CUR_CONFIG" --timeout "$MAX_WAIT_S" \
        member add 4 "$addr" >"$OUT/logs/member-add.out" 2>&1 \
        || fail "clerk member add 4 $addr failed: $(tail -n 1 "$OUT/logs/member-add.out")"
    CAUGHT_UP_S="$(ms_as_s "$((($(now_us) - $1) / 1000))")"
    REACHABLE_S="$CAUGHT_UP_S"
    say "  $(tr '\n' ' ' <"$OUT/logs/member-add.out")after ${CAUGHT_UP_S}s"
}

run_catchup() {
    local id target start status=0 data_dir size
    start_cluster
    preload
    say "baseline: $CLIENTS clients writing for ${BASELINE_S}s"
    load_args baseline "$BASELINE_S"
    "${LOAD[@]}" >"$OUT/logs/baseline.out" 2>"$OUT/logs/baseline.err" \
        || fail "baseline loadgen failed: $(grep '^loadgen:' "$OUT/logs/baseline.err" | tail -n 1) (log: $OUT/logs/baseline.err)"
    if ((ADD_MEMBER)); then
        id=4
        size="$(data_bytes "$WORK/data/node1")"
        say "load: $CLIENTS clients writing for ${LOAD_S}s; after ${LEAD_S}s node 4 is started with --join and added (node 1 holds $size bytes)"
    else
        id="$(pick_node follower)" || fail "no follower in clerk status"
        data_dir="$WORK/data/node$id"
        size="$(data_bytes "$data_dir")"
        say "load: $CLIENTS clients writing for ${LOAD_S}s; after ${LEAD_S}s node $id (a follower, $size bytes) is killed and wiped, removed, and replaced by node 4 (--join on a fresh port)"
    fi
    load_args during "$LOAD_S"
    "${LOAD[@]}" >"$OUT/logs/during.out" 2>"$OUT/logs/during.err" &
    LOAD_PID=$!
    sleep "$LEAD_S"
    RSS_FILE="$OUT/logs/catchup.rss"
    if ! ((ADD_MEMBER)); then
        # A wiped node may not come back under its old id (issue 13: it could
        # vote twice in a term); the supported replacement is remove, then a
        # new member with --join, which is what is measured.
        kill_node "$id"
        rm -rf "$data_dir"
        timeout -k 5 "$((MAX_WAIT_S + 10))" "$CLERK" --config "$CUR_CONFIG" --timeout "$MAX_WAIT_S" \
            member remove "$id" >"$OUT/logs/member-remove.out" 2>&1 \
            || fail "clerk member remove $id failed: $(tail -n 1 "$OUT/logs/member-remove.out")"
        say "  removed node $id: $(tr '\n' ' ' <"$OUT/logs/member-remove.out")"
        id=4
    fi
    read -r _ target _ _ _ _ <<<"$(status_fields "$(status_json)" 1)"
    start="$(now_us)"
    say "  leader's commit index at the add: $target"
    add_member "$start"
    rss_stop
    wait "$LOAD_PID" || status=$?
    LOAD_PID=""
    [[ "$status" == 0 ]] || fail "loadgen during the catch-up exited with status $status: $(grep '^loadgen:' "$OUT/logs/during.err" | tail -n 1) (log: $OUT/logs/during.err)"
    python3 - "$OUT" "$KEYS" "$id" "$target" "$size" "$REACHABLE_S" "$CAUGHT_UP_S" "$LEAD_S" "$LOAD_S" <<'PY'
import json, math, statistics, sys
out, keys, node, target, size, reachable, caught, lead, load = sys.argv[1:]
node, caught, lead, load = int(node), float(caught), float(lead), float(load)
def last_json(path):
    lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"scale.sh: FAIL: no JSON from loadgen in {path}")
    return json.loads(lines[-1])
base, during = last_json(f"{out}/logs/baseline.out"), last_json(f"{out}/logs/during.out")
# Second k of the load covers [k-1, k) s after its start; the follower was
# killed at about `lead` s and caught up `caught` s later.
window = [s for s in during["timeline"] if s["second"] > lead and s["second"] - 1 < lead + caught]
p99s = lambda seconds: [s["p99_ms"] for s in seconds if s["ops"] > 0]
# The clients' p99 over the transfer's seconds, estimated from loadgen's per-second
# (ops, p50, p99, p999): each second's P(latency > x) interpolated log-linearly between
# (p50, 0.5), (p99, 0.01) and (p999, 0.001) (0 past its p999), and the estimate is the x at
# which the ops-weighted tail of the window reaches 1%. It lies between the smallest and the
# largest per-second p99 of the window (the largest bounds it from above).
def tail(s, x):
    points = [(s["p50_ms"], 0.5), (s["p99_ms"], 0.01), (s["p999_ms"], 0.001)]
    if x <= points[0][0]:
        return 0.5
    for (x0, p0), (x1, p1) in zip(points, points[1:]):
        if x <= x1:
            if x1 <= x0:
                return p1
            return math.exp(math.log(p0) + (x - x0) / (x1 - x0) * (math.log(p1) - math.log(p0)))
    return 0.0
def window_p99(seconds):
    seconds = [s for s in seconds if s["ops"] > 0]
    if not seconds:
        return None
    total, low, high = sum(s["ops"] for s in seconds), 0.0, max(s["p999_ms"] for s in seconds)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(s["ops"] * tail(s, mid) for s in seconds) > 0.01 * total else (low, mid)
    return round(high, 2)
estimate = window_p99(window)
rows = [[int(v) for v in l.split()[1:]] for l in open(f"{out}/logs/catchup.rss") if l.strip()]
rss_max = [max(c) for c in zip(*rows)] if rows else []
result = {
    "mode": "catchup", "keys": int(keys), "random_values": base.get("random_values", False), "node": node, "target_applied": int(target),
    "data_dir_bytes_before_wipe": int(size), "answers_after_s": float(reachable), "caught_up_after_s": caught,
    "baseline": {k: base[k] for k in ("ops_per_sec", "p50_ms", "p99_ms", "p999_ms", "max_ms")},
    "during_load": {k: during[k] for k in ("ops_per_sec", "p50_ms", "p99_ms", "p999_ms", "max_ms")},
    "load_s": load, "killed_at_s": lead,
    "transfer_seconds": len(window),
    "transfer_per_second_p99_ms_median": statistics.median(p99s(window)) if p99s(window) else None,
    "transfer_per_second_p99_ms_max": max(p99s(window)) if p99s(window) else None,
    "baseline_per_second_p99_ms_median": statistics.median(p99s(base["timeline"])) if p99s(base["timeline"]) else None,
    "p99_ratio": during["p99_ms"] / base["p99_ms"] if base["p99_ms"] else None,
    "transfer_p99_ms_estimate": estimate,
    "transfer_p99_ratio_estimate": estimate / base["p99_ms"] if estimate and base["p99_ms"] else None,
    "rss_kib_max_per_node": rss_max, "follower_rss_kib_max": rss_max[node - 1] if len(rss_max) >= node else None,
}
if caught + lead > load:
    result["note"] = "the follower caught up after the load ended: the load's p99 covers only part of the transfer"
elif caught + lead < load / 2:
    result["note"] = "the transfer took under half the load: its p99 mixes in seconds after the catch-up; see the per-second figures"
open(f"{out}/catchup.json", "w").write(json.dumps(result) + "\n")
fmt = lambda v: "–" if v is None else f"{v:.1f}"
print(f"node {node} ({'added' if node == 4 else 'wiped'}) with {int(keys)} keys in the cluster: caught up (applied >= {target}) after "
      f"{caught:.2f} s; clients' p99 {during['p99_ms']:.1f} ms during the load vs {base['p99_ms']:.1f} ms baseline "
      f"(x{fmt(result['p99_ratio'])}); per-second p99 in the transfer: median "
      f"{fmt(result['transfer_per_second_p99_ms_median'])}, max {fmt(result['transfer_per_second_p99_ms_max'])} ms, "
      f"over the transfer about {fmt(result['transfer_p99_ms_estimate'])} ms (x{fmt(result['transfer_p99_ratio_estimate'])}); "
      f"follower RSS at most {fmt((result['follower_rss_kib_max'] or 0) / 1024)} MiB"
      + (f" ({result['note']})" if "note" in result else ""), file=sys.stderr)
print(json.dumps(result))
PY
}

case "$MODE" in
    restart) run_restart ;;
    catchup) run_catchup ;;
esac
echo "loadavg_after: $(cat /proc/loadavg)" >>"$OUT/machine.txt"
stop_cluster
say "results: $OUT/$MODE.json; logs: $OUT/logs"
