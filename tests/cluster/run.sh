#!/usr/bin/env bash
# The worker on a RabbitMQ cluster and a Redis with failover, proved on loopback.
#
#   tests/cluster/run.sh [--build DIR] [--phase rabbit|redis|all] [--jobs N] [--keep]
#
# Starts, under one temp dir and only on 127.0.0.1, everything it needs and stops
# it again (also on failure or Ctrl-C):
#   - a 3-node RabbitMQ cluster from the Debian package (nodes iwcK-<pid>@localhost
#     on free ports, own data/log dirs and Erlang cookie; the shared node on 5672
#     and its cookie are never touched);
#   - Redis master + replica + three sentinels (master name "mymaster").
# Phase "rabbit": 5,000 jobs (--jobs) through submitter + poller + mock provider
#   (each tracking id finished after 3 checks, IW_POLL_SCHEDULE=250ms) while one
#   broker node is stopped and later restarted.
# Phase "redis": jobs under IW_RATE_LIMITS=20/s with the mock enforcing 20/s while
#   the Redis master is killed (kill -9) and the sentinels fail over.
# Each phase is audited by build/bin/cluster_drive: every job exactly one outcome,
# the mock created exactly one submission per job. Exits non-zero on any loss or
# duplicate. Needs root (RabbitMQ from the Debian package) and a build
# (cmake -S . -B build && cmake --build build).
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD="$ROOT/build"
PHASE=all
JOBS=5000
REDIS_JOBS=400
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) BUILD=$2; shift 2 ;;
    --phase) PHASE=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --redis-jobs) REDIS_JOBS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PHASE" in rabbit|redis|all) ;; *) echo "run.sh: --phase rabbit|redis|all" >&2; exit 2 ;; esac

DRIVE="$BUILD/bin/cluster_drive"
WORKER="$BUILD/bin/integration-worker"
for b in "$DRIVE" "$WORKER" "$BUILD/bin/mock-provider"; do
  [ -x "$b" ] || { echo "run.sh: $b missing: build first (cmake --build $BUILD)" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "run.sh: needs root (RabbitMQ from the Debian package)" >&2; exit 2; }
command -v redis-server >/dev/null && command -v rabbitmqctl >/dev/null ||
  { echo "run.sh: needs redis-server and rabbitmq-server (scripts/setup.sh)" >&2; exit 2; }

T0=$(date +%s)
TMP=$(mktemp -d /tmp/iw-cluster.XXXXXX)
chmod 755 "$TMP"
RMQ_BIN=/usr/lib/rabbitmq/bin
declare -a REDIS_PIDS=()
declare -a RMQ_NODES=()
declare -a AMQP_PORTS=()
FAILED=0

