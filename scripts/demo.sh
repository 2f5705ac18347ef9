#!/usr/bin/env bash
# Runs one job end to end on the local loopback stack and shows what happened.
#
#   scripts/demo.sh
#
# setup.sh, build, stack.sh up; starts mock-provider (127.0.0.1:8080) and
# `integration-worker all` in the background, declares the topology, listens on the
# events exchange, publishes one submit.transaction job and prints every event until
# the job's status.final (or submission.failed) arrives, then the provider's
# /__admin/stats and the worker's last log lines. Stops the worker (SIGTERM) and the
# mock on exit; RabbitMQ and Redis stay up (scripts/stack.sh down stops them).
#
# Environment: IW_DEMO_WAIT (seconds to wait for the outcome, default 60),
# IW_DEMO_MOCK_PORT (default 8080), and any IW_ setting of the worker (IW_NAMESPACE,
# IW_AMQP_URL, IW_POLL_SCHEDULE - default here 2s,3s,5s so the demo finishes quickly).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build"
BIN="$BUILD_DIR/bin"
NS="${IW_NAMESPACE:-ext-api}"
AMQP_URL="${IW_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
MOCK_PORT="${IW_DEMO_MOCK_PORT:-8080}"
WAIT="${IW_DEMO_WAIT:-60}"
WAIT_GIVEN="${IW_DEMO_WAIT:+1}"
EVENT_KEYS=(submission.accepted submission.failed status.progress status.final)

log() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }
section() { printf '\n===== %s =====\n' "$*"; }
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

case "${1:-}" in
  -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument '$1' (usage: scripts/demo.sh)" ;;
esac
[[ "$WAIT" =~ ^[0-9]+$ ]] || die "IW_DEMO_WAIT must be a number of seconds, got '$WAIT'"

RUN_DIR="$(mktemp -d /tmp/iw-demo.XXXXXX)"
WORKER_LOG="$RUN_DIR/worker.log"
MOCK_LOG="$RUN_DIR/mock-provider.log"
EVENTS="$RUN_DIR/events.log"
: >"$EVENTS"

mock_pid=""
worker_pid=""
consumer_pids=()

# shellcheck disable=SC2317  # stop_pid and cleanup run from the EXIT trap
stop_pid() { # pid name grace-seconds
  local pid=$1 name=$2 grace=$3 i rc
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) still running ${grace}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  log "$name stopped (exit status $rc)"
}

# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  for pid in "${consumer_pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${consumer_pids[@]}"; do wait "$pid" 2>/dev/null; done
  # The worker gets its full shutdown grace (IW_SHUTDOWN_GRACE, default 30 s) plus margin.
  stop_pid "$worker_pid" "integration-worker" 40
  stop_pid "$mock_pid" "mock-provider" 5
  log "logs kept in $RUN_DIR (RabbitMQ and Redis left running; scripts/stack.sh down stops them)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section "setup, build, stack"
"$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed"
cmake -S "$ROOT" -B "$BUILD_DIR" >"$RUN_DIR/configure.log" 2>&1 ||
  { tail -n 30 "$RUN_DIR/configure.log" >&2; die "configure failed (cmake -S . -B build; log $RUN_DIR/configure.log)"; }
log "building integration-worker and mock-provider"
cmake --build "$BUILD_DIR" -j2 --target integration-worker mock-provider ||
  die "build failed (cmake --build build); see the compiler output above"
if [ ! -x "$BIN/integration-worker" ] || [ ! -x "$BIN/mock-provider" ]; then
  die "build did not produce $BIN/integration-worker and $BIN/mock-provider"
fi
"$ROOT/scripts/stack.sh" up || die "scripts/stack.sh up failed"

section "mock provider"
port_open 127.0.0.1 "$MOCK_PORT" &&
  die "127.0.0.1:$MOCK_PORT is already in use (another mock-provider?); stop it or set IW_DEMO_MOCK_PORT"
"$BIN/mock-provider" --listen "127.0.0.1:$MOCK_PORT" >"$MOCK_LOG" 2>&1 </dev/null &
mock_pid=$!
for _ in $(seq 1 100); do
  kill -0 "$mock_pid" 2>/dev/null || { tail -n 20 "$MOCK_LOG" >&2; mock_pid=""; die "mock-provider exited at start (log $MOCK_LOG)"; }
  curl -s -o /dev/null "http://127.0.0.1:$MOCK_PORT/__admin/stats" && break
  sleep 0.1
done
curl -s -o /dev/null "http://127.0.0.1:$MOCK_PORT/__admin/stats" ||
  die "mock-provider not answering on 127.0.0.1:$MOCK_PORT after 10s (log $MOCK_LOG)"
log "mock-provider up on 127.0.0.1:$MOCK_PORT (pid $mock_pid, log $MOCK_LOG)"

section "worker"
# The worker warns about IW_ variables it does not know: keep the scripts' own out of its environment.
while read -r v; do unset "$v"; done < <(compgen -v | grep -E '^IW_(DEMO|STACK|TEST)_' || true)
export IW_AMQP_URL="$AMQP_URL"
export IW_PROVIDER_URL="${IW_PROVIDER_URL:-http://127.0.0.1:$MOCK_PORT}"
export IW_API_KEY="${IW_API_KEY:-test-key-xxxxx}"
export IW_API_SECRET="${IW_API_SECRET:-test-secret-xxxxx}"
export IW_HTTP_ADDR="${IW_HTTP_ADDR:-127.0.0.1:9400}"
export IW_POLL_SCHEDULE="${IW_POLL_SCHEDULE:-2s,3s,5s}"
log "namespace $NS, broker ${AMQP_URL%%@*}@..., provider $IW_PROVIDER_URL, poll schedule $IW_POLL_SCHEDULE"

