#!/usr/bin/env bash
# Builds Skiff's release: a static, stripped `skiff` binary for each Linux
# architecture (musl libc, so it runs on any distribution, glibc or not) and,
# beside each, a tarball with what `deploy/install.sh` installs; then
# SHA256SUMS over all of them.
#
#   deploy/release.sh [--arch x86_64|aarch64|all] [--out DIR] [--require-all]
#
# Writes into DIR (default dist/):
#   skiff-VERSION-ARCH-linux           the binary
#   skiff-VERSION-ARCH-linux.tar.gz    skiff-VERSION-ARCH-linux/{skiff, install.sh,
#                                      server.toml, agent.toml, systemd/*.service}
#   SHA256SUMS                         `sha256sum -c SHA256SUMS` checks them
#
# x86_64 needs the Rust target x86_64-unknown-linux-musl and musl-gcc (the
# `ring` crate has C and assembly); aarch64 needs the Rust target
# aarch64-unknown-linux-musl and a cross C compiler and linker,
# aarch64-linux-gnu-gcc (Debian's gcc-aarch64-linux-gnu; ring uses no libc
# headers that differ between glibc and musl, and Rust links its own musl).
# Both are installed when missing and possible (rustup, apt-get as root).
# An architecture whose toolchain cannot be installed is skipped with the
# reason, unless --require-all, which fails instead. With --arch all (the
# default) aarch64 is cross-built where the toolchain installs.
#
# Cargo: CARGO_TARGET_DIR is honoured; CARGO_BUILD_JOBS sets -j; SKIFF_COMMIT
# stamps `skiff --version` when building outside a git checkout.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
if ! command -v cargo >/dev/null 2>&1 && [ -f "${HOME}/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "${HOME}/.cargo/env"
fi

usage() { echo "usage: $0 [--arch x86_64|aarch64|all] [--out DIR] [--require-all]" >&2; exit 2; }
arches=(x86_64 aarch64)
out="$root/dist"
require_all=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch)
            [ $# -ge 2 ] || usage
            case "$2" in
                all) arches=(x86_64 aarch64) ;;
                x86_64 | aarch64) arches=("$2") ;;
                *) usage ;;
            esac
            shift 2
            ;;
        --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
        --require-all) require_all=1; shift ;;
        *) usage ;;
    esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || { echo "release.sh: no version in Cargo.toml" >&2; exit 1; }

# apt_install PKG...: installs Debian packages when root (or sudo) can.
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
        sudo="sudo -n"
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@" >&2 ||
        { $sudo apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@" >&2; }
}

# rust_target TRIPLE: the Rust standard library for TRIPLE, added with rustup if missing.
rust_target() {
    local triple="$1"
    if rustc --print sysroot >/dev/null 2>&1 &&
        [ -d "$(rustc --print sysroot)/lib/rustlib/$triple" ]; then
        return 0
    fi
    command -v rustup >/dev/null 2>&1 || fail "no Rust standard library for $triple and no rustup to add it" || return 1
    rustup target add "$triple" >&2 || fail "rustup target add $triple failed (no network?)" || return 1
}

# c_compiler CMD PKG: CMD on PATH, from PKG if missing.
c_compiler() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "==> installing $2 (for $1)" >&2
    apt_install "$2" && command -v "$1" >/dev/null 2>&1 && return 0
    fail "$1 not found and could not install Debian's $2 (needs root and apt-get)"
}

# fail REASON: says why the architecture being built is not, and fails.
fail() {
    echo "release.sh: ${arch:-?} NOT built: $1" >&2
    return 1
}

# build ARCH: builds dist/skiff-VERSION-ARCH-linux; fails saying why when it cannot.
build() {
    arch="$1"
    local triple env_triple cc
    triple="$arch-unknown-linux-musl"
    env_triple="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
    case "$arch" in
        x86_64) cc=musl-gcc; c_compiler musl-gcc musl-tools || return 1 ;;
        aarch64)
            cc=aarch64-linux-gnu-gcc
            c_compiler aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu || return 1
            export "CARGO_TARGET_${env_triple}_LINKER=$cc"
            ;;
    esac
    rust_target "$triple" || return 1
    export "CC_${triple//-/_}=$cc"
    # Static (musl's default, said explicitly) and stripped. Target-scoped, so
    # the build scripts and proc macros compiled for the host are the ones a
    # plain `cargo build --release` already built (same flags, same profile).
    export "CARGO_TARGET_${env_triple}_RUSTFLAGS=-C target-feature=+crt-static -C strip=symbols"
    local jobs=()
    [ -z "${CARGO_BUILD_JOBS:-}" ] || jobs=(-j "$CARGO_BUILD_JOBS")
    echo "==> cargo build --release -p skiff --target $triple ${jobs[*]}" >&2
    local start=$SECONDS
    if ! cargo build --release -p skiff --locked --target "$triple" "${jobs[@]}" >&2; then
        fail "cargo build --target $triple failed (see above)"
        return 1
    fi
    echo "==> built $triple in $((SECONDS - start))s" >&2
    local bin="$target_dir/$triple/release/skiff" name="skiff-$version-$arch-linux"
    if command -v file >/dev/null 2>&1; then
        local what
        what="$(file -b "$bin")"
        case "$what" in
            *"statically linked"* | *"static-pie linked"*) ;;
            *) fail "$bin is not static: $what"; return 1 ;;
        esac
        case "$what" in
            *"not stripped"*) fail "$bin is not stripped: $what"; return 1 ;;
        esac
    fi
    install -m 0755 "$bin" "$out/$name"
    # The tarball: the binary and what install.sh installs beside it.
    local stage
    stage="$(mktemp -d "${TMPDIR:-/tmp}/skiff-release.XXXXXX")"
    mkdir -p "$stage/$name/systemd"
    install -m 0755 "$bin" "$stage/$name/skiff"
    install -m 0755 deploy/install.sh "$stage/$name/install.sh"
    install -m 0644 deploy/server.toml deploy/agent.toml "$stage/$name/"
    install -m 0644 deploy/systemd/*.service "$stage/$name/systemd/"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -czf "$out/$name.tar.gz" "$name"
    rm -rf "$stage"
    echo "==> $out/$name: $(stat -c %s "$out/$name") bytes${what:+, $what}" >&2
}

built=()
skipped=()
for arch in "${arches[@]}"; do
    # A subshell: each architecture's compiler settings stay its own.
    if (build "$arch"); then
        built+=("$arch")
    else
        skipped+=("$arch")
    fi
done

# Checksums of every artifact in the output dir for this version.
(cd "$out" && rm -f SHA256SUMS &&
    find . -maxdepth 1 -type f -name "skiff-$version-*-linux*" -printf '%f\n' | sort |
    xargs -r sha256sum >SHA256SUMS)

echo
echo "release $version in $out:"
(cd "$out" && cat SHA256SUMS)
if [ "${#skipped[@]}" -gt 0 ]; then
    echo "NOT built: ${skipped[*]} (the reason is printed above: "NOT built: ...")"
    if [ "$require_all" -eq 1 ] || [ "${#built[@]}" -eq 0 ]; then
        exit 1
    fi
fi
