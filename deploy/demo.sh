#!/usr/bin/env bash
# Builds Skiff, starts `skiff dev` (one server + one agent, data in ./.skiff), runs a demo
# service `demo` of two replicas that answer with their own identity (replica id, node,
# version), published through the routing proxy, then rolls it out to its other version
# under a small load and prints how many requests failed. Keeps dev running in the
# foreground; Ctrl-C stops dev, its replicas and the demo's registry; the service stays in
# ./.skiff for the next run (which rolls it back to the other version).
#
# Two ways to run the replicas:
#   oci      (default where it can: root, runc or crun, docker-registry, skopeo,
#            busybox-static) a real container image, skiff-test/hello:v1 and :v2, built
#            by deploy/images/build.sh into a local registry the demo starts on
#            127.0.0.1:$DEMO_REGISTRY_PORT and stops on exit.
#   process  (machines without a container runtime) host processes (`--runtime process`):
#            a few lines of python3 answering the same identity; the update changes its
#            DEMO_VERSION variable.
#
# Environment: SKIFF_ADDR (API address, default 127.0.0.1:7070), DEMO_PORT (published port,
# default 8080), DEMO_DATA_DIR (default ./.skiff), SKIFF_BIN (a built skiff binary: no build),
# DEMO_DEV_FLAGS (more flags for `skiff dev`, e.g. "--port-range 21000-21039"), DEMO_RUNTIME
# (oci or process; default: oci where it can), DEMO_REGISTRY_PORT (default 5000).
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
registry_port="${DEMO_REGISTRY_PORT:-5000}"
# `skiff dev` writes the API address and its admin token there; the CLI calls below use it.
export SKIFF_CLIENT_CONFIG="${SKIFF_CLIENT_CONFIG:-${data_dir}/client.toml}"

# --- which runtime ------------------------------------------------------------------------
oci_missing() {
    local missing=()
    [ "$(id -u)" -eq 0 ] || missing+=("root")
    command -v runc >/dev/null 2>&1 || command -v crun >/dev/null 2>&1 ||
        [ -x /usr/sbin/runc ] || missing+=("runc")
    local tool
    for tool in docker-registry skopeo busybox; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    echo "${missing[*]}"
}
runtime="${DEMO_RUNTIME:-}"
missing="$(oci_missing)"
case "$runtime" in
    "")
        runtime=oci
        if [ -n "$missing" ]; then
            runtime=process
            echo "==> no container runtime here (missing: $missing; apt-get install runc" \
                "docker-registry skopeo busybox-static, as root): the replicas run as host" \
                "processes (--runtime process)"
        fi
        ;;
    oci)
        if [ -n "$missing" ]; then
            echo "error: DEMO_RUNTIME=oci needs root, runc (or crun), docker-registry, skopeo and" \
                "busybox-static; missing: $missing" >&2
            exit 1
        fi
        ;;
    process) ;;
    *) echo "error: DEMO_RUNTIME is oci or process, not $runtime" >&2; exit 1 ;;
esac

if [ -z "${SKIFF_BIN:-}" ]; then
    echo "==> building (cargo build --release)"
    cargo build --release
fi

if "$skiff" node ls >/dev/null 2>&1; then
    echo "error: a skiff server already answers on ${SKIFF_ADDR}; stop it (or set SKIFF_ADDR)" >&2
    exit 1
fi

mkdir -p "$data_dir"
dev_pid=""
registry_pid=""
registry_dir=""
load_dir=""
stopping=0
# Stops dev with SIGTERM (it stops its replicas: SIGTERM, SIGKILL after 5 s), then the
# registry this script started, then exits. Only this script's own PIDs are signalled.
stop() {
    local rc="${1:-0}"
    [ "$stopping" -eq 0 ] || return 0
    stopping=1
    trap - INT TERM
    echo
    if [ -n "$dev_pid" ] && kill -0 "$dev_pid" 2>/dev/null; then
        echo "==> stopping skiff dev (pid $dev_pid) and its replicas"
        kill -TERM "$dev_pid" 2>/dev/null || true
        local _
        for _ in $(seq 1 100); do
            kill -0 "$dev_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$dev_pid" 2>/dev/null || true
    fi
    [ -z "$dev_pid" ] || wait "$dev_pid" 2>/dev/null || true
    if [ -n "$registry_pid" ]; then
        echo "==> stopping the demo's registry (pid $registry_pid)"
        deploy/images/registry.sh stop "$registry_pid" "$registry_dir" || true
    fi
    [ -z "$load_dir" ] || rm -rf "$load_dir"
    exit "$rc"
}
# A background job of a script ignores SIGINT, so Ctrl-C reaches dev through this trap.
trap stop INT TERM
# If a step below fails, do not leave dev or the registry running behind the user's back.
on_exit() {
    local rc=$?
    if [ "$stopping" -eq 0 ]; then
        [ "$rc" -eq 0 ] || echo "error: demo failed (exit $rc); stopping what it started" >&2
        stop "$rc"
    fi
}
trap on_exit EXIT

