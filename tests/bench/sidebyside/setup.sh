#!/bin/sh
# Installs what the side-by-side benchmark needs and the project's build does not:
# Debian's Celery with its RabbitMQ client (kombu, py-amqp), jsonschema for the
# task's validation, and wrk for the mock-alone ceiling.  Idempotent: installs
# only what is missing.  Not part of scripts/setup.sh: the test suite needs none
# of it.
set -eu
PKGS="python3-celery python3-kombu python3-amqp python3-jsonschema wrk"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "sidebyside/setup.sh: installing$missing" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
/usr/bin/python3 -c 'import celery, kombu, amqp, jsonschema' ||
    { echo "sidebyside/setup.sh: Debian's python3 cannot import celery/kombu/amqp/jsonschema" >&2; exit 1; }