log() { printf '[%4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# first port >= $1 such that $1..$1+$2-1 and the same +20000 (Erlang distribution) are free
free_block() {
  local p=$1 n=$2 i ok
  while :; do
    ok=1
    for ((i = 0; i < n; i++)); do
      port_free $((p + i)) && port_free $((p + i + 20000)) || { ok=0; break; }
    done
    [ $ok -eq 1 ] && { echo "$p"; return; }
    p=$((p + n))
  done
}

# ------------------------------------------------------------------ RabbitMQ

# Every RabbitMQ command runs with HOME=$TMP so that the Erlang cookie is ours; a
# node's settings live in $TMP/rmqK/env.sh, which a restart sources again.
rmq_envfile() { # $1: node index (1..3)
  local i=$1
  cat >"$TMP/rmq$i/env.sh" <<EOF
export HOME='$TMP'
export RABBITMQ_NODENAME='${RMQ_NODES[$i]}'
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=${AMQP_PORTS[$i]}
export RABBITMQ_DIST_PORT=$((AMQP_PORTS[$i] + 20000))
export RABBITMQ_MNESIA_BASE='$TMP/rmq$i/mnesia'
export RABBITMQ_LOG_BASE='$TMP/rmq$i/log'
export RABBITMQ_PID_FILE='$TMP/rmq$i/pid'
export RABBITMQ_CONFIG_FILE='$TMP/rmq$i/rabbitmq.conf'
export RABBITMQ_ADVANCED_CONFIG_FILE='$TMP/rmq$i/advanced.config'
export RABBITMQ_ENABLED_PLUGINS_FILE='$TMP/enabled_plugins'
export RABBITMQ_CONF_ENV_FILE='$TMP/rabbitmq-env.conf'
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
}
rmqctl() { # $1: node index, rest: rabbitmqctl arguments
  local i=$1; shift
  env HOME="$TMP" "$RMQ_BIN/rabbitmqctl" -n "${RMQ_NODES[$i]}" "$@"
}
# The shell command that stops node $1: `rabbitmqctl stop PID_FILE` returns only once the
# node's Erlang VM has exited, so that what follows it (a restart) finds the node down.
rmq_stop_cmd() {
  echo "env HOME='$TMP' '$RMQ_BIN/rabbitmqctl' -n '${RMQ_NODES[$1]}' -q stop '$TMP/rmq$1/pid' >/dev/null"
}
# The shell command that starts node $1 in the background and waits until it has booted.
# It first waits (up to 120 s) for the node to be down, VM included (a ping can fail under
# load while the VM still holds the node name): a start that raced a stop would "succeed"
# against the stopping node.
rmq_start_cmd() {
  local i=$1
  echo "d=\$((\$(date +%s) + 120)); while env HOME='$TMP' '$RMQ_BIN/rabbitmqctl' -n '${RMQ_NODES[$i]}'" \
    "-q ping >/dev/null 2>&1 || kill -0 \$(cat '$TMP/rmq$i/pid' 2>/dev/null || echo none) 2>/dev/null;" \
    "do [ \$(date +%s) -lt \$d ] || exit 1; sleep 1; done;" \
    "( . '$TMP/rmq$i/env.sh'; exec '$RMQ_BIN/rabbitmq-server' ) >>'$TMP/rmq$i/log/stdout' 2>&1 &" \
    "d=\$((\$(date +%s) + 180)); until env HOME='$TMP' '$RMQ_BIN/rabbitmqctl' -n '${RMQ_NODES[$i]}'" \
    "-q await_startup --timeout 10 >/dev/null 2>&1; do [ \$(date +%s) -lt \$d ] || exit 1; sleep 1; done"
}
rmq_stop_node() { # $1: node index; stops the whole Erlang VM of that node
  rmqctl "$1" -q stop >/dev/null 2>&1 || true
}

cluster_up() {
  local base i starters=()
  base=$(free_block 5701 3)
  printf '%s' "iw-cluster-$$-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >"$TMP/.erlang.cookie"
  chmod 400 "$TMP/.erlang.cookie"
  echo "[]." >"$TMP/enabled_plugins"
  : >"$TMP/rabbitmq-env.conf"
  for i in 1 2 3; do
    RMQ_NODES[$i]="iwc$i-$$@localhost"
    AMQP_PORTS[$i]=$((base + i - 1))
    mkdir -p "$TMP/rmq$i"
    cat >"$TMP/rmq$i/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:${AMQP_PORTS[$i]}
loopback_users = none
consumer_timeout = 10800000
cluster_partition_handling = pause_minority
EOF
    # RabbitMQ before 3.13 (Debian 12 ships 3.10.8): a quorum queue's at-least-once
    # dead-letter worker that starts on a new leader while the queue record of its target
    # still names the node just lost (the record is updated a moment after the election)
    # asks that node, and only that node, before every forward; it is refused, and is
    # retried only every dead_letter_worker_publisher_confirm_timeout (default 180 s) and
    # only succeeds once the node is back (upstream commit bd9f2a1, in 3.13.0). Every delay
    # (status re-check, retry) through that tier waits meanwhile. 10 s here so that the
    # tier resumes 10 s after the restart rather than up to 3 minutes; see README, Scale-out.
    echo "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 10000}]}]." \
      >"$TMP/rmq$i/advanced.config"
    mkdir -p "$TMP/rmq$i/mnesia" "$TMP/rmq$i/log"
    rmq_envfile "$i"
    sh -c "$(rmq_start_cmd "$i")" &
    starters+=($!)
  done
  for i in "${starters[@]}"; do wait "$i" || { log "a RabbitMQ node did not start"; return 1; }; done
  for i in 2 3; do
    rmqctl "$i" -q stop_app >/dev/null
    rmqctl "$i" -q join_cluster "${RMQ_NODES[1]}" >/dev/null
    rmqctl "$i" -q start_app >/dev/null
  done
  local running
  running=$(rmqctl 1 -q eval 'length(rabbit_nodes:all_running()).')
  [ "$running" = 3 ] || { log "cluster has $running running nodes, not 3"; return 1; }
  log "RabbitMQ cluster up: ${RMQ_NODES[*]:1} on 127.0.0.1:${AMQP_PORTS[1]},${AMQP_PORTS[2]},${AMQP_PORTS[3]}"
}

cluster_down() {
  local i
  for i in 3 2 1; do
    [ -n "${RMQ_NODES[$i]:-}" ] || continue
    rmq_stop_node "$i"
    # the VM can linger a moment; kill it by the pid file we gave it
    local p
    p=$(cat "$TMP/rmq$i/pid" 2>/dev/null) && kill -9 "$p" 2>/dev/null || true
  done
}

# --------------------------------------------------------------------- Redis

redis_start() { # $1: port, rest: extra arguments
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP/redis" \
    --dbfilename "dump-$port.rdb" "$@" >"$TMP/redis/redis-$port.log" 2>&1 &
  REDIS_PIDS+=($!)
  echo $! >"$TMP/redis/pid-$port"
  disown $! # the master is killed on purpose: no "Killed" notice from bash
}

redis_up() {
  local base i
  base=$(free_block 7301 5)
  mkdir -p "$TMP/redis"
  REDIS_MASTER=$base
  REDIS_REPLICA=$((base + 1))
  SENTINELS=""
  redis_start "$REDIS_MASTER"
  redis_start "$REDIS_REPLICA" --replicaof 127.0.0.1 "$REDIS_MASTER"
  for i in 0 1 2; do
    local sp=$((base + 2 + i))
    cat >"$TMP/redis/sentinel-$sp.conf" <<EOF
port $sp
bind 127.0.0.1
dir $TMP/redis
sentinel monitor mymaster 127.0.0.1 $REDIS_MASTER 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 5000
sentinel parallel-syncs mymaster 1
EOF
    redis-server "$TMP/redis/sentinel-$sp.conf" --sentinel >"$TMP/redis/sentinel-$sp.log" 2>&1 &
    REDIS_PIDS+=($!)
    SENTINELS="${SENTINELS:+$SENTINELS,}127.0.0.1:$sp"
  done
  SENTINEL_PORTS=("$((base + 2))" "$((base + 3))" "$((base + 4))")
  # ready: every sentinel sees the replica (flags exactly "slave") and the two other sentinels
  local deadline=$(( $(date +%s) + 60 )) ok
  while :; do
    ok=1
    for sp in "${SENTINEL_PORTS[@]}"; do
      [ "$(redis-cli -p "$sp" sentinel replicas mymaster 2>/dev/null | grep -A1 -x flags | tail -1)" = slave ] || ok=0
      [ "$(redis-cli -p "$sp" sentinel sentinels mymaster 2>/dev/null | grep -cx runid)" = 2 ] || ok=0
    done
    [ $ok -eq 1 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { log "sentinels did not converge"; return 1; }
    sleep 0.5
  done
  log "Redis up: master :$REDIS_MASTER, replica :$REDIS_REPLICA, sentinels $SENTINELS"
}

redis_down() {
  local p
  for p in "${REDIS_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}

cleanup() {
  local rc=$?
  set +e
  log "stopping everything"
  redis_down
  cluster_down
  wait 2>/dev/null
  # the workers' logs (named after the driver's namespace) are kept with the rest
  mv /tmp/iwtest-t-cj?"$$"-*.log "$TMP/" 2>/dev/null
  if [ $KEEP -eq 1 ] || [ $rc -ne 0 ] || [ $FAILED -ne 0 ]; then
    log "logs kept in $TMP"
  else
    rm -rf "$TMP"
  fi
  log "done in $(( $(date +%s) - T0 )) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------- phases

amqp_url() { echo "amqp://guest:guest@127.0.0.1:$1/%2f"; }

# Does this worker take several comma-separated broker URLs (issue 12 item 1,
# branch amqp)? Until it does, it gets the first node only.
worker_takes_url_list() {
  env -i PATH="$PATH" IW_AMQP_URL="$1" IW_HTTP_ADDR=off IW_NAMESPACE="iwc-probe-$$" \
    IW_SCHEMA_DIR="$ROOT/schemas" timeout 30 "$WORKER" declare >/dev/null 2>&1
}

phase_rabbit() {
  local list url stop_node tap_node allow=()
  list="$(amqp_url "${AMQP_PORTS[1]}"),$(amqp_url "${AMQP_PORTS[2]}"),$(amqp_url "${AMQP_PORTS[3]}")"
  if worker_takes_url_list "$list"; then
    url=$list; stop_node=1; tap_node=2
    # the worker loses its connection: events confirmed but not yet acked may repeat (contract);
    # jobs published while node 1 is down must get events (the worker moved to another node)
    allow=(--allow-repeats --require-moved)
    log "phase rabbit: the worker takes the node list; stopping node 1 (the one it connects to first)"
  else
    url=$(amqp_url "${AMQP_PORTS[1]}"); stop_node=3; tap_node=0
    log "phase rabbit: this worker takes ONE broker URL (the amqp branch is not merged):" \
      "it connects to node 1 and node 3 is stopped (quorum leaders move; the worker's connection stays)"
  fi
  # The restart comes at 3/5 of the outcomes, or 30 s after the stop if they are not reached:
  # with RabbitMQ before 3.13 a delay tier can stop dead-lettering until the stopped node is
  # back (see the advanced.config above), which holds up status checks, hence outcomes.
  # --require-moved still proves that the worker went on through another node meanwhile.
  local half=$((JOBS / 5)) late=$((JOBS * 3 / 5))
  "$DRIVE" --tag "cjr$$" --nodes "127.0.0.1:${AMQP_PORTS[1]},127.0.0.1:${AMQP_PORTS[2]},127.0.0.1:${AMQP_PORTS[3]}" \
    --tap-node "$tap_node" --jobs "$JOBS" --rate 150 --timeout 900 "${allow[@]}" \
    --mock-arg --checks-to-complete --mock-arg 3 --mock-arg --rate-limits --mock-arg off \
    --env "IW_AMQP_URL=$url" --env "IW_REDIS_URL=redis://127.0.0.1:1/0" \
    --env "IW_REDIS_SENTINELS=$SENTINELS" --env IW_POLL_SCHEDULE=250ms \
    --env IW_RATE_LIMITS=1000000/s --env IW_LOG_LEVEL=info \
    --at "$half" "$(rmq_stop_cmd "$stop_node")" \
    --at-or-after "$late" 30 "$(rmq_start_cmd "$stop_node")" || return 1
  failover_times "cjr$$"
}

# How long each worker process took to move to another broker node: from its "broker
# connection lost" log line to the next "connected to the broker".
failover_times() {
  local f lost conn
  for f in /tmp/iwtest-t-"$1"-*.log; do
    [ -f "$f" ] || continue
    lost=$(grep -m1 '"broker connection lost' "$f" | sed -n 's/.*"timestamp":"\([^"]*\)".*/\1/p')
    [ -n "$lost" ] || continue
    conn=$(sed -n '/"broker connection lost/,$p' "$f" | grep -m1 '"connected to the broker' |
      sed -n 's/.*"timestamp":"\([^"]*\)".*/\1/p')
    if [ -n "$conn" ]; then
      log "$(basename "$f" .log | sed 's/.*-//'): on another broker node $(( $(date -d "$conn" +%s%3N) - $(date -d "$lost" +%s%3N) )) ms after losing its connection"
    else
      log "$(basename "$f" .log | sed 's/.*-//'): lost its broker connection and never reconnected"
    fi
  done
}

phase_redis() {
  local master_pid
  master_pid=$(cat "$TMP/redis/pid-$REDIS_MASTER")
  log "phase redis: IW_RATE_LIMITS=20/s, mock enforcing 20/s, kill -9 of the Redis master mid-run"
  "$DRIVE" --tag "cjs$$" --nodes "127.0.0.1:${AMQP_PORTS[1]}" --tap-node 0 \
    --jobs "$REDIS_JOBS" --rate 10 --timeout 600 \
    --mock-arg --checks-to-complete --mock-arg 1 --mock-arg --rate-limits --mock-arg 20/s \
    --env "IW_AMQP_URL=$(amqp_url "${AMQP_PORTS[1]}")" --env "IW_REDIS_URL=redis://127.0.0.1:1/0" \
    --env "IW_REDIS_SENTINELS=$SENTINELS" --env IW_POLL_SCHEDULE=250ms \
    --env IW_RATE_LIMITS=20/s --env IW_LOG_LEVEL=info \
    --at $((REDIS_JOBS / 3)) "kill -9 $master_pid; t=\$(date +%s%N); \
      until [ \"\$(redis-cli -p ${SENTINEL_PORTS[0]} sentinel get-master-addr-by-name mymaster | tail -1)\" = $REDIS_REPLICA ]; do sleep 0.05; done; \
      echo \"sentinels named the new master \$(( (\$(date +%s%N) - t) / 1000000 )) ms after kill -9\"" || return 1
  # The worker wrote to the new master after the failover, and what the old one
  # took with it: accepted-job records that never reached the replica.
  local records finals
  records=$(redis-cli -p "$REDIS_REPLICA" --scan --pattern "t-cjs$$-*:job:*" | wc -l)
  finals=$(redis-cli -p "$REDIS_REPLICA" --scan --pattern "t-cjs$$-*:final:*" | wc -l)
  log "new master (:$REDIS_REPLICA) holds $records of $REDIS_JOBS job records and $finals final records"
  [ "$(redis-cli -p "$REDIS_REPLICA" role | head -1)" = master ] || { log "FAIL: :$REDIS_REPLICA is not the master"; return 1; }
  [ "$records" -gt 0 ] || { log "FAIL: the worker never wrote to the new master"; return 1; }
}

log "temp dir $TMP"
redis_up
cluster_up
# the worker's quorum queues are replicated on all three nodes
env -i PATH="$PATH" IW_AMQP_URL="$(amqp_url "${AMQP_PORTS[1]}")" IW_HTTP_ADDR=off \
  IW_NAMESPACE="iwc-members-$$" IW_SCHEMA_DIR="$ROOT/schemas" "$WORKER" declare >/dev/null
# (list_queues prints "name<TAB>type<TAB>[node1, node2, node3]": count the node names)
members=$(rmqctl 1 -q list_queues name type members |
  awk -F'\t' -v q="iwc-members-$$.submit" '$1 == q && $2 == "quorum" { print gsub(/@/, "@", $3) }')
[ "$members" = 3 ] || { log "FAIL: N.submit is not a quorum queue on 3 nodes ($members)"; exit 1; }
log "N.submit is a quorum queue with 3 members"

if [ "$PHASE" = rabbit ] || [ "$PHASE" = all ]; then
  if phase_rabbit; then log "phase rabbit: PASSED"; else log "phase rabbit: FAILED"; FAILED=1; fi
fi
if [ "$PHASE" = redis ] || [ "$PHASE" = all ]; then
  if phase_redis; then log "phase redis: PASSED"; else log "phase redis: FAILED"; FAILED=1; fi
fi
exit $FAILED
