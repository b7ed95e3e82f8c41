#!/usr/bin/env bash
# lock.sh: waits for a free BENCH_LOCK, takes it as perf3, waits 6 s for the pause.
while true; do
  if [ ! -e /work/wt/BENCH_LOCK ]; then
    ( set -o noclobber; echo perf3 > /work/wt/BENCH_LOCK ) 2>/dev/null && break
  fi
  sleep 5
done
sleep 6
