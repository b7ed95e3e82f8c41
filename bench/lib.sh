# Shell functions shared by bench/run.sh and bench/scale.sh (sourced, not
# run): the build, a cluster file on free loopback ports, stopping a
# cluster, the nodes' pids, and a sampler of their resident memory. They
# read ROOT (the project root), OUT (the results folder, with logs/ in it),
# CUR_CONFIG (the current cluster file; bin/start_nodes.sh keeps its pid
# files under $ROOT/logs/<its name>/), STOP_TIMEOUT_S, RSS_SAMPLE_S
# (seconds between samples), and call the script's say and fail.

# Builds the release binaries and sets TARGET_DIR (where they are).
build_release() {
    say "building release binaries"
    (cd "$ROOT" && cargo build --release --bins --quiet) >"$OUT/logs/build.log" 2>&1 \
        || fail "cargo build failed (log: $OUT/logs/build.log)"
    TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
}

# Stops the current cluster with bin/stop_nodes.sh and moves the nodes' logs
# (which bin/start_nodes.sh keeps under the project's logs/) to $OUT/logs.
stop_nodes_keep_logs() {
    local name
    name="$(basename "$CUR_CONFIG" .json)"
    (cd "$ROOT" && timeout -k 5 "$STOP_TIMEOUT_S" bin/stop_nodes.sh --config "$CUR_CONFIG") \
        >>"$OUT/logs/stop.log" 2>&1 || say "warning: bin/stop_nodes.sh failed (see $OUT/logs/stop.log)"
    if [[ -d "$ROOT/logs/$name" ]]; then
        rm -rf "$OUT/logs/$name"
        mv "$ROOT/logs/$name" "$OUT/logs/$name" || true
    fi
}

# Writes a cluster file for 3 nodes on free loopback ports (below the
# ephemeral range; bound without SO_REUSEADDR, so TIME_WAIT ports are
# skipped) with its data dir next to it. CONFIG_JSON (a JSON object, e.g.
# '{"max_catch_up_log_bytes": 268435456}') adds tuning keys to it.
write_config() {
    CONFIG_JSON="${CONFIG_JSON:-}" python3 - "$1" "$2" <<'PY'
import json, os, random, socket, sys
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
config = {"raft_nodes": nodes, "data_dir": data_dir}
config.update(json.loads(os.environ["CONFIG_JSON"]) if os.environ["CONFIG_JSON"] else {})
json.dump(config, open(path, "w"))
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

# The pids of the current cluster's nodes, from bin/start_nodes.sh's pid files.
node_pids() {
    local name pid_file
    name="$(basename "$CUR_CONFIG" .json)"
    for pid_file in "$ROOT/logs/$name"/node*.pid; do
        cat "$pid_file" 2>/dev/null || true
    done
}

# Samples each node's RSS (KiB, from /proc/PID/status) every RSS_SAMPLE_S
# into FILE, one line per sample ("MS_SINCE_START KIB KIB KIB"), until
# killed; a node that is gone reads 0. Started in the background by rss_start.
rss_sample_loop() { # FILE PID...
    local file="$1" pid key value _ line start="${EPOCHREALTIME/./}"
    shift
    while true; do
        line="$(( (${EPOCHREALTIME/./} - start) / 1000 ))"
        for pid in "$@"; do
            value=0
            if [[ -r "/proc/$pid/status" ]]; then
                while read -r key value _; do
                    [[ "$key" == VmRSS: ]] && break
                    value=0
                done <"/proc/$pid/status" || true
            fi
            line+=" ${value:-0}"
        done
        echo "$line" >>"$file"
        sleep "$RSS_SAMPLE_S"
    done
}
RSS_PID=""
rss_start() { # FILE PID...
    rss_sample_loop "$@" </dev/null >/dev/null 2>&1 &
    RSS_PID=$!
}
rss_stop() {
    [[ -n "$RSS_PID" ]] || return 0
    kill "$RSS_PID" 2>/dev/null || true
    wait "$RSS_PID" 2>/dev/null || true
    RSS_PID=""
}
# The largest RSS of each node in a sample file, as a JSON list.
rss_max() { # FILE
    python3 - "$1" <<'PY'
import sys
rows = [[int(v) for v in l.split()[1:]] for l in open(sys.argv[1]) if l.strip()]
print([max(col) for col in zip(*rows)] if rows else [])
PY
}

