#!/usr/bin/env bash
# A 3-server, 3-agent Skiff cluster on loopback, for trying things out.
#
#   deploy/local-cluster.sh start [DIR]   start it (data and logs under DIR, default ./.skiff-cluster)
#   deploy/local-cluster.sh status [DIR]  show members and nodes
#   deploy/local-cluster.sh stop [DIR]    stop exactly the processes it started (PIDs in DIR/pids)
#
# Servers listen on 127.0.0.1:$BASE..$BASE+2 (BASE=${SKIFF_BASE_PORT:-7170}); agents advertise
# 127.0.0.2-4 with host ports 21000-21999, 22000-22999, 23000-23999.
set -euo pipefail

cmd=${1:-}
dir=${2:-.skiff-cluster}
base=${SKIFF_BASE_PORT:-7170}
root=$(cd "$(dirname "$0")/.." && pwd)
skiff=${SKIFF_BIN:-$root/target/release/skiff}

servers="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"

wait_for() { # wait_for SECONDS COMMAND...: bounded poll
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.2
  done
}

start() {
  [ -x "$skiff" ] || (cd "$root" && cargo build --release -p skiff)
  mkdir -p "$dir"
  if [ -s "$dir/pids" ]; then echo "already started (see $dir/pids); stop it first" >&2; exit 1; fi
  for i in 1 2 3; do
    local flags=(--bootstrap)
    [ "$i" = 1 ] || flags=(--join "127.0.0.1:$base")
    "$skiff" server --name "s$i" --data-dir "$dir/s$i" --listen "127.0.0.1:$((base + i - 1))" \
      --metrics-listen "127.0.0.1:$((base + 100 + i - 1))" "${flags[@]}" >"$dir/s$i.log" 2>&1 &
    echo $! >>"$dir/pids"
    wait_for 30 "$skiff" --server "127.0.0.1:$((base + i - 1))" cluster status \
      || { echo "server s$i did not come up; see $dir/s$i.log" >&2; exit 1; }
  done
  for i in 1 2 3; do
    "$skiff" agent --name "n$i" --data-dir "$dir/n$i" --servers "$servers" \
      --advertise "127.0.0.$((i + 1))" --port-range "$((20000 + i * 1000))-$((20999 + i * 1000))" \
      >"$dir/n$i.log" 2>&1 &
    echo $! >>"$dir/pids"
  done
  echo "cluster up: export SKIFF_ADDR=127.0.0.1:$base   (logs and data in $dir)"
}

stop() {
  [ -f "$dir/pids" ] || { echo "nothing to stop in $dir" >&2; return 0; }
  while read -r pid; do
    kill "$pid" 2>/dev/null || true
  done <"$dir/pids"
  for _ in $(seq 1 100); do
    local alive=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$dir/pids"
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$dir/pids"
  rm -f "$dir/pids"
  echo "stopped"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) "$skiff" --server "127.0.0.1:$base" cluster status && "$skiff" --server "127.0.0.1:$base" node ls ;;
  *) echo "usage: $0 start|status|stop [DIR]" >&2; exit 2 ;;
esac
