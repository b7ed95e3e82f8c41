#!/usr/bin/env bash
# The standard benchmark of kvstore-raft (issue 4 §3); see bench/README.md.
#   bench/run.sh [--duration S] [--warmup S] [--scenarios LIST] [--out DIR]
# Every scenario runs on a fresh 3-node cluster (bin/start_nodes.sh on a
# temporary config: free loopback ports, an empty data dir under
# ${TMPDIR:-/tmp}, fsync on), driven by target/release/loadgen. Prints a
# markdown table and writes the raw loadgen JSON (plus RSS) to the output
# dir. The cluster is stopped on exit, on failure and on Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_SCENARIOS="put_c1,put_c16,put_c64,put_c256,get_lin_c64,mixed_r50_c64,overload"
DURATION=10
WARMUP=0
SCENARIOS="$DEFAULT_SCENARIOS"
OUT=""
# The workload (as compare.sh: 256-byte values, 10 000 uniform keys).
VALUE_SIZE="${VALUE_SIZE:-256}"
KEYS="${KEYS:-10000}"
# Overload: open loop at OVERLOAD_FACTOR x the put_c64 peak, sent by this
# many clerks (more than the cluster can serve at once, so requests queue).
OVERLOAD_FACTOR="${OVERLOAD_FACTOR:-4}"
OVERLOAD_CLIENTS="${OVERLOAD_CLIENTS:-4096}"
# Time limits: a start (it may build), a stop, and a run beyond its length.
START_TIMEOUT_S=300
STOP_TIMEOUT_S=60
RUN_SLACK_S=120

usage() {
    echo "usage: bench/run.sh [--duration S (default $DURATION)] [--warmup S (default 0)]" \
        "[--scenarios LIST (default $DEFAULT_SCENARIOS)] [--out DIR]"
}
die_usage() { echo "run.sh: $1 ($(usage))" >&2; exit 2; }
say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
fail() { echo "run.sh: FAIL: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration|--warmup|--scenarios|--out)
            [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
            case "$1" in
                --duration) DURATION="$2" ;;
                --warmup) WARMUP="$2" ;;
                --scenarios) SCENARIOS="$2" ;;
                --out) OUT="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unexpected argument '$1'" ;;
    esac