# --- the image, in a registry of its own --------------------------------------------------
if [ "$runtime" = oci ]; then
    echo "==> starting a registry on 127.0.0.1:$registry_port and building skiff-test/hello:v1, :v2 (deploy/images/)"
    registry_env="$(deploy/images/registry.sh start --port "$registry_port" --watch $$)" || {
        echo "error: no registry on 127.0.0.1:$registry_port (taken? set DEMO_REGISTRY_PORT)" >&2
        exit 1
    }
    registry_pid="$(sed -n 's/^REGISTRY_PID=//p' <<<"$registry_env")"
    registry_dir="$(sed -n 's/^REGISTRY_DIR=//p' <<<"$registry_env")"
    registry_addr="$(sed -n 's/^REGISTRY_ADDR=//p' <<<"$registry_env")"
    images_out="$registry_dir/images"
    SKIFF_IMAGES_ONLY=hello deploy/images/build.sh "$registry_addr" "$images_out" >/dev/null
    image_base="$registry_addr/skiff-test/hello"
fi

# The CLI verifies the server against the CA `skiff dev` creates there.
export SKIFF_CA_CERT="$data_dir/server/pki/ca.crt"
# shellcheck disable=SC2206 # the extra flags are words, split on purpose.
dev_flags=(${DEMO_DEV_FLAGS:-})
[ "$runtime" != oci ] || dev_flags+=(--insecure-registry "$registry_addr")
echo "==> starting: $skiff dev --data-dir $data_dir --listen $SKIFF_ADDR ${dev_flags[*]}  (output in $log)"
"$skiff" dev --data-dir "$data_dir" --listen "$SKIFF_ADDR" "${dev_flags[@]}" >>"$log" 2>&1 &
dev_pid=$!

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
    exit 1
fi

# --- the service ------------------------------------------------------------------------
# The process runtime's replica (a file in the data dir, so `service ps` shows a short
# command): answers GET / with who it is, and nothing else.
identity_server='import http.server, os
class Identity(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/":
            self.send_error(404)
            return
        e = os.environ
        body = ("hello from replica %s of %s on node %s, version %s\n" % (
            e.get("SKIFF_ALLOC_ID", "unknown")[:8], e.get("SKIFF_SERVICE", "?"),
            e.get("SKIFF_NODE", "?"), e.get("DEMO_VERSION", "?"))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Identity).serve_forever()'

identity_script="$(cd "$data_dir" && pwd)/demo-identity.py"
[ "$runtime" != process ] || printf '%s\n' "$identity_server" >"$identity_script"

# The version the existing service runs ("" if it is not this demo's, e.g. an older demo's
# directory server, or a service of the other runtime).
current_version() {
    "$skiff" service inspect demo --output json 2>/dev/null | python3 -c 'import json, sys
s = json.load(sys.stdin)["spec"]
runtime, image = sys.argv[1], s.get("image") or ""
if runtime == "oci" and image.startswith(sys.argv[2] + ":"):
    print(image.rsplit(":", 1)[1])
elif runtime == "process" and "DEMO_VERSION" in (s.get("env") or {}):
    print(s["env"]["DEMO_VERSION"])' "$runtime" "${image_base:-}" 2>/dev/null || true
}

create() {
    local what=(--runtime "$runtime")
    if [ "$runtime" = oci ]; then
        what+=(--image "$image_base:v1")
        echo "==> $skiff service create demo --image $image_base:v1 --replicas 2 --publish $publish --protocol http --health-http / --health-interval 1s"
    else
        what+=(--env DEMO_VERSION=v1 -- python3 "$identity_script")
        echo "==> $skiff service create demo --runtime process --env DEMO_VERSION=v1 --replicas 2 --publish $publish --protocol http --health-http / --health-interval 1s -- python3 $identity_script"
    fi
    "$skiff" service create demo --replicas 2 --publish "$publish" --protocol http \
        --health-http / --health-interval 1s "${what[@]}"
}

version=""
if "$skiff" service inspect demo >/dev/null 2>&1; then
    version="$(current_version)"
    if [ -n "$version" ]; then
        echo "==> service demo exists already (kept in $data_dir from an earlier run), at $version"
    else
        echo "==> service demo exists already but is not this demo's $runtime service: replacing it"
        "$skiff" service rm demo
        for _ in $(seq 1 100); do
            "$skiff" service inspect demo >/dev/null 2>&1 || break
            sleep 0.2
        done
    fi
fi
if [ -z "$version" ]; then
    create
    version=v1
fi

echo "==> waiting for 2 healthy replicas"
healthy=0
for _ in $(seq 1 300); do
    healthy="$("$skiff" service ps demo --output json 2>/dev/null |
        python3 -c 'import json, sys
print(sum(1 for a in json.load(sys.stdin) if a["state"] == "healthy"))' || echo 0)"
    [ "$healthy" -lt 2 ] || break
    sleep 0.2
done
if [ "$healthy" -lt 2 ]; then
    echo "warning: the replicas did not all become healthy within 60 s; see $log" >&2
fi
echo
echo "==> $skiff service ps demo"
"$skiff" service ps demo
echo

url="http://127.0.0.1:${publish}/"
for _ in $(seq 1 50); do
    if curl -sf -m 2 "$url" >/dev/null; then break; fi
    sleep 0.2
done
echo "==> curl -s $url   (4 times: the routing proxy spreads them over the replicas)"
for _ in 1 2 3 4; do
    curl -s -m 2 "$url" || echo "(no answer)"
done
echo "==> curl -s -o /dev/null -w '%{http_code}' ${url}state.json   (only / answers: no replica's files are served)"
curl -s -m 2 -o /dev/null -w '%{http_code}\n' "${url}state.json" || echo "(no answer)"

# --- a rolling update under load --------------------------------------------------------
# load WORKER: GETs $url until $load_dir/stop exists (at most 2400 requests or 120 s),
# one line per request in $load_dir/WORKER: the HTTP status (000: no answer) and the
# version that answered.
load() {
    local out="$load_dir/$1" deadline=$((SECONDS + 120)) answer code _
    for _ in $(seq 1 2400); do
        [ ! -e "$load_dir/stop" ] && [ "$SECONDS" -lt "$deadline" ] || break
        answer="$(curl -s -m 3 -w '\n%{http_code}' "$url" 2>/dev/null || true)"
        code="$(tail -n 1 <<<"$answer")"
        printf '%s %s\n' "${code:-000}" "$(grep -o 'version v[0-9]*' <<<"$answer" | cut -d' ' -f2)" >>"$out"
        sleep 0.05
    done
}
case "$version" in v1) next=v2 ;; *) next=v1 ;; esac
load_dir="$(mktemp -d "${TMPDIR:-/tmp}/skiff-demo-load.XXXXXX")"
load 1 &
load_a=$!
load 2 &
load_b=$!
sleep 1
if [ "$runtime" = oci ]; then
    echo "==> $skiff service update demo --image $image_base:$next   (under load: 2 clients, curl in a loop)"
    update=(--image "$image_base:$next")
