#!/usr/bin/env bash
# Mutation testing with cargo-mutants (a maintained tool, installed here, not
# in CI's path) over the consensus core, the state machine and the storage
# layer, with the fast test targets, within a time budget.
#
# It works on a copy of the tree (tracked and untracked files) with
# `--in-place`, and a CARGO_TARGET_DIR of its own under target/, so the
# checkout is never mutated and dependencies compile once. Results land in
# $OUT/mutants.out (caught.txt, missed.txt, timeout.txt, unviable.txt,
# outcomes.json) and a summary with the score in $OUT/summary.md.
#
# Usage: bench/mutants.sh [FILE-OR-DIR...]   (default: src/raft/ src/kv/state_machine.rs src/storage/)
# Env:   MUTANTS_BUDGET_S   wall-clock budget for the whole run (default 3600);
#                           what is not reached is listed as not run
#        MUTANT_TIMEOUT_S   per-mutant test timeout (default 240)
#        MUTANTS_OUT        where the report goes (default bench/results/mutants)
#        SIM_SEEDS          soak seeds of tests/raft_sim.rs per mutant (default 20)
#        MUTANTS_SHARD      e.g. 0/4: one of n interleaved shards (cargo-mutants --shard)
#        MUTANTS_TESTS      the test targets, e.g. "--lib --test raft_sim" (default: the
#                           fast targets below)
#        MUTANTS_ITERATE=1  go on from the report already in $MUTANTS_OUT: mutants it
#                           counts as caught, timed out or unviable are skipped
#                           (cargo-mutants --iterate), so a long run can be spread
#                           over several sessions and the report covers them all
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET_S=${MUTANTS_BUDGET_S:-3600}
TIMEOUT_S=${MUTANT_TIMEOUT_S:-240}
OUT=${MUTANTS_OUT:-$ROOT/bench/results/mutants}
WORK=$ROOT/target/cargo-mutants
export SIM_SEEDS=${SIM_SEEDS:-20}
export PROPTEST_CASES=${PROPTEST_CASES:-64}
CARGO_MUTANTS_VERSION=27.1.0

if [ $# -gt 0 ]; then files=("$@"); else files=(src/raft/ src/kv/state_machine.rs src/storage/); fi

if ! cargo mutants --version 2>/dev/null | grep -q "$CARGO_MUTANTS_VERSION"; then
    cargo install --locked --version "$CARGO_MUTANTS_VERSION" cargo-mutants
fi

# The fast targets: the unit tests (core, log, progress, records, state
# machine, checker), the Raft simulation, the storage and disk tests.
# A narrower set (MUTANTS_TESTS) fits a run over one layer, e.g. the core's
# own tests for src/raft/.
if [ -n "${MUTANTS_TESTS:-}" ]; then
    read -r -a test_args <<<"$MUTANTS_TESTS"
else
    test_args=(--lib --test raft_sim --test storage --test sim_disk --test disk_faults)
fi

# Each mutant rebuilds the library and the test binaries: incremental
# release builds without debug info make that rebuild several times faster.
# This target directory is the script's own, so the checkout's builds keep
# the project's profile.
export CARGO_PROFILE_RELEASE_INCREMENTAL=true
export CARGO_PROFILE_RELEASE_DEBUG=0

file_args=()
for f in "${files[@]}"; do
    case "$f" in
        */) file_args+=(--file "${f}**/*.rs") ;;
        *) file_args+=(--file "$f") ;;
    esac
done
shard_args=()
if [ -n "${MUTANTS_SHARD:-}" ]; then shard_args=(--shard "$MUTANTS_SHARD"); fi
if [ "${MUTANTS_ITERATE:-0}" = 1 ]; then shard_args+=(--iterate); fi

# A copy of the tree, mutated in place; its own target directory, seeded
# from the tree's build the first time (release: the tests are release-speed).
TREE=$WORK/tree
rm -rf "$TREE"
mkdir -p "$TREE" "$OUT"
# `tar -m` gives every file the time of the copy: with the original times, a
# file the last run mutated and restored would look older than the build
# cargo fingerprinted, and the baseline would reuse that mutant's binary.
git ls-files -z --cached --others --exclude-standard | grep -zv '^target/' |
    xargs -0 tar -cf - --no-recursion | tar -xmf - -C "$TREE"
