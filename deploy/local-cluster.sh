#!/usr/bin/env bash
# A 3-server, 3-agent Skiff cluster on loopback, for trying things out.
#
#   deploy/local-cluster.sh start [DIR]          start it (data and logs under DIR, default ./.skiff-cluster)
#   deploy/local-cluster.sh status [DIR]         show its processes, members and nodes (asks any live server)
#   deploy/local-cluster.sh restart MEMBER [DIR] restart one server (s1-s3) or agent (n1-n3), same flags and data
#   deploy/local-cluster.sh stop [DIR]           stop its servers and agents; replicas keep running (listed)
#   deploy/local-cluster.sh stop --purge [DIR]   remove every service's replicas first, then stop, then check
#                                                that no process, network namespace or NAT rule is left
#
# The binary is --bin PATH, else $SKIFF_BIN, else target/release/skiff (built if missing).
# Servers listen on 127.0.0.1:$BASE..$BASE+2 (BASE=${SKIFF_BASE_PORT:-7170}), metrics on
# $SKIFF_METRICS_BASE_PORT.. (default BASE+100); agents advertise 127.0.0.2-4 with host ports
# $SKIFF_PORT_RANGES (default 21000-21999,22000-22999,23000-23999). $SKIFF_SERVER_FLAGS and
# $SKIFF_AGENT_FLAGS are added to every server and agent (e.g.
# SKIFF_AGENT_FLAGS="--insecure-registry 127.0.0.1:5000"; `--enable-process-runtime` lets the
# agents run `--runtime process` replicas, host processes as root: off by default). `start` keeps all of this in
# DIR/cluster.env, so `restart` and `stop` use what `start` used.
#
# DIR/pids holds one line per process started: NAME PID START_TIME (field 22 of /proc/PID/stat).
# A PID is only signalled while it is that process (same start time, and its command line names
# this cluster's data dir); anything else in the file is dropped, never killed.
set -euo pipefail