done
[[ "$DURATION" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--duration '$DURATION' is not a number of seconds"
[[ "$WARMUP" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die_usage "--warmup '$WARMUP' is not a number of seconds"
IFS=, read -r -a SCEN_LIST <<<"$SCENARIOS"
for scen in "${SCEN_LIST[@]}"; do
    [[ "$scen" =~ ^(put_c[0-9]+|get_lin_c[0-9]+|mixed_r[0-9]+_c[0-9]+|overload)$ ]] \
        || die_usage "unknown scenario '$scen' (put_c<N>, get_lin_c<N>, mixed_r<P>_c<N>, overload)"
done
# The overload rate comes from put_c64's peak: run put_c64 first if it is
# not listed before overload.
if [[ ",$SCENARIOS," == *,overload,* ]]; then
    before_overload="${SCENARIOS%%overload*}"
    [[ ",$before_overload" == *,put_c64,* ]] || SCEN_LIST=(put_c64 "${SCEN_LIST[@]}")
fi
command -v python3 >/dev/null || { echo "run.sh: python3 is required" >&2; exit 2; }

OUT="${OUT:-${TMPDIR:-/tmp}/kv-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT/logs"
[[ ! -e "$OUT/runs.jsonl" ]] || die_usage "$OUT already holds a runs.jsonl"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kv-bench-work.XXXXXX")"

CUR_CONFIG=""
stop_cluster() {
    [[ -n "$CUR_CONFIG" ]] || return 0
    local name
    name="$(basename "$CUR_CONFIG" .json)"
    (cd "$ROOT" && timeout -k 5 "$STOP_TIMEOUT_S" bin/stop_nodes.sh --config "$CUR_CONFIG") \
        >>"$OUT/logs/stop.log" 2>&1 || say "warning: bin/stop_nodes.sh failed (see $OUT/logs/stop.log)"
    # The nodes' logs (start_nodes.sh keeps them under the project's logs/).
    if [[ -d "$ROOT/logs/$name" ]]; then
        rm -rf "$OUT/logs/$name"
        mv "$ROOT/logs/$name" "$OUT/logs/$name" || true
    fi
    rm -rf "$(dirname "$CUR_CONFIG")"
    CUR_CONFIG=""
}
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    stop_cluster
    rm -rf "$WORK"
    exit "$status"
}
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT TERM

say "building release binaries"
(cd "$ROOT" && cargo build --release --bins --quiet) >"$OUT/logs/build.log" 2>&1 \
    || fail "cargo build failed (log: $OUT/logs/build.log)"
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
LOADGEN="$TARGET_DIR/release/loadgen"
[[ -x "$LOADGEN" ]] || fail "$LOADGEN is missing after the build"

FS_TYPE="$(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
[[ "$FS_TYPE" != tmpfs ]] || say "warning: $WORK is on tmpfs, so fsync costs nothing: set TMPDIR to a disk"
{
    echo "date: $(date -u '+%F %T UTC')"
    echo "machine: $(nproc) CPUs, $(uname -sr), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "cpu: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "data dir: $WORK ($FS_TYPE)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "parameters: duration ${DURATION}s, warmup ${WARMUP}s, value ${VALUE_SIZE} B, keys $KEYS"
    echo "loadavg_before: $(cat /proc/loadavg)"
} >"$OUT/machine.txt"

# Writes a cluster file for 3 nodes on free loopback ports (below the
# ephemeral range; bound without SO_REUSEADDR, so TIME_WAIT ports are
# skipped) with its data dir next to it.
write_config() {
    python3 - "$1" "$2" <<'PY'
import json, random, socket, sys
path, data_dir = sys.argv[1], sys.argv[2]
try:
    low_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low_ephemeral = 32768
rng = random.SystemRandom()
ports = []
for _ in range(1000):
    port = rng.randrange(15000, min(low_ephemeral, 32768))
    if port in ports or 23780 <= port < 23820:  # etcd-bench's ports
        continue
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        ports.append(port)
    except OSError:
        pass
    finally:
        s.close()
    if len(ports) == 3:
        break
else:
    sys.exit("found no 3 free loopback ports")
nodes = [{"id": i + 1, "ip": "127.0.0.1", "port": p} for i, p in enumerate(ports)]
json.dump({"raft_nodes": nodes, "data_dir": data_dir}, open(path, "w"))
PY
}

# The RSS (KiB) of each node of the current cluster, as a JSON list, read
# from the pid files bin/start_nodes.sh keeps.
rss_kib() {
    local name pid_file pid list=()
    name="$(basename "$CUR_CONFIG" .json)"
    for pid_file in "$ROOT/logs/$name"/node*.pid; do
        pid="$(cat "$pid_file" 2>/dev/null || true)"
        list+=("$( (ps -o rss= -p "$pid" 2>/dev/null || echo 0) | tr -d ' ')")
    done
    (IFS=,; echo "[${list[*]}]")
}

start_cluster() { # TAG
    local dir="$WORK/$1"
    mkdir -p "$dir"
    CUR_CONFIG="$dir/bench-$1-$$.json"
    write_config "$CUR_CONFIG" "$dir/data" || fail "no free ports for $1"
    (cd "$ROOT" && timeout -k 10 "$START_TIMEOUT_S" bin/start_nodes.sh --config "$CUR_CONFIG") \
        >"$OUT/logs/$1.start.log" 2>&1 \
        || fail "bin/start_nodes.sh failed for $1: $(tail -n 1 "$OUT/logs/$1.start.log") (log: $OUT/logs/$1.start.log)"
    sleep 1
}

# The last "loadgen:" line of a stderr file (its one-line reason), else
# its last line.
loadgen_error() {
    grep '^loadgen:' "$1" | tail -n 1 | grep . || tail -n 1 "$1"
}

# run_loadgen TAG ARGS...: the measured run; its JSON plus the scenario and
# RSS before and after goes to runs.jsonl, and the line itself to stdout.
run_loadgen() {
    local tag="$1" rss_before rss_after line
    shift
    rss_before="$(rss_kib)"
    local limit
    limit="$(python3 -c "import math; print(math.ceil($DURATION + $WARMUP + $RUN_SLACK_S))")"
    local warm=()
    [[ "$WARMUP" == 0 ]] || warm=(--warmup "$WARMUP")
    # --foreground: loadgen stays in our process group, so Ctrl-C reaches it.
    local status=0
    timeout --foreground -k 10 "$limit" "$LOADGEN" --config "$CUR_CONFIG" --duration "$DURATION" \
        --value-size "$VALUE_SIZE" --keys "$KEYS" "${warm[@]}" --json --plot "$OUT/$tag.svg" "$@" \
        >"$OUT/logs/$tag.out" 2>"$OUT/logs/$tag.err" || status=$?
    case "$status" in
        0) ;;
        130) say "interrupted"; exit 130 ;;
        124|137) fail "loadgen ($tag) ran past ${limit}s (log: $OUT/logs/$tag.err)" ;;
        *) fail "loadgen ($tag) exited with status $status: $(loadgen_error "$OUT/logs/$tag.err") (log: $OUT/logs/$tag.err)" ;;
    esac
    rss_after="$(rss_kib)"
    line="$(python3 - "$OUT/logs/$tag.out" "$tag" "$rss_before" "$rss_after" <<'PY'
