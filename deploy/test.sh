#!/usr/bin/env bash
# The one command that checks Skiff on a fresh Debian machine (run as root, or with sudo for
# the package step): installs what is missing, then formatting, lints, the release build and
# the whole test suite, printing how long each phase took.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"

# cargo installed by rustup lives in ~/.cargo/bin, which non-login shells may not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME}/.cargo/env"
fi

declare -a timings=()
current_phase=""
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo >&2
        echo "==> FAILED in phase '${current_phase}' (exit ${rc})" >&2
        [ "${#timings[@]}" -eq 0 ] || printf '    %s\n' "${timings[@]}" >&2
    fi
}
trap on_exit EXIT

phase() {
    local name="$1"
    shift
    current_phase="$name"
    echo
    echo "==> ${name}: $*"
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    local took
    took=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }')
    timings+=("$(printf '%-10s %8ss' "$name" "$took")")
    echo "==> ${name} took ${took}s"
}

# --- system packages: only what is missing, apt-get update only if something is ---
install_missing() {
    local -a missing=()
    # command package: what the build and the end-to-end tests run.
    local -a needs=(
        "cc build-essential"
        "python3 python3"
        "curl curl"
        "runc runc"
        "crun crun"
        "tini-static tini"
        "iptables iptables"
        "ip iproute2"
        "skopeo skopeo"
        "zstd zstd"
        "busybox busybox-static"
        "haproxy haproxy"
        "readelf binutils"
        "dpkg-deb dpkg"
        "flock util-linux"
        "promtool prometheus"
        "chromium chromium"
        "chromedriver chromium-driver"
        "musl-gcc musl-tools"
        "file file"
    )
    local need cmd pkg
    for need in "${needs[@]}"; do
        read -r cmd pkg <<<"$need"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    # Not on PATH: the registry.
    [ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "all needed tools present"
        return
    fi
    echo "installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
}

check_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
        exit 1
    fi
    local component
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            if command -v rustup >/dev/null 2>&1; then
                rustup component add "$component"
            else
                echo "error: cargo ${component/rustfmt/fmt} not found and no rustup to add it" >&2
                exit 1
            fi
        fi
    done
    cargo --version
}

# The binary under test is the one a release ships: static (musl), built by
# deploy/release.sh. One release build instead of two (the glibc one cost
# ~6 minutes of a 25-minute run), and the end-to-end tests run what users get.
#
# The tests' debug build runs beside it: with one codegen unit per crate the
# release build keeps one core of two busy most of the time (measured: 310 s
# of CPU in 256 s), and the two builds use separate directories of target/
# (no lock between them). A failed test build is not this phase's failure:
# the test phase builds again and shows the errors.
run_build() {
    local test_build_log="${root}/target/test-build.log"
    mkdir -p "${root}/target"
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --no-run >"$test_build_log" 2>&1 &
    else
        cargo test --workspace --no-run >"$test_build_log" 2>&1 &
    fi
    local test_build=$!
    local rc=0
    bash deploy/release.sh --arch x86_64 --out "${root}/target/dist" || rc=$?
    if ! wait "$test_build"; then
        echo "note: the tests' debug build failed (the test phase builds again): ${test_build_log}" >&2
    fi
    return "$rc"
}

run_tests() {
    SKIFF_BIN="$(ls "${root}"/target/dist/skiff-*-x86_64-linux | head -n 1)"
    export SKIFF_BIN
    echo "SKIFF_BIN=${SKIFF_BIN}"
    # --run-ignored all: t06's checks of the static binary are ignored in a
    # plain `cargo test` (which has no static binary) and run here; the fuzz
    # seed writer (ignored too) rewrites the corpus and is run by hand.
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --no-fail-fast --run-ignored all \
            -E 'not test(=write_seed_corpus)'
    else
        cargo test --workspace --no-fail-fast -- --include-ignored --skip write_seed_corpus
    fi
}

total_start=$(date +%s)
phase packages install_missing
phase toolchain check_rust
phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --all-targets -- -D warnings
phase build run_build
phase test run_tests

echo
echo "==> all phases passed in $(($(date +%s) - total_start))s"
printf '    %s\n' "${timings[@]}"