"$BIN/integration-worker" declare || die "integration-worker declare failed (exit $?)"
log "topology declared"

# Roles arrive in stages: the poller exists once `--help` lists it.
has_poller=0
worker_help="$("$BIN/integration-worker" --help 2>&1 || true)"
if grep -qE '^[[:space:]]+poller[[:space:]]' <<<"$worker_help"; then has_poller=1; fi
if [ "$has_poller" = 0 ]; then
  log "this build has no poller role yet: waiting for submission.accepted only (at most 10s)"
  [ -n "$WAIT_GIVEN" ] || WAIT=10
fi

"$BIN/integration-worker" all >"$WORKER_LOG" 2>&1 </dev/null &
worker_pid=$!
log "integration-worker all started (pid $worker_pid, log $WORKER_LOG)"
http_port="${IW_HTTP_ADDR##*:}"
# Wait (at most 10 s) for /readyz; without an HTTP endpoint just give it 2 s.
for i in $(seq 1 50); do
  kill -0 "$worker_pid" 2>/dev/null || { tail -n 20 "$WORKER_LOG" >&2; worker_pid=""; die "integration-worker exited at start (log $WORKER_LOG)"; }
  code=000
  [ "$IW_HTTP_ADDR" = off ] || code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/readyz" || true)"
  if [ "$code" = 200 ]; then log "worker ready (/readyz 200)"; break; fi
  if [ "$code" = 000 ] && [ "$i" -ge 10 ]; then break; fi
  sleep 0.2
done

# One exclusive, auto-deleted queue per event key (amqp-consume does not expose the
# routing key, so each consumer prints the key it is bound with).
for key in "${EVENT_KEYS[@]}"; do
  # shellcheck disable=SC2016  # $0/$body expand in the per-message sh, not here
  amqp-consume -u "$AMQP_URL" -e "$NS.events" -r "$key" -x -A -- \
    sh -c 'body=$(cat); printf "%s  %-20s %s\n" "$(date +%T)" "$0" "$body"' "$key" \
    >>"$EVENTS" 2>>"$RUN_DIR/consumers.err" </dev/null &
  consumer_pids+=($!)
done
sleep 1.5
for pid in "${consumer_pids[@]}"; do
  kill -0 "$pid" 2>/dev/null || { cat "$RUN_DIR/consumers.err" >&2; die "could not bind to exchange $NS.events (amqp-consume exited)"; }
done
log "listening on $NS.events (${EVENT_KEYS[*]})"

section "job"
job_id="demo-$(date +%Y%m%d%H%M%S)-$$"
body="{\"jobId\":\"$job_id\",\"userId\":\"u-1\",\"action\":\"transaction\",\"payload\":{\"amount\":42}}"
amqp-publish -u "$AMQP_URL" -e "$NS.requests" -r submit.transaction -C application/json -p -b "$body" ||
  die "amqp-publish to $NS.requests failed"
log "published to $NS.requests [submit.transaction]: $body"

section "events (up to ${WAIT}s)"
outcome=""
shown=0
deadline=$(($(date +%s) + WAIT))
while :; do
  # Lines are "HH:MM:SS  <routing key>  <body>"; the job's outcome ends the wait.
  outcome=$(awk -v id="\"$job_id\"" -v accepted_ends="$((1 - has_poller))" '
    index($0, id) && ($2 == "status.final" || $2 == "submission.failed") { final = $2 }
    index($0, id) && $2 == "submission.accepted" && accepted_ends == 1 { acc = $2 }
    END { print (final != "" ? final : acc) }' "$EVENTS")
  total=$(wc -l <"$EVENTS")
  if [ "$total" -gt "$shown" ]; then
    sed -n "$((shown + 1)),${total}p" "$EVENTS"
    shown=$total
  fi
  [ -z "$outcome" ] || break
  kill -0 "$worker_pid" 2>/dev/null || { log "integration-worker exited unexpectedly"; worker_pid=""; break; }
  [ "$(date +%s)" -lt "$deadline" ] || break
  sleep 0.5
done

section "mock-provider GET /__admin/stats"
stats="$(curl -s "http://127.0.0.1:$MOCK_PORT/__admin/stats" || true)"
if [ -n "$stats" ] && command -v python3 >/dev/null 2>&1 && printf '%s' "$stats" | python3 -m json.tool 2>/dev/null; then
  :
else
  printf '%s\n' "${stats:-(no answer)}"
fi

section "worker log (last 30 lines of $WORKER_LOG)"
tail -n 30 "$WORKER_LOG" || true

section "result"
if [ -n "$outcome" ]; then
  log "job $job_id ended with $outcome"
else
  log "job $job_id: no final event within ${WAIT}s (IW_DEMO_WAIT raises the wait)"
  exit 1
fi
[ "$outcome" != submission.failed ] || exit 1
exit 0