export CARGO_TARGET_DIR=$WORK/target
if [ ! -d "$CARGO_TARGET_DIR/release" ] && [ -d "$ROOT/target/release" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    cp -a --reflink=auto "$ROOT/target/release" "$CARGO_TARGET_DIR/release"
fi

cd "$TREE"
total=$(cargo mutants --list "${file_args[@]}" ${MUTANTS_SHARD:+--shard "$MUTANTS_SHARD"} | wc -l)
echo "bench/mutants.sh: $total mutants in ${files[*]}; budget ${BUDGET_S}s" >&2
start=$(date +%s)
set +e
timeout --signal=INT "$BUDGET_S" cargo mutants --in-place \
    --profile release --timeout "$TIMEOUT_S" --output "$OUT" \
    "${file_args[@]}" "${shard_args[@]}" -- "${test_args[@]}"
status=$?
set -e
took=$(( $(date +%s) - start ))

# $OUT/all/ holds the report over every run into $OUT: with MUTANTS_ITERATE=1
# a run adds what it tested; otherwise the run starts the report anew. A
# mutant missed by one run and caught by a later one (after a new test) counts
# as caught.
ALL=$OUT/all
export LC_ALL=C
if [ "${MUTANTS_ITERATE:-0}" != 1 ]; then rm -rf "$ALL"; fi
mkdir -p "$ALL"
for kind in caught missed timeout unviable; do
    touch "$ALL/$kind.txt"
    if [ -f "$OUT/mutants.out/$kind.txt" ]; then
        sort -u "$ALL/$kind.txt" "$OUT/mutants.out/$kind.txt" -o "$ALL/$kind.txt"
    fi
done
# A mutant caught by one run and timed out in another is counted once, as caught.
comm -23 "$ALL/timeout.txt" "$ALL/caught.txt" >"$ALL/.timeout" && mv "$ALL/.timeout" "$ALL/timeout.txt"
sort -u "$ALL/caught.txt" "$ALL/timeout.txt" "$ALL/unviable.txt" >"$ALL/.settled"
comm -23 "$ALL/missed.txt" "$ALL/.settled" >"$ALL/.missed" && mv "$ALL/.missed" "$ALL/missed.txt"
rm -f "$ALL/.settled"
# Counted: the mutants of the files in this run's scope.
scope_re="^($(printf '%s|' "${files[@]}" | sed 's/[.]/[.]/g; s/|$//'))"
count() { grep -cE "$scope_re" "$ALL/$1" || true; }
caught=$(count caught.txt); missed=$(count missed.txt)
timeouts=$(count timeout.txt); unviable=$(count unviable.txt)
tested=$((caught + missed + timeouts + unviable))
viable=$((caught + missed + timeouts))
score=$(awk -v c="$((caught + timeouts))" -v v="$viable" 'BEGIN { if (v) printf "%.1f%%", 100 * c / v; else print "n/a" }')
{
    echo "# cargo-mutants report"
    echo
    echo "- command: \`bench/mutants.sh ${files[*]}\` (cargo-mutants $CARGO_MUTANTS_VERSION, release profile, tests: \`${test_args[*]}\`, SIM_SEEDS=$SIM_SEEDS, PROPTEST_CASES=$PROPTEST_CASES${MUTANTS_SHARD:+, shard $MUTANTS_SHARD})"
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), wall time ${took}s of a ${BUDGET_S}s budget (exit status $status; 124/130 = budget ran out)"
    echo "- mutants in scope: $total; tested: $tested; NOT RUN (budget): $((total - tested))"
    echo "- this run tested $(cat "$OUT"/mutants.out/{caught,missed,timeout,unviable}.txt 2>/dev/null | wc -l) of them; the others were tested by earlier runs into this report (MUTANTS_ITERATE=1)"
    echo "- caught: $caught, timeout (counted as caught): $timeouts, missed: $missed, unviable (did not build): $unviable"
    echo "- score (caught + timeout) / viable: $score"
    echo
    echo "## Missed (survivors)"
    echo
    if [ "$missed" -gt 0 ]; then grep -E "$scope_re" "$ALL/missed.txt" | sed 's/^/- /'; else echo "none"; fi
} >"$OUT/summary.md"
cat "$OUT/summary.md"