usage() {
  echo "usage: $0 start|status|stop [--purge]|restart MEMBER [DIR] [--bin PATH]" >&2
  exit 2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
purge=0
bin_flag=
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) purge=1 ;;
    --bin) [ $# -ge 2 ] || usage; bin_flag=$2; shift ;;
    --bin=*) bin_flag=${1#--bin=} ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) positional+=("$1") ;;
  esac
  shift
done
member=
if [ "$cmd" = restart ]; then
  [ ${#positional[@]} -ge 1 ] || usage
  member=${positional[0]}
  positional=("${positional[@]:1}")
fi
dir=${positional[0]:-.skiff-cluster}
if [ "$cmd" = start ]; then mkdir -p "$dir"; fi
if [ ! -d "$dir" ]; then
  echo "no cluster in $dir"
  [ "$cmd" = stop ] && exit 0
  exit 1
fi
dir=$(cd "$dir" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)

# --- settings: from DIR/cluster.env once started, else from the environment ---
if [ -f "$dir/cluster.env" ] && [ "$cmd" != start ]; then
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
else
  base=${SKIFF_BASE_PORT:-7170}
  metrics_base=${SKIFF_METRICS_BASE_PORT:-$((base + 100))}
  IFS=, read -ra port_ranges <<<"${SKIFF_PORT_RANGES:-21000-21999,22000-22999,23000-23999}"
  read -ra server_flags <<<"${SKIFF_SERVER_FLAGS:-}"
  read -ra agent_flags <<<"${SKIFF_AGENT_FLAGS:-}"
  skiff=${SKIFF_BIN:-$root/target/release/skiff}
fi
[ -n "$bin_flag" ] && skiff=$bin_flag
[ ${#port_ranges[@]} = 3 ] || { echo "SKIFF_PORT_RANGES needs 3 ranges (one per agent)" >&2; exit 2; }
servers="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
# The script's own CLI calls verify the servers against the cluster CA,
# which s1 creates when it bootstraps.
export SKIFF_CA_CERT="$dir/s1/pki/ca.crt"
# s1 bootstraps the cluster and writes the admin token `management` into its data dir: every
# CLI call of this script presents it (a SKIFF_TOKEN in the environment still wins).
client_config=$dir/s1/client.toml
export SKIFF_CLIENT_CONFIG=$client_config

wait_for() { # wait_for SECONDS COMMAND...: bounded poll
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.2
  done
}

# --- processes: identified by PID and start time, never by name ---

start_time() { # start_time PID: field 22 of /proc/PID/stat, empty if gone or a zombie
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${stat##*) }
  # shellcheck disable=SC2086
  set -- $rest
  [ "$1" = Z ] || [ "$1" = X ] || echo "${20}"
}

cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

is_ours() { # is_ours NAME PID START: that very process, a skiff of this cluster's member NAME
  local name=$1 pid=$2 start=$3 now
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  now=$(start_time "$pid")
  [ -n "$now" ] && [ "$now" = "$start" ] || return 1
  # Never the last argument: "--data-dir DIR/NAME " ends with a space in the command line.
  [[ "$(cmdline "$pid")" == *" --data-dir $dir/$name "* ]]
}

member_of() { # member_of PID: the member (s1...n3) of this cluster that PID runs, if any
  local name
  for name in s1 s2 s3 n1 n2 n3; do
    if [[ "$(cmdline "$1")" == *" --data-dir $dir/$name "* ]]; then echo "$name"; return 0; fi
  done
  return 0
}

join_token() { # join_token ROLE: the cluster's join token of ROLE (server, agent), from any live server
  # Bounded retries: right after a join the cluster may be between leaders
  # or membership changes for a moment.
  local addr attempt
  for attempt in $(seq 1 40); do
    if addr=$(live_server) && "$skiff" --server "$addr" cluster token "$1" -q 2>/dev/null; then return 0; fi
    sleep 0.25
  done
  echo "no server gave a $1 join token within 10 s" >&2
  return 1
}

member_args() { # member_args NAME: sets `args` to the command line of that member
  local i=${1#?}
  # A member without a certificate yet joins with a token (Swarm's design);
  # later starts use the certificate in its data dir.
  local token=()
  case "$1" in
    s[23]|n[123])
      [ -f "$dir/$1/pki/identity.crt" ] || token=(--token "$(join_token "$([ "${1:0:1}" = s ] && echo server || echo agent)")") ;;
  esac
  case "$1" in
    s[123])
      local join=(--bootstrap)
      [ "$i" = 1 ] || join=(--join "127.0.0.1:$base" "${token[@]}")
      args=(server --name "$1" --data-dir "$dir/$1" --listen "127.0.0.1:$((base + i - 1))"
        --metrics-listen "127.0.0.1:$((metrics_base + i - 1))" "${join[@]}" "${server_flags[@]}") ;;
    n[123])
      args=(agent --name "$1" --data-dir "$dir/$1" --servers "$servers" --advertise "127.0.0.$((i + 1))"
        --port-range "${port_ranges[$((i - 1))]}" "${token[@]}" "${agent_flags[@]}") ;;
    *) echo "no member $1 (members: s1 s2 s3 n1 n2 n3)" >&2; exit 2 ;;
  esac
}

spawn() { # spawn NAME: start that member in the background and record it in DIR/pids
  local args pid
  member_args "$1"
  "$skiff" "${args[@]}" </dev/null >>"$dir/$1.log" 2>&1 &
  pid=$!
  echo "$1 $pid $(start_time "$pid")" >>"$dir/pids"
}

# `live` gets the entries of DIR/pids that are still ours; the others are dropped from the file.
live=()
load_pids() {
  live=()
  [ -f "$dir/pids" ] || return 0
  local name pid start
  while read -r name pid start; do
    [ -n "${name:-}" ] || continue
    if [ -z "${pid:-}" ] && [[ "$name" =~ ^[0-9]+$ ]]; then # an older file: PIDs only
      pid=$name
      start=$(start_time "$pid")
      name=$(member_of "$pid")
      if [ -z "$name" ] || [ -z "$start" ]; then
        [ -z "$start" ] || echo "not signalling PID $pid: not a process of this cluster; dropped from $dir/pids" >&2
        continue
      fi
    fi
    if is_ours "$name" "$pid" "${start:-}"; then
      live+=("$name $pid $start")
    elif [ -n "$(start_time "$pid")" ]; then
      echo "not signalling PID $pid ($name): it is not that process any more (reused PID); dropped from $dir/pids" >&2
    fi
  done <"$dir/pids"
  save_pids
}

save_pids() {
  if [ ${#live[@]} = 0 ]; then rm -f "$dir/pids"; else printf '%s\n' "${live[@]}" >"$dir/pids"; fi
}

stop_entries() { # stop_entries "NAME PID START"...: SIGTERM, up to 15 s, then SIGKILL, each re-checked
  local entry name pid start
  for entry in "$@"; do
    read -r name pid start <<<"$entry"
    is_ours "$name" "$pid" "$start" && kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 15))
  while ((SECONDS < deadline)); do
    local alive=0
    for entry in "$@"; do
      read -r name pid start <<<"$entry"
      is_ours "$name" "$pid" "$start" && alive=1
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for entry in "$@"; do
    read -r name pid start <<<"$entry"
    if is_ours "$name" "$pid" "$start"; then
      echo "$name (PID $pid) did not stop within 15 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

live_server() { # prints the address of the first server that answers
  local addr
  for addr in ${servers//,/ }; do
    if "$skiff" --server "$addr" cluster status >/dev/null 2>&1; then echo "$addr"; return 0; fi
  done
  return 1
}

# --- replicas: known from the agents' records, DIR/nN/allocs/ID/state.json ---

replicas() { # one line per recorded replica: NODE ALLOC SERVICE PID START (PID 0: none runs)
  local record node alloc service pid start
  for record in "$dir"/n[123]/allocs/*/state.json; do
    [ -f "$record" ] || continue
    node=${record#"$dir"/}; node=${node%%/*}
    alloc=$(basename "$(dirname "$record")")
    service=$(sed -n 's/^    "service": "\(.*\)",$/\1/p' "$record" | head -n1)
    pid=$(sed -n 's/^  "pid": \([0-9]*\),$/\1/p' "$record" | head -n1)
    start=$(sed -n 's/^  "start_time": \([0-9]*\),$/\1/p' "$record" | head -n1)
    echo "$node $alloc ${service:-?} ${pid:-0} ${start:-0}"
  done
}

running_replicas() { # the lines of `replicas` whose process is alive (same start time)
  local node alloc service pid start
  replicas | while read -r node alloc service pid start; do
    [ "$pid" != 0 ] && [ "$(start_time "$pid")" = "$start" ] && echo "$node $alloc $service $pid $start"
  done
  return 0
}

cluster_processes() { # PIDs (with command line) of processes whose command line or cwd is in DIR
  local p pid cwd cl me
  me=$(cmdline $$)
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ -n "$(start_time "$pid")" ] || continue
    cl=$(cmdline "$pid")
    [ "$cl" = "$me" ] && continue # this script and its subshells
    cwd=$(readlink "$p/cwd" 2>/dev/null || true)
    if [[ "$cl" == *"$dir/"* ]] || [[ "$cwd" == "$dir/"* ]]; then echo "$pid $cl"; fi
  done
  return 0
}

purge_replicas() {
  local server names name
  if server=$(live_server); then
    # `service ls --output json`: an array of {"spec": {"name": ...}, ...}.
    names=$("$skiff" --server "$server" service ls --output json |
      sed -n '/^    "spec": {$/{n;s/^      "name": "\(.*\)",$/\1/p;}') ||
      echo "failed to list services through $server" >&2
    for name in $names; do
      echo "removing service $name"
      "$skiff" --server "$server" service rm "$name" >/dev/null ||
        echo "failed to remove service $name" >&2
    done
    # Agents stop each replica (SIGTERM, grace, SIGKILL), tear down its network and forget its
    # record; bounded.
    local deadline=$((SECONDS + 60))
    while [ -n "$(replicas)" ] && ((SECONDS < deadline)); do sleep 0.2; done
  else
    echo "no server answers: cannot remove services; stopping replicas by the agents' records" >&2
  fi
}

pgid() { # pgid PID: field 5 of /proc/PID/stat
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${stat##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo "$3"
}

kill_replicas() { # what still runs by the records (its agent was down): by PID and start time
  local node alloc service pid start target entry
  local -a left=()
  while read -r node alloc service pid start; do
    left+=("$pid $start")
    target=$pid
    # A process-runtime replica leads its own process group: signal the group.
    [ "$(pgid "$pid")" = "$pid" ] && target=-$pid
    echo "stopping replica $alloc of $service on $node (PID $pid): its agent did not" >&2
    kill -TERM -- "$target" 2>/dev/null || true
  done < <(running_replicas)
  [ ${#left[@]} = 0 ] && return 0
  sleep 3
  for entry in "${left[@]}"; do
    read -r pid start <<<"$entry"
    if [ "$(start_time "$pid")" = "$start" ]; then kill -KILL -- "$pid" 2>/dev/null || true; fi
  done
}

check_leftovers() { # check_leftovers ALLOC...: reports any process, netns or NAT rule left
  local left=0 alloc rules
  local procs
  procs=$(cluster_processes)
  if [ -n "$procs" ]; then
    echo "left running (command line or working directory in $dir):" >&2
    sed 's/^/  /' <<<"$procs" >&2
    left=1
  fi
  rules=$(iptables-save -t nat 2>/dev/null || true)
  for alloc in "$@"; do
    if [ -e "/run/netns/skiff-$alloc" ]; then
      echo "left: network namespace skiff-$alloc" >&2
      left=1
    fi
    if grep -q -- "skiff-$alloc" <<<"$rules"; then
      echo "left: NAT rules of skiff-$alloc (iptables -t nat)" >&2
      left=1
    fi
  done
  return $left
}

start() {
  if [ ! -x "$skiff" ]; then
    [ "$skiff" = "$root/target/release/skiff" ] || { echo "no skiff binary at $skiff" >&2; exit 1; }
    (cd "$root" && cargo build --release -p skiff)
  fi
  load_pids
  if [ ${#live[@]} -gt 0 ]; then
    echo "already started: ${live[*]} (see $dir/pids); stop it first" >&2
    exit 1
  fi
  declare -p base metrics_base port_ranges server_flags agent_flags skiff >"$dir/cluster.env"
  local i
  for i in 1 2 3; do
    spawn "s$i"
    wait_for 30 "$skiff" --server "127.0.0.1:$((base + i - 1))" cluster status \
      || { echo "server s$i did not come up; see $dir/s$i.log" >&2; exit 1; }
  done
  for i in 1 2 3; do spawn "n$i"; done
  local left
  left=$(running_replicas | wc -l)
  [ "$left" = 0 ] || echo "$left replicas still running from before: the agents re-adopt them"
  echo "cluster up: export SKIFF_ADDR=127.0.0.1:$base SKIFF_CLIENT_CONFIG=$client_config   (logs and data in $dir)"
}

stop() {
  load_pids
  local -a allocs=()
  local node alloc rest
  if [ "$purge" = 1 ]; then
    while read -r node alloc rest; do allocs+=("$alloc"); done < <(replicas)
    purge_replicas
  fi
  if [ ${#live[@]} = 0 ]; then
    echo "no server or agent of $dir is running"
  else
    stop_entries "${live[@]}"
    load_pids
    echo "stopped the servers and agents of $dir"
  fi
  if [ "$purge" = 1 ]; then
    while read -r node alloc rest; do allocs+=("$alloc"); done < <(replicas)
    kill_replicas
    if check_leftovers "${allocs[@]}"; then
      echo "purged: no replica, process, network namespace or NAT rule of this cluster is left"
    else
      echo "purge incomplete: see above" >&2
      return 1
    fi
  else
    local running
    running=$(running_replicas)
    if [ -z "$running" ]; then
      echo "no replicas running"
    else
      echo "replicas keep running (they outlive agents by design; \`start\` re-adopts them, \`stop --purge\` removes them):"
      local service pid
      while read -r node alloc service pid rest; do
        echo "  $node  $service  $alloc  PID $pid"
      done <<<"$running"
    fi
  fi
}

restart() {
  member_args "$member" # validates the name
  load_pids
  local entry name
  local -a others=() mine=()
  for entry in "${live[@]}"; do
    read -r name _ <<<"$entry"
    if [ "$name" = "$member" ]; then mine+=("$entry"); else others+=("$entry"); fi
  done
  [ ${#mine[@]} = 0 ] || stop_entries "${mine[@]}"
  live=("${others[@]}")
  save_pids
  spawn "$member"
  echo "restarted $member (log: $dir/$member.log)"
}

status() {
  load_pids
  local entry name pid start
  echo "processes of $dir:"
  [ ${#live[@]} -gt 0 ] || echo "  none running"
  for entry in "${live[@]}"; do
    read -r name pid start <<<"$entry"
    echo "  $name  PID $pid"
  done
  local server
  server=$(live_server) || { echo "no server answers (tried $servers)" >&2; return 1; }
  echo "asking $server:"
  "$skiff" --server "$server" cluster status && "$skiff" --server "$server" node ls
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  restart) restart ;;
  status) status ;;
  *) usage ;;
esac
