#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the local stack need.
#
#   scripts/setup.sh            # as root, via sudo, or as a user when nothing is missing
#   IW_SETUP_OPTIONAL=1 scripts/setup.sh   # also install missing optional tools (clang-format)
#
# Checks with dpkg-query first and touches apt only when something is missing, so it
# is a fast no-op on a prepared machine (and then needs no root). Non-interactive:
# works with CI=true and no stdin. Only Debian packages are installed, nothing else.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Required: build (compiler, cmake, pkg-config, -dev libraries, check; clang and its
# runtime libraries, which hold libFuzzer and the sanitizers, for tests/fuzz), local stack
# (rabbitmq-server, redis-server) and the tools the scripts and tests use.
REQUIRED=(
  gcc libc6-dev make cmake pkg-config
  librabbitmq-dev libssl-dev libcurl4-openssl-dev libjansson-dev libyajl-dev libhiredis-dev libmicrohttpd-dev
  libgnutls28-dev  # the mock provider checks client certificates (mTLS) with GnuTLS
  check json-schema-test-suite
  clang libclang-rt-14-dev
  rabbitmq-server redis-server amqp-tools curl tzdata
  # tests/deploy: promtool (check/test the alert rules, the dashboard's queries, /metrics)
  # and PyYAML for the manifests; the prometheus server it brings is never started
  prometheus python3 python3-yaml
)
# Optional: nice to have (formatting); a failure to install them is only a warning.
OPTIONAL=(clang-format)

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script supports Debian 12 only"

missing=()
for p in "${REQUIRED[@]}"; do is_installed "$p" || missing+=("$p"); done
missing_opt=()
for p in "${OPTIONAL[@]}"; do is_installed "$p" || missing_opt+=("$p"); done

if [ ${#missing[@]} -eq 0 ]; then
  if [ ${#missing_opt[@]} -eq 0 ]; then
    log "all ${#REQUIRED[@]} required and ${#OPTIONAL[@]} optional packages are installed"
    exit 0
  elif [ "${IW_SETUP_OPTIONAL:-0}" != 1 ]; then
    # Do not touch apt only for optional tools (keeps repeated CI runs offline and fast).
    log "all ${#REQUIRED[@]} required packages are installed (optional missing: ${missing_opt[*]}; IW_SETUP_OPTIONAL=1 installs them)"
    exit 0
  fi
fi

# Root is needed from here on: run directly as root, else through sudo.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    if [ -t 0 ]; then SUDO=(sudo); else SUDO=(sudo -n); fi
  elif [ ${#missing[@]} -gt 0 ]; then
    die "missing packages (${missing[*]}) and not root: run 'sudo scripts/setup.sh'"
  else
    log "WARNING: optional packages missing (${missing_opt[*]}); not root, skipping"
    exit 0
  fi
fi

apt_get() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null
}

log "updating package lists (missing: ${missing[*]:-none}; optional: ${missing_opt[*]:-none})"
apt_get update || die "apt-get update failed"

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_get install --no-install-recommends "${missing[@]}" || die "apt-get install failed for: ${missing[*]}"
fi
if [ ${#missing_opt[@]} -gt 0 ]; then
  log "installing optional ${missing_opt[*]}"
  apt_get install --no-install-recommends "${missing_opt[@]}" ||
    log "WARNING: could not install optional ${missing_opt[*]} (continuing)"
fi

still=()
for p in "${REQUIRED[@]}"; do is_installed "$p" || still+=("$p"); done
[ ${#still[@]} -eq 0 ] || die "still missing after install: ${still[*]}"
log "done: all required packages are installed"
