#!/usr/bin/env bash
# The fault soak (issue 8): N jobs through the whole lifecycle while the provider
# fails at random, workers are SIGKILLed, RabbitMQ and Redis are restarted; then an
# audit from the outside.  One command, loopback only, bounded in time.
#
#   tests/soak/run.sh [--jobs N] [--duration SECONDS] [--build-dir DIR] [--keep]
#                     [soak driver flags...]
#
#   --jobs N           jobs to publish (default 20000)
#   --duration S       seconds over which they are published, faults included (default: N/100, >= 20)
#   --build-dir DIR    where bin/integration-worker, bin/mock-provider, bin/soak are (default ./build)
#   --keep             keep the whole work directory (logs, broker and Redis data) even on
#                      success; a failed run keeps its logs and the audit's problem list
#   other flags go to the driver (`build/bin/soak --help`): --submitters, --pollers,
#   --kill-every-ms, --error-rate, --latency-ms, --latency-jitter-ms, --checks,
#   --log-level, --seed, --drain-s, --rabbit-restart shutdown|kill ...
#
# It starts a PRIVATE RabbitMQ node and a PRIVATE Redis on free loopback ports (never
# the shared 5672/6379, which it does not touch), runs build/bin/soak against them and
# stops both.  Redis runs with `--appendonly yes` like a production Redis with
# persistence, so its restart keeps the records.  Exit 0 only when the audit passes,
# 1 when it fails, 77 when it cannot run here (not root: RabbitMQ's start script
# switches to the rabbitmq user; servers not installed).
#
# Internal use by the driver: run.sh ctl rabbit-restart|rabbit-kill|redis-restart WORKDIR
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/../.." && pwd)"
HOST=127.0.0.1

log() { printf 'soak: %s\n' "$*" >&2; }
die() { printf 'soak: ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# A loopback port nobody listens on (the range avoids the ephemeral ports).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    port_open "$p" || { echo "$p"; return 0; }
  done
  die "no free port found"
}

# ---------------------------------------------------------------- RabbitMQ (private)

rabbit_env() { # the environment of our node, from $W/soak.env
  RABBIT_ENV=(RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS="$HOST"
    RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$DIST_PORT"
    RABBITMQ_MNESIA_BASE="$W/rabbit/mnesia" RABBITMQ_LOG_BASE="$W/rabbit/log"
    RABBITMQ_ENABLED_PLUGINS_FILE="$W/rabbit/enabled_plugins"
    RABBITMQ_CONFIG_FILE="$W/rabbit/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$W/rabbit/rabbitmq-env.conf"
    RABBITMQ_PID_FILE="$W/rabbit/pid")
}

rabbit_prepare() {
  mkdir -p "$W/rabbit/mnesia" "$W/rabbit/log"
  # The same reasons as scripts/stack.sh: Debian's wrapper switches to the rabbitmq user
  # with su, which resets the soft descriptor limit to 1024, too few for the 23 quorum
  # queues of a namespace; the env file is sourced after su.
  printf 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || true\n' >"$W/rabbit/rabbitmq-env.conf"
  printf 'log.file.level = info\nlog.console = false\n' >"$W/rabbit/rabbitmq.conf"
  echo '[].' >"$W/rabbit/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$W/rabbit" 2>/dev/null || true
  chmod -R a+rX "$W"
}

rabbit_start() {
  rabbit_env
  env "${RABBIT_ENV[@]}" setsid rabbitmq-server >>"$W/rabbit/server.out" 2>&1 </dev/null &
  local deadline=$(($(date +%s) + 120))
  # await_startup fails at once while the node is not registered with epmd yet: loop.
  until timeout 60 rabbitmqctl -n "$NODE" -q await_startup >/dev/null 2>&1 && port_open "$AMQP_PORT"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "rabbitmq node $NODE not up after 120 s (see $W/rabbit/log)"
    sleep 0.5
  done
}

rabbit_stop() {
  rabbitmqctl -n "$NODE" -q shutdown >/dev/null 2>&1 && return 0
  # not answering: end our node by its pid file (never by name)
  local pid
  pid="$(cat "$W/rabbit/pid" 2>/dev/null || true)"
  [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- Redis (private)

redis_start() {
  mkdir -p "$W/redis"
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --protected-mode yes \
    --save '' --appendonly yes --dir "$W/redis" --pidfile "$W/redis/pid" \
    --logfile "$W/redis/redis.log" >/dev/null 2>&1 </dev/null || die "redis-server failed (see $W/redis/redis.log)"
  local deadline=$(($(date +%s) + 30))
  until [ "$(timeout 2 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "private redis not answering after 30 s"
    sleep 0.1
  done
}

redis_stop() {
  # SHUTDOWN with appendonly: the AOF is fsynced, nothing acknowledged is lost
  timeout 10 redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
  local pid
  pid="$(cat "$W/redis/pid" 2>/dev/null || true)"
  for _ in $(seq 1 100); do
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- ctl (called by the driver)

if [ "${1:-}" = ctl ]; then
  W="$3"
  # shellcheck disable=SC1091
  . "$W/soak.env"
  case "$2" in
    rabbit-restart)
      t0=$(date +%s.%N)
      rabbit_stop
      rabbit_start
      log "$(date -u +%T.%3NZ) rabbitmq restarted in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
      ;;
    rabbit-kill)
      # a crash, not a shutdown: SIGKILL the node (its pid file), then start it again
      t0=$(date +%s.%N)
      pid="$(cat "$W/rabbit/pid" 2>/dev/null || true)"
      [ -n "$pid" ] || die "no pid file for $NODE"
      kill -KILL "$pid"
      for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      rabbit_start
      log "rabbitmq killed (SIGKILL) and started again in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
      ;;
    redis-restart)
      t0=$(date +%s.%N)
      redis_stop
      sleep "${SOAK_REDIS_DOWN_S:-2}"
      redis_start
      log "$(date -u +%T.%3NZ) redis restarted in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
      ;;
    *) die "unknown ctl command $2" ;;
  esac
  exit 0
