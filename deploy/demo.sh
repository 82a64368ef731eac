#!/usr/bin/env bash
# Builds Skiff, starts `skiff dev` (one server + one agent, data in ./.skiff), runs a demo
# service `demo` of two HTTP replicas published through the routing proxy, shows them, and
# keeps dev running in the foreground. Ctrl-C stops dev and its replicas; the service stays in
# ./.skiff for the next run.
#
# Environment: SKIFF_ADDR (API address, default 127.0.0.1:7070), DEMO_PORT (published port,
# default 8080), DEMO_DATA_DIR (default ./.skiff), SKIFF_BIN (a built skiff binary: no build),
# DEMO_DEV_FLAGS (more flags for `skiff dev`, e.g. "--port-range 21000-21039").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME}/.cargo/env"
fi

export SKIFF_ADDR="${SKIFF_ADDR:-127.0.0.1:7070}"
skiff="${SKIFF_BIN:-target/release/skiff}"
# The port every node's routing proxy publishes the demo on.
publish="${DEMO_PORT:-8080}"
data_dir="${DEMO_DATA_DIR:-.skiff}"
log="${data_dir}/dev.log"
# `skiff dev` writes the API address and its admin token there; the CLI calls below use it.
export SKIFF_CLIENT_CONFIG="${SKIFF_CLIENT_CONFIG:-${data_dir}/client.toml}"

if [ -z "${SKIFF_BIN:-}" ]; then
    echo "==> building (cargo build --release)"
    cargo build --release
fi

if "$skiff" node ls >/dev/null 2>&1; then
    echo "error: a skiff server already answers on ${SKIFF_ADDR}; stop it (or set SKIFF_ADDR)" >&2
    exit 1
fi

mkdir -p "$data_dir"
# The CLI verifies the server against the CA `skiff dev` creates there.
export SKIFF_CA_CERT="$data_dir/server/pki/ca.crt"
# shellcheck disable=SC2206 # the extra flags are words, split on purpose.
dev_flags=(${DEMO_DEV_FLAGS:-})
echo "==> starting: $skiff dev --data-dir $data_dir --listen $SKIFF_ADDR ${dev_flags[*]}  (output in $log)"
"$skiff" dev --data-dir "$data_dir" --listen "$SKIFF_ADDR" "${dev_flags[@]}" >>"$log" 2>&1 &
dev_pid=$!

stopping=0
# Stops dev with SIGTERM (it stops its replicas: SIGTERM, SIGKILL after 5 s), then exits.
stop() {
    local rc="${1:-0}"
    [ "$stopping" -eq 0 ] || return 0
    stopping=1
    trap - INT TERM
    echo
    if kill -0 "$dev_pid" 2>/dev/null; then
        echo "==> stopping skiff dev (pid $dev_pid) and its replicas"
        kill -TERM "$dev_pid" 2>/dev/null || true
        local _
        for _ in $(seq 1 100); do
            kill -0 "$dev_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$dev_pid" 2>/dev/null || true
    fi
    wait "$dev_pid" 2>/dev/null || true
    exit "$rc"
}
# A background job of a script ignores SIGINT, so Ctrl-C reaches dev through this trap.
trap stop INT TERM
# If a step below fails, do not leave dev running behind the user's back.
on_exit() {
    local rc=$?
    if [ "$stopping" -eq 0 ] && kill -0 "$dev_pid" 2>/dev/null; then
        echo "error: demo failed (exit $rc); stopping skiff dev" >&2
        stop "$rc"
    fi
}
trap on_exit EXIT

echo "==> waiting for the node to be ready"
ready=0
for _ in $(seq 1 150); do
    if ! kill -0 "$dev_pid" 2>/dev/null; then
        echo "error: skiff dev exited; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    if "$skiff" node ls --output json 2>/dev/null | grep -q '"ready"'; then
        ready=1
        break
    fi
    sleep 0.2
done
if [ "$ready" -ne 1 ]; then
    echo "error: node not ready after 30 s; see $log" >&2
    stop 1
fi

if "$skiff" service inspect demo >/dev/null 2>&1; then
    echo "==> service demo exists already (kept in $data_dir from an earlier run)"
else
    echo "==> $skiff service create demo --runtime process --replicas 2 --publish $publish --protocol http --health-http / -- python3 -m http.server '\$PORT' --bind 127.0.0.1"
    # shellcheck disable=SC2016 # `$PORT` is for the agent to substitute, not the shell.
    "$skiff" service create demo --runtime process --replicas 2 --publish "$publish" --protocol http \
        --health-http / -- python3 -m http.server '$PORT' --bind 127.0.0.1
fi

# Healthy once their check passes (a demo kept from an older run without a check stops at
# running), and reached on its published port if it has one.
read -r ready_state published < <("$skiff" service inspect demo --output json 2>/dev/null |
    python3 -c 'import json, sys
s = json.load(sys.stdin)["spec"]
print("healthy" if s.get("health") else "running", s.get("publish") or "")' 2>/dev/null ||
    echo running)
echo "==> waiting for 2 $ready_state replicas"
healthy=0
for _ in $(seq 1 150); do
    healthy="$("$skiff" service ps demo --output json 2>/dev/null |
        python3 -c 'import json, sys
print(sum(1 for a in json.load(sys.stdin) if a["state"] == sys.argv[1]))' "$ready_state" || echo 0)"
    [ "$healthy" -lt 2 ] || break
    sleep 0.2
done

if [ "$healthy" -lt 2 ]; then
    echo "warning: the replicas did not all reach $ready_state within 30 s; see $log" >&2
fi
echo
echo "==> $skiff service ps demo"
"$skiff" service ps demo
echo

if [ -n "$published" ]; then
    echo "==> curl -s http://127.0.0.1:${published}/ | head -n 5   (the routing proxy, to either replica)"
    for _ in $(seq 1 50); do
        if curl -sf -m 2 "http://127.0.0.1:${published}/" >/dev/null; then break; fi
        sleep 0.2
    done
    curl -s -m 2 "http://127.0.0.1:${published}/" | head -n 5 || true
fi

echo
echo "Skiff dev is running (pid $dev_pid, API on $SKIFF_ADDR, output in $log). Try, in another shell:"
[ "$SKIFF_ADDR" = 127.0.0.1:7070 ] || echo "    export SKIFF_ADDR=$SKIFF_ADDR"
cat <<EOT
    $skiff service ps demo
    $skiff service scale demo 4
    $skiff service inspect demo          # traffic through the routing proxy, events
    curl http://127.0.0.1:${published:-<published port>}/
Press Ctrl-C to stop skiff dev and its replicas.
EOT

# Wait in the foreground; `wait` returns early when the trap fires.
while kill -0 "$dev_pid" 2>/dev/null; do
    wait "$dev_pid" || true
done
echo "skiff dev exited; last lines of $log:"
tail -n 20 "$log"