else
    echo "==> $skiff service update demo --env DEMO_VERSION=$next   (under load: 2 clients, curl in a loop)"
    update=(--env "DEMO_VERSION=$next")
fi
update_rc=0
"$skiff" service update demo "${update[@]}" || update_rc=$?
sleep 1
touch "$load_dir/stop"
wait "$load_a" "$load_b" || true
read -r total failed by_version < <(cat "$load_dir"/1 "$load_dir"/2 2>/dev/null | python3 -c 'import sys
lines = [l.split() for l in sys.stdin if l.strip()]
failed = sum(1 for l in lines if l[0] != "200")
versions = {}
for l in lines:
    if l[0] == "200" and len(l) > 1:
        versions[l[1]] = versions.get(l[1], 0) + 1
print(len(lines), failed, ",".join("%s:%d" % kv for kv in sorted(versions.items())) or "-")')
echo "==> rolling update $version -> $next under load: $total requests, $failed failed (answers by version: ${by_version//,/, })"
if [ "$update_rc" -ne 0 ]; then
    echo "warning: service update exited with $update_rc; see $skiff service history demo" >&2
fi
if [ "$failed" -ne 0 ]; then
    echo "warning: $failed requests failed during the rollout" >&2
fi
echo "==> curl -s $url"
curl -s -m 2 "$url" || echo "(no answer)"

echo
echo "Skiff dev is running (pid $dev_pid, API on $SKIFF_ADDR, output in $log). Try, in another shell:"
[ "$SKIFF_ADDR" = 127.0.0.1:7070 ] || echo "    export SKIFF_ADDR=$SKIFF_ADDR"
cat <<EOT
    export SKIFF_CLIENT_CONFIG=$SKIFF_CLIENT_CONFIG SKIFF_CA_CERT=$SKIFF_CA_CERT
    $skiff service ps demo
    $skiff service scale demo 4
    $skiff service history demo          # its versions and how each rollout ended
    curl $url
Press Ctrl-C to stop skiff dev and its replicas.
EOT

# Wait in the foreground; `wait` returns early when the trap fires.
while kill -0 "$dev_pid" 2>/dev/null; do
    wait "$dev_pid" || true
done
echo "skiff dev exited; last lines of $log:"
tail -n 20 "$log"