fi

# ---------------------------------------------------------------- main

JOBS=20000
DURATION=""
BUILD="$ROOT/build"
KEEP=0
SABOTAGE=0 # a run broken on purpose: its failure is expected, its files are not kept
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --build-dir) BUILD="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^# Internal use/p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --sabotage) SABOTAGE=1; PASS+=("$1"); shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done
[[ "$JOBS" =~ ^[0-9]+$ ]] && [ "$JOBS" -ge 1 ] || die "--jobs must be a positive number"
[ -n "$DURATION" ] || DURATION=$((JOBS / 100 > 20 ? JOBS / 100 : 20))
[[ "$DURATION" =~ ^[0-9]+$ ]] && [ "$DURATION" -ge 5 ] || die "--duration must be >= 5 seconds"
for b in integration-worker mock-provider soak; do
  [ -x "$BUILD/bin/$b" ] || die "$BUILD/bin/$b missing: build first (cmake -S . -B build && cmake --build build -j2)"
done
# Exit 77 (ctest: skipped) where a private broker cannot be started at all.
if [ "$(id -u)" -ne 0 ]; then
  log "SKIPPED: needs root (the private RabbitMQ node is started through Debian's rabbitmq-server wrapper)"
  exit 77
fi
if ! command -v rabbitmq-server >/dev/null || ! command -v redis-server >/dev/null; then
  log "SKIPPED: rabbitmq-server and redis-server needed (scripts/setup.sh)"
  exit 77
fi

W="$(mktemp -d /tmp/iwsoak.XXXXXX)"
chmod 755 "$W"
AMQP_PORT=$(free_port)
DIST_PORT=$(free_port)
REDIS_PORT=$(free_port)
NODE="iwsoak-$$@localhost"
cat >"$W/soak.env" <<EOF
AMQP_PORT=$AMQP_PORT
DIST_PORT=$DIST_PORT
REDIS_PORT=$REDIS_PORT
NODE=$NODE
EOF

DRIVER_PID=""
cleanup() {
  local rc=$?
  if [ -n "$DRIVER_PID" ] && [ -d "/proc/$DRIVER_PID" ]; then
    kill -TERM -- "-$DRIVER_PID" 2>/dev/null || true # the driver's process group: its workers and mock
    sleep 1
    kill -KILL -- "-$DRIVER_PID" 2>/dev/null || true
  fi
  redis_stop
  rabbit_stop
  if [ "$KEEP" -eq 1 ]; then
    log "work directory kept: $W (worker logs: $W/logs)"
  elif [ "$rc" -eq 0 ] || [ "$SABOTAGE" -eq 1 ]; then
    rm -rf "$W"
  else
    # a failed run keeps what explains it (worker and broker logs, the audit's list
    # of problem jobs), not the broker's and Redis's data
    rm -rf "$W/rabbit/mnesia" "$W/redis/appendonlydir" "$W/redis"/*.aof
    log "work directory kept: $W (worker logs: $W/logs, problem jobs: $W/audit-problems.txt, the driver's output with the kill times: $W/driver.log)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "work dir $W; private rabbitmq $NODE on $HOST:$AMQP_PORT, private redis on $HOST:$REDIS_PORT"
rabbit_prepare
rabbit_start
redis_start
mkdir -p "$W/logs"

# Bounded: publishing lasts DURATION, then at most the driver's drain (default 180 s)
# and the audit; the timeout is a last resort that kills everything.
LIMIT=$((DURATION + 600))
set +e
IWT_LOG_DIR="$W/logs" SOAK_REDIS_DOWN_S="${SOAK_REDIS_DOWN_S:-2}" \
  setsid timeout -k 10 "$LIMIT" "$BUILD/bin/soak" --jobs "$JOBS" --duration "$DURATION" \
  --amqp-port "$AMQP_PORT" --redis-port "$REDIS_PORT" --ctl "$SELF" --workdir "$W" \
  ${PASS[@]+"${PASS[@]}"} > >(tee -a "$W/driver.log") 2>&1 &
DRIVER_PID=$!
wait "$DRIVER_PID"
rc=$?
set -e
DRIVER_PID=""
[ "$rc" -ne 124 ] || log "the driver hit the ${LIMIT}s limit"
exit "$rc"
