#!/usr/bin/env bash
# Builds the project and runs the whole test suite against the local loopback stack.
#
#   scripts/test.sh                       # build/ , all tests (labels unit + integration)
#   scripts/test.sh --sanitize            # build-asan/ with -DIW_SANITIZE=ON (ASan + UBSan + LSan)
#   scripts/test.sh --release             # build-release/ with -DCMAKE_BUILD_TYPE=Release (-O3)
#   scripts/test.sh [--sanitize] -- -L unit        # extra arguments go to ctest
#
# Steps: scripts/setup.sh, configure + build, scripts/stack.sh up, ctest. Exits with
# ctest's status (or 1 with a one-line message when a step before it fails).
# IW_TEST_JOBS sets the build and ctest parallelism (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${IW_TEST_JOBS:-2}"

log() { printf 'test: %s\n' "$*"; }
die() { printf 'test: FAILED: %s\n' "$*" >&2; exit 1; }

sanitize=0
release=0
ctest_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --release) release=1 ;;
    --) shift; ctest_extra=("$@"); break ;;
    -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (usage: scripts/test.sh [--sanitize|--release] [-- ctest-args...])" ;;
  esac
  shift
done

start=$(date +%s)
cmake_args=()
if [ "$sanitize" = 1 ]; then
  BUILD_DIR="$ROOT/build-asan"
  cmake_args+=(-DIW_SANITIZE=ON)
  # Inherited by every test and by the workers / mock-provider the integration tests spawn.
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:print_summary=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:print_summary=1}"
  if [ -z "${LSAN_OPTIONS:-}" ] && [ -f "$ROOT/tests/lsan.supp" ]; then
    export LSAN_OPTIONS="suppressions=$ROOT/tests/lsan.supp:print_suppressions=0"
  fi
  log "sanitizer build in $BUILD_DIR (ASAN_OPTIONS=$ASAN_OPTIONS)"
elif [ "$release" = 1 ]; then
  # Every build type must build with -Werror: -O3 enables warnings (e.g.
  # -Wformat-truncation) that the default RelWithDebInfo does not.
  BUILD_DIR="$ROOT/build-release"
  cmake_args+=(-DCMAKE_BUILD_TYPE=Release)
  log "release build in $BUILD_DIR"
else
  BUILD_DIR="$ROOT/build"
  log "build in $BUILD_DIR"
fi

"$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed"

log "configuring"
cmake -S "$ROOT" -B "$BUILD_DIR" "${cmake_args[@]}" ||
  die "configure failed (cmake -S . -B ${BUILD_DIR#"$ROOT"/} ${cmake_args[*]})"
log "building (-j$JOBS)"
cmake --build "$BUILD_DIR" -j"$JOBS" ||
  die "build failed (cmake --build ${BUILD_DIR#"$ROOT"/}); see the compiler output above"

"$ROOT/scripts/stack.sh" up || die "scripts/stack.sh up failed: RabbitMQ/Redis not available"

# The worker warns about IW_ variables it does not know: keep the scripts' own out of the tests.
while read -r v; do unset "$v"; done < <(compgen -v | grep -E '^IW_(STACK|TEST|DEMO)_' || true)
log "running ctest (-j$JOBS${ctest_extra[*]:+ ${ctest_extra[*]}})"
rc=0
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"$JOBS" "${ctest_extra[@]}" || rc=$?

elapsed=$(($(date +%s) - start))
if [ "$rc" -eq 0 ]; then
  log "PASSED (${BUILD_DIR#"$ROOT"/}, ${elapsed}s)"
else
  log "FAILED: ctest exited $rc (${BUILD_DIR#"$ROOT"/}, ${elapsed}s)"
fi
exit "$rc"
