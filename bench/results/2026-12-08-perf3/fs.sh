#!/usr/bin/env bash
# fs.sh TAG: fsync count and mean per node of run-TAG
for i in 1 2 3; do awk '/wal_fsync_duration_seconds_sum/{s=$2}/wal_fsync_duration_seconds_count/{c=$2}/kvstore_role\{role="leader"\} 1/{l="L"}END{printf "  n'$i'%s fsync %d mean %.0f us\n", l, c, s/c*1e6}' /tmp/perf3/run-$1/metrics$i.txt; done
