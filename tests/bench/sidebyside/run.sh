#!/bin/sh
# Side-by-side benchmark: integration-worker submitter against a Celery worker
# (see README.md here).  Usage:
#   tests/bench/sidebyside/run.sh [--jobs 5000,2000] [--latency-ms 0,200] [--concurrency 64]
#                                 [--log-level info] [--celery-wake pipe|tick:MS|none] ...
# Needs the shared RabbitMQ and Redis (scripts/stack.sh up) and a build
# (cmake -S . -B build && cmake --build build); installs its Python packages
# and wrk with setup.sh.  Not part of the test suite.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
build=${SBS_BUILD_DIR:-$root/build}
"$here/setup.sh"
for b in integration-worker mock-provider bench_broker; do
    [ -x "$build/bin/$b" ] || { echo "run.sh: $build/bin/$b missing: build first" >&2; exit 2; }
done
redis-cli ping >/dev/null 2>&1 || { echo "run.sh: Redis is not up: scripts/stack.sh up" >&2; exit 2; }
exec /usr/bin/python3 "$here/sidebyside.py" --build "$build" "$@"
