#!/usr/bin/env bash
# Starts or stops a local docker-registry (Debian's `docker-registry`) on
# 127.0.0.1 with its config and data in a fresh temp dir.
#
#   registry.sh start [--port N] [--watch PID]
#       prints REGISTRY_PID=, REGISTRY_ADDR=127.0.0.1:N, REGISTRY_DIR= lines.
#       --watch PID: also stop the registry (and remove its dir) once PID
#       exits, so a test process that dies cannot leak it (checks once a
#       second, for at most 4 hours).
#   registry.sh stop PID [DIR]
#       stops that registry (only if PID is a docker-registry) and removes DIR.
set -euo pipefail

usage() { echo "usage: $0 start [--port N] [--watch PID] | stop PID [DIR]" >&2; exit 2; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local port="" watch=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port="$2"; shift 2 ;;
      --watch) watch="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  command -v docker-registry >/dev/null || { echo "docker-registry not installed (apt-get install docker-registry)" >&2; exit 1; }
  # A free-looking port can be taken between the probe and the bind (tests
  # run in parallel): with no --port, try again on another port.
  local fixed="$port" attempt dir pid ok=""
  for attempt in 1 2 3 4 5; do
    if [ -z "$fixed" ]; then
      port=""
      for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 30000))
        if port_free "$port"; then break; fi
        port=""
      done
      [ -n "$port" ] || { echo "no free port found" >&2; exit 1; }
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/skiff-registry.XXXXXX")"
    touch "$dir/.skiff-registry"
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    pid=$!
    # Bounded wait for the API to answer (10 s) while the registry lives.
    ok=""
    for _ in $(seq 1 100); do
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && kill -0 "$pid" 2>/dev/null; then ok=1; break; fi
      sleep 0.1
    done
    [ -n "$ok" ] && break
    kill "$pid" 2>/dev/null || true
    echo "docker-registry did not start on 127.0.0.1:$port (attempt $attempt):" >&2
    cat "$dir/registry.log" >&2 || true
    rm -rf "$dir"
    [ -z "$fixed" ] || break
  done
  [ -n "$ok" ] || exit 1
  if [ -n "$watch" ]; then
    (
      for _ in $(seq 1 14400); do
        kill -0 "$watch" 2>/dev/null || break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
      done
      "$0" stop "$pid" "$dir" >/dev/null 2>&1 || true
    ) >/dev/null 2>&1 </dev/null &
    disown || true
  fi
  echo "REGISTRY_PID=$pid"
  echo "REGISTRY_ADDR=127.0.0.1:$port"
  echo "REGISTRY_DIR=$dir"
}

stop() {
  [ $# -ge 1 ] || usage
  local pid="$1" dir="${2:-}"
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q docker-registry; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  if [ -n "$dir" ] && [ -e "$dir/.skiff-registry" ]; then
    rm -rf "$dir"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) usage ;;
esac
