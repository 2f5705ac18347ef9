#!/usr/bin/env bash
# Does this RabbitMQ leave a delay tier's dead-lettering stuck after a node loss?
#
#   tests/cluster/dlx_stuck.sh [--build DIR] [--cycles N] [--remedy transfer|none] [--keep]
#
# The broker bug behind the cluster proof's stall (README, Scale-out, "A delay tier stuck
# after a node loss"), isolated: a private 3-node cluster on loopback (nodes iwdK-<pid>, own
# cookie and ports; the shared node on 5672 is never touched). Each cycle declares a fresh
# namespace through node X (so its queue leaders are on X), publishes 200 status re-checks
# a second into N.delay.250 through another node (build/bin/dlx_pub), stops node X and
# watches N.status: a tier that forwards nothing for 6 s (quorum queue counts are refreshed
# about every 5 s) is STUCK. Then it prints the tier's
# dead-letter worker state (its client for N.status), tries the remedy (--remedy transfer:
# move the tier's leader, the runbook's command), restarts X and says how long the tier took
# to resume. X goes round the three nodes. Exits 1 when any cycle was stuck.
# RabbitMQ 3.10.8 (Debian 12): stuck in 12 of 38 cycles on 2026-12-01. Needs root and a build.
set -uo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD="$ROOT/build"
CYCLES=9
REMEDY=transfer
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build) BUILD=$2; shift 2 ;;
    --cycles) CYCLES=$2; shift 2 ;;
    --remedy) REMEDY=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dlx_stuck.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$REMEDY" in transfer|none) ;; *) echo "dlx_stuck.sh: --remedy transfer|none" >&2; exit 2 ;; esac
WORKER="$BUILD/bin/integration-worker"
PUB="$BUILD/bin/dlx_pub"
for b in "$WORKER" "$PUB"; do
  [ -x "$b" ] || { echo "dlx_stuck.sh: $b missing: build first (cmake --build $BUILD)" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "dlx_stuck.sh: needs root (RabbitMQ from the Debian package)" >&2; exit 2; }

TMP=$(mktemp -d /tmp/iw-dlx.XXXXXX)
chmod 755 "$TMP"
RMQ_BIN=/usr/lib/rabbitmq/bin
declare -a N=() P=()
PUB_PID=

log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ctl() { local i=$1; shift; env HOME="$TMP" "$RMQ_BIN/rabbitmqctl" -n "${N[$i]}" "$@"; }
start_node() {
  local i=$1 d
  ( . "$TMP/rmq$i/env.sh"; exec "$RMQ_BIN/rabbitmq-server" ) >>"$TMP/rmq$i/stdout" 2>&1 &
  d=$(( $(date +%s) + 180 ))
  until ctl "$i" -q await_startup --timeout 10 >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$d" ] || return 1
    sleep 1
  done
}
stop_node() { ctl "$1" -q stop "$TMP/rmq$1/pid" >/dev/null 2>&1; }
count() { # messages in queue $2, as node $1 sees it
  ctl "$1" -q list_queues name messages 2>/dev/null | awk -v q="$2" '$1 == q { print $2 }'
}
leader() { ctl "$1" -q list_queues name leader 2>/dev/null | awk -v q="$2" '$1 == q { print $2 }'; }