import json, sys
path, tag, before, after = sys.argv[1:]
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
if not lines:
    sys.exit(f"loadgen printed no JSON object ({path})")
result = json.loads(lines[-1])
result.update(scenario=tag, rss_kib_before=json.loads(before), rss_kib_after=json.loads(after))
print(json.dumps(result))
PY
)" || fail "loadgen ($tag): no result (see $OUT/logs/$tag.out)"
    echo "$line" >>"$OUT/runs.jsonl"
    echo "$line"
}

# One field of a JSON line.
field() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

PEAK_C64=""
run_scenario() { # SCENARIO
    local scen="$1" clients ratio=0 preload=() line
    case "$scen" in
        put_c*) clients="${scen#put_c}" ;;
        get_lin_c*) clients="${scen#get_lin_c}"; ratio=1; preload=(--preload) ;;
        mixed_r*)
            clients="${scen##*_c}"
            ratio="$(python3 -c "print(int('${scen#mixed_r}'.split('_')[0]) / 100)")"
            preload=(--preload) ;;
        overload) run_overload; return ;;
    esac
    say "$scen: $clients clients, read ratio $ratio, ${DURATION}s"
    start_cluster "$scen"
    line="$(run_loadgen "$scen" --clients "$clients" --read-ratio "$ratio" "${preload[@]}")"
    stop_cluster
    [[ "$scen" != put_c64 ]] || PEAK_C64="$(field "$line" ops_per_sec)"
    say "  $(field "$line" ops_per_sec | cut -d. -f1) ops/s, p99 $(field "$line" p99_ms) ms"
}

run_overload() {
    [[ -n "$PEAK_C64" ]] || fail "overload needs the put_c64 peak, and put_c64 did not run"
    local rate
    rate="$(python3 -c "print(round($PEAK_C64 * $OVERLOAD_FACTOR, 1))")"
    say "overload: open loop at $rate ops/s (${OVERLOAD_FACTOR}x put_c64) with $OVERLOAD_CLIENTS clerks, ${DURATION}s"
    start_cluster overload
    run_loadgen overload --clients "$OVERLOAD_CLIENTS" --read-ratio 0 --rate "$rate" >/dev/null
    stop_cluster
}

for scen in "${SCEN_LIST[@]}"; do
    run_scenario "$scen"
    sleep 1
done
echo "loadavg_after: $(cat /proc/loadavg)" >>"$OUT/machine.txt"

python3 - "$OUT" "$PEAK_C64" <<'PY' | tee "$OUT/table.md"
import json, sys
out, peak = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
machine = open(f"{out}/machine.txt").read().splitlines()
mib = lambda kib: max(kib) / 1024 if kib else 0.0
print(" ".join(l for l in machine if l.startswith(("date:", "machine:"))))
print()
print("| scenario | ops/s | p50 ms | p99 ms | p99.9 ms | errors | busy | max RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    errors = sum(r["errors"].values()) if isinstance(r["errors"], dict) else r["errors"]
    print(f"| {r['scenario']} | {r['ops_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
          f"| {r['p999_ms']:.2f} | {errors} | {r['busy']} | {mib(r['rss_kib_after']):.1f} |")
for r in runs:
    if r["scenario"] != "overload":
        continue
    peak = float(peak)
    fmt = lambda kib: ", ".join(f"{k / 1024:.1f}" for k in kib)
    print()
    print(f"overload: open loop at {r['rate']:.0f} ops/s ({r['rate'] / peak:.1f}x the put_c64 peak of "
          f"{peak:.0f} ops/s), {r['clients']} clerks: goodput {r['ops_per_sec']:.0f} ops/s = "
          f"{100 * r['ops_per_sec'] / peak:.0f}% of the peak; busy {r['busy']}; "
          f"{r['unsent']} of {r['scheduled']} scheduled requests never sent; "
          f"node RSS MiB before [{fmt(r['rss_kib_before'])}] after [{fmt(r['rss_kib_after'])}]")
PY
say "raw runs: $OUT/runs.jsonl; table: $OUT/table.md; plots: $OUT/*.svg"
