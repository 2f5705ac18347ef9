#!/usr/bin/env bash
# deploy/rabbitmq/definitions.json imported into a PRIVATE RabbitMQ node (own node name,
# ports and data directory; the shared broker is never touched):
#   - the broker accepts the file, with user integration-worker and its permissions;
#   - integration-worker declare, logged in as integration-worker, declares namespace
#     ext-api over the imported topology (same arguments, or the broker would refuse it);
#   - the same user is refused another namespace.
# Usage: rabbitmq_import.sh SOURCE_DIR WORKER_BINARY. Exit 0 ok, 1 failure, 77 skipped.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SRC=$1
WORKER=$2
log() { printf 'rabbitmq_import: %s\n' "$*"; }
fail() { printf 'rabbitmq_import: FAIL: %s\n' "$*" >&2; exit 1; }

command -v rabbitmq-server >/dev/null 2>&1 || { log "SKIP: rabbitmq-server not installed"; exit 77; }
[ "$(id -u)" -eq 0 ] || { log "SKIP: starting a RabbitMQ node needs root"; exit 77; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
DIST=$(free_port)
NODE="iwdeploy-$$@localhost"
DIR=$(mktemp -d /tmp/iw-rmq-import-XXXXXX)
ctl() { rabbitmqctl -n "$NODE" -q "$@"; }
cleanup() {
  ctl stop >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

mkdir -p "$DIR/mnesia" "$DIR/log"
cp "$SRC/deploy/rabbitmq/definitions.json" "$DIR/"
printf 'load_definitions = %s/definitions.json\nlisteners.tcp.default = %s\n' "$DIR" "$PORT" >"$DIR/rabbitmq.conf"
echo '[].' >"$DIR/enabled_plugins" # no management/prometheus listeners to collide with
chmod 755 "$DIR" "$DIR/mnesia" "$DIR/log"
chmod 644 "$DIR/definitions.json" "$DIR/rabbitmq.conf" "$DIR/enabled_plugins"
chown -R rabbitmq:rabbitmq "$DIR" 2>/dev/null || true

log "starting node $NODE on 127.0.0.1:$PORT"
env RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$PORT" \
  RABBITMQ_DIST_PORT="$DIST" RABBITMQ_MNESIA_BASE="$DIR/mnesia" RABBITMQ_LOG_BASE="$DIR/log" \
  RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
  RABBITMQ_PID_FILE="$DIR/pid" rabbitmq-server -detached >"$DIR/out" 2>&1 ||
  fail "rabbitmq-server -detached: $(tail -n 3 "$DIR/out")"
up=0
for _ in $(seq 1 60); do
  if ctl await_startup >/dev/null 2>&1; then up=1; break; fi
  sleep 2
done
[ "$up" = 1 ] || fail "node did not start: $(tail -n 5 "$DIR"/log/*.log 2>/dev/null)"

perms=$(ctl list_permissions | awk '$1 == "integration-worker" {print $2, $3, $4}')
[ "$perms" = '^ext-api\..*$ ^(ext-api\..*|amq\.default)$ ^ext-api\..*$' ] ||
  fail "integration-worker's imported permissions are '$perms'"
ctl list_users | grep -q '^integration-worker.*management' || fail "integration-worker lacks the management tag"
ctl change_password integration-worker pw >/dev/null

url="amqp://integration-worker:pw@127.0.0.1:$PORT/%2f"
env -i PATH="$PATH" IW_AMQP_URL="$url" IW_SCHEMA_DIR="$SRC/schemas" "$WORKER" declare >"$DIR/declare.out" 2>&1 ||
  fail "declare of ext-api as integration-worker failed: $(tail -n 2 "$DIR/declare.out")"
if env -i PATH="$PATH" IW_AMQP_URL="$url" IW_NAMESPACE=other IW_SCHEMA_DIR="$SRC/schemas" "$WORKER" declare >"$DIR/other.out" 2>&1; then
  fail "integration-worker could declare namespace 'other'"
fi
grep -q ACCESS_REFUSED "$DIR/other.out" || fail "namespace 'other' failed without ACCESS_REFUSED: $(tail -n 1 "$DIR/other.out")"
log "ok: definitions imported; integration-worker declares ext-api (matching topology) and nothing else"