cleanup() {
  local i p
  [ -n "$PUB_PID" ] && kill "$PUB_PID" 2>/dev/null
  for i in 3 2 1; do
    [ -n "${N[$i]:-}" ] || continue
    stop_node "$i"
    p=$(cat "$TMP/rmq$i/pid" 2>/dev/null) && kill -9 "$p" 2>/dev/null
  done
  wait 2>/dev/null
  if [ $KEEP -eq 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

base=5901
while :; do
  ok=1
  for i in 0 1 2; do port_free $((base + i)) && port_free $((base + i + 20000)) || ok=0; done
  [ $ok -eq 1 ] && break
  base=$((base + 3))
done
printf '%s' "iw-dlx-$$-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >"$TMP/.erlang.cookie"
chmod 400 "$TMP/.erlang.cookie"
echo "[]." >"$TMP/enabled_plugins"
: >"$TMP/rabbitmq-env.conf"
for i in 1 2 3; do
  N[$i]="iwd$i-$$@localhost"
  P[$i]=$((base + i - 1))
  mkdir -p "$TMP/rmq$i/mnesia" "$TMP/rmq$i/log"
  printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\ncluster_partition_handling = pause_minority\n' \
    "${P[$i]}" >"$TMP/rmq$i/rabbitmq.conf"
  # dead letters the stuck worker holds are retried every 10 s (default 180 s)
  echo "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 10000}]}]." >"$TMP/rmq$i/advanced.config"
  cat >"$TMP/rmq$i/env.sh" <<EOF
export HOME='$TMP' RABBITMQ_NODENAME='${N[$i]}' RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=${P[$i]} RABBITMQ_DIST_PORT=$((P[$i] + 20000))
export RABBITMQ_MNESIA_BASE='$TMP/rmq$i/mnesia' RABBITMQ_LOG_BASE='$TMP/rmq$i/log'
export RABBITMQ_PID_FILE='$TMP/rmq$i/pid' RABBITMQ_CONFIG_FILE='$TMP/rmq$i/rabbitmq.conf'
export RABBITMQ_ADVANCED_CONFIG_FILE='$TMP/rmq$i/advanced.config'
export RABBITMQ_ENABLED_PLUGINS_FILE='$TMP/enabled_plugins' RABBITMQ_CONF_ENV_FILE='$TMP/rabbitmq-env.conf'
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
  start_node "$i" &
done
wait
for i in 2 3; do
  ctl "$i" -q stop_app && ctl "$i" -q join_cluster "${N[1]}" && ctl "$i" -q start_app ||
    { log "node $i did not join the cluster"; exit 2; }
done
log "cluster up on 127.0.0.1:${P[1]},${P[2]},${P[3]} ($(ctl 1 -q eval 'rabbit_misc:version().' | tr -d '"'))"

stuck=0
for k in $(seq 1 "$CYCLES"); do
  X=$(( (k - 1) % 3 + 1 ))
  Y=$(( X % 3 + 1 ))
  ns="iwd$$-$k"
  env -i PATH="$PATH" IW_AMQP_URL="amqp://guest:guest@127.0.0.1:${P[$X]}/%2f" IW_HTTP_ADDR=off \
    IW_NAMESPACE="$ns" IW_SCHEMA_DIR="$ROOT/schemas" "$WORKER" declare >/dev/null 2>&1 ||
    { log "cycle $k: declare failed"; exit 2; }
  "$PUB" "$ns.delay.250" "${P[$Y]}" 200 >>"$TMP/pub-$k.log" 2>&1 &
  PUB_PID=$!
  sleep 3
  stop_node "$X"
  sleep 8
  a=$(count "$Y" "$ns.status")
  sleep 6
  b=$(count "$Y" "$ns.status")
  lead=$(leader "$Y" "$ns.delay.250")
  if [ "$a" != "$b" ]; then
    log "cycle $k: node $X stopped; N.status $a -> $b in 6 s: flowing"
  else
    stuck=$((stuck + 1))
    log "cycle $k: node $X stopped; N.status $a -> $b in 6 s: STUCK (N.delay.250 led by $lead)"
    ctl "$Y" -q eval "
      [{dlx_worker, Pid, pending_dead_letters, maps:size(element(8, S)),
        [{target, element(4, element(3, C)), leader, element(3, element(4, C)),
          queue_status, element(4, element(4, C)), servers, element(3, element(2, element(4, C)))}
         || {_, C} <- maps:to_list(element(2, element(7, S)))]}
       || {_, Pid, _, _} <- supervisor:which_children({rabbit_fifo_dlx_sup, '$lead'}),
          S <- [catch sys:get_state(Pid, 5000)], is_tuple(S), element(1, S) =:= state,
          element(4, element(2, S)) =:= <<\"$ns.delay.250\">>]." 2>&1 | sed 's/^/    /'
    if [ "$REMEDY" = transfer ]; then
      other=""
      for j in 1 2 3; do [ "$j" != "$X" ] && [ "${N[$j]}" != "$lead" ] && other=${N[$j]}; done
      ctl "$Y" -q eval "ra:transfer_leadership({'%2F_$ns.delay.250', '$lead'}, {'%2F_$ns.delay.250', '$other'})." >/dev/null 2>&1
      sleep 3
      a=$(count "$Y" "$ns.status")
      sleep 6
      b=$(count "$Y" "$ns.status")
      log "cycle $k: leader of N.delay.250 moved to $other: N.status $a -> $b in 6 s"
    fi
  fi
  t0=$(date +%s)
  start_node "$X" || { log "cycle $k: node $X did not start again"; exit 2; }
  if [ "$a" = "$b" ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      a=$(count "$Y" "$ns.status")
      sleep 6
      b=$(count "$Y" "$ns.status")
      [ "$a" != "$b" ] && break
    done
    log "cycle $k: node $X back; N.status $a -> $b, $(( $(date +%s) - t0 )) s after its restart began"
  fi
  kill "$PUB_PID" 2>/dev/null
  wait "$PUB_PID" 2>/dev/null
  PUB_PID=
done
log "stuck in $stuck of $CYCLES cycles"
[ "$stuck" -eq 0 ]
