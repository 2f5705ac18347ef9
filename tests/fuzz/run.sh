#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, build-fuzz/) and runs each
# for N seconds (default 60) on its committed corpus with the shared
# dictionary.  New inputs go to build-fuzz/corpus/<target>/ (not committed);
# a crash stops with its reproducer in build-fuzz/findings/ and exit 1.
#
#   tests/fuzz/run.sh [seconds] [target...]     # targets: intake provider schema parse config json_read
#   build-fuzz/bin/fuzz_intake FILE       # replays one input
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(intake provider schema parse config json_read)
BUILD="$ROOT/build-fuzz"
JOBS="${IW_TEST_JOBS:-2}"

log() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: FAILED: %s\n' "$*" >&2; exit 1; }

command -v clang >/dev/null || die "clang not found (scripts/setup.sh installs it)"
CC=clang cmake -S "$ROOT" -B "$BUILD" -DIW_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null ||
  die "configure failed"
cmake --build "$BUILD" -j"$JOBS" || die "build failed"

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$BUILD/findings"
summary=()
for t in "${TARGETS[@]}"; do
  bin="$BUILD/bin/fuzz_$t"
  [ -x "$bin" ] || die "no target fuzz_$t"
  work="$BUILD/corpus/$t"
  mkdir -p "$work"
  log "fuzz_$t for ${SECS}s"
  logf="$BUILD/findings/fuzz_$t.log"
  # the first corpus directory receives new inputs; the committed one is only read
  if ! "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -dict="$ROOT/tests/fuzz/iw.dict" -artifact_prefix="$BUILD/findings/fuzz_$t-" \
    -print_final_stats=1 "$work" "$ROOT/tests/fuzz/corpus/$t" >"$logf" 2>&1; then
    tail -n 40 "$logf" >&2
    die "fuzz_$t found a defect: reproducer in build-fuzz/findings/ (log $logf)"
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logf" | grep -o '[0-9]*$' || echo '?')
  summary+=("fuzz_$t: $runs executions in ${SECS}s")
done
for s in "${summary[@]}"; do log "$s"; done
log "PASSED"
