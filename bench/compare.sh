#!/usr/bin/env bash
# Runs the standard scenarios on etcd and on kvstore-raft, side by side on
# this machine, and prints both with the ratio: a thin wrapper around the
# shared etcd-bench harness (it installs etcd, builds its own load generator,
# alternates fresh clusters of both systems; see its README).
#   bench/compare.sh [--reps N] [--duration S] [--scenarios LIST] [--out DIR] ...
# ETCD_BENCH_DIR names the harness (default ../shared/etcd-bench beside the
# project root). Every argument is passed on; --repo is this checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
harness="${ETCD_BENCH_DIR:-$root/../shared/etcd-bench}"
if [[ ! -x "$harness/compare.sh" ]]; then
    echo "bench/compare.sh: no etcd-bench harness at $harness (set ETCD_BENCH_DIR)" >&2
    exit 2
fi
cd "$root"
exec "$harness/compare.sh" --repo "$root" "$@"
