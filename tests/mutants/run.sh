#!/usr/bin/env bash
# The named mutants the suite must catch. Each tests/mutants/*.patch breaks
# one promise of the store on purpose (see the first lines of each patch's
# hunk); this script applies each, alone, to a copy of the working tree,
# runs the README's test command there (`cargo test --release`, which stops
# at the first failing test binary), and reports per patch:
#
#   CAUGHT   <patch>  by <test binary> :: <test> -- <first line of the panic>
#   MISSED   <patch>  (the whole suite passed with the mutant in)
#   NOAPPLY  <patch>  (the code moved: refresh the patch, see below)
#   NOBUILD  <patch>  (the mutant does not compile: refresh the patch)
#   TIMEOUT  <patch>  (no verdict within MUTANT_TIMEOUT_S)
#
# and exits non-zero unless every patch was CAUGHT.
#
# Usage: tests/mutants/run.sh [PATCH...]       (default: every patch)
# Env:   MUTANTS_DIR       work directory (default target/mutants): the copy of
#                          the tree and its own CARGO_TARGET_DIR live there and
#                          are reused, so dependencies compile once
#        MUTANT_TIMEOUT_S  per patch (default 1800)
#        MUTANT_TEST_CMD   the test command (default "cargo test --release")
#
# To refresh a patch after the code moved: make the same change by hand in
# a clean tree, then `git diff > tests/mutants/NAME.patch`.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${MUTANTS_DIR:-$ROOT/target/mutants}
TIMEOUT_S=${MUTANT_TIMEOUT_S:-1800}
TEST_CMD=${MUTANT_TEST_CMD:-cargo test --release}
TREE=$WORK/tree
export CARGO_TARGET_DIR=$WORK/target
mkdir -p "$WORK"

if [ $# -gt 0 ]; then patches=("$@"); else patches=("$ROOT"/tests/mutants/*.patch); fi

# Dependencies compile once: seed the mutants' target directory from the
# tree's own build the first time (a copy, never links: cargo rewrites files).
if [ ! -d "$CARGO_TARGET_DIR/release" ] && [ -d "$ROOT/target/release" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    cp -a --reflink=auto "$ROOT/target/release" "$CARGO_TARGET_DIR/release"
fi

# A fresh copy of the working tree (tracked and untracked files, not ignored
# ones), so what is tested is what is checked out here, edits included.
copy_tree() {
    rm -rf "$TREE"
    mkdir -p "$TREE"
    (git ls-files -z --cached --others --exclude-standard | grep -zv '^target/' |
        xargs -0 tar -cf - --no-recursion) | tar -xf - -C "$TREE"
}

summary=()
all_caught=1
for patch in "${patches[@]}"; do
    name=$(basename "$patch" .patch)
    copy_tree
    log=$WORK/$name.log
    if ! (cd "$TREE" && patch -p1 --quiet --forward <"$patch" >"$log" 2>&1); then
        summary+=("NOAPPLY  $name")
        all_caught=0
        continue
    fi
    echo "== $name: building and testing (log: $log)" >&2
    start=$(date +%s)
    (cd "$TREE" && timeout "$TIMEOUT_S" $TEST_CMD) >>"$log" 2>&1
    status=$?
    took=$(( $(date +%s) - start ))
    if [ $status -eq 0 ]; then
        summary+=("MISSED   $name  (${took}s: the whole suite passed)")
        all_caught=0
    elif [ $status -eq 124 ]; then
        summary+=("TIMEOUT  $name  (${took}s)")
        all_caught=0
    elif grep -q '^error\(\[E[0-9]*\]\)\?: could not compile\|^error\[E' "$log"; then
        summary+=("NOBUILD  $name")
        all_caught=0
    else
        # The failing binary, the failing test and the first panic line.
        binary=$(sed -n 's/^ *Running \(.*\) (.*/\1/p' "$log" | tail -1)
        test_name=$(grep -m1 -o '^test [^ ]* \.\.\. FAILED' "$log" | cut -d' ' -f2)
        message=$(grep -m1 -A1 "panicked at" "$log" | tail -1 | cut -c1-220)
        summary+=("CAUGHT   $name  (${took}s) by $binary :: ${test_name:-?} -- $message")
    fi
done

echo
for line in "${summary[@]}"; do echo "$line"; done
[ $all_caught -eq 1 ]
