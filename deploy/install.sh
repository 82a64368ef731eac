#!/usr/bin/env bash
# Installs a skiff binary with its systemd units and example configs; safe to
# run again (an upgrade replaces the binary and the units, never a config the
# operator edited).
#
#   install.sh [--prefix DIR] [--destdir DIR] [BINARY]
#
#   BINARY          the skiff binary (default: ./skiff beside this script, as
#                   in a release tarball)
#   --prefix DIR    where bin/skiff goes (default /usr/local); the units'
#                   ExecStart names DIR/bin/skiff
#   --destdir DIR   stage everything under DIR instead of / (also $DESTDIR),
#                   as packagers and tests do; systemd is not told then
#
# Installs PREFIX/bin/skiff, /etc/systemd/system/skiff-{server,agent}.service,
# and /etc/skiff/{server,agent}.toml (an existing config that differs is kept
# and the new example is written beside it as *.toml.new). The example
# configs and units are taken from beside this script (server.toml,
# agent.toml, systemd/), the layout of both the release tarball and deploy/.
# Nothing is enabled or started: the script prints the next steps.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { echo "usage: $0 [--prefix DIR] [--destdir DIR] [BINARY]" >&2; exit 2; }

prefix=/usr/local
destdir="${DESTDIR:-}"
binary=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --destdir) [ $# -ge 2 ] || usage; destdir="$2"; shift 2 ;;
        --destdir=*) destdir="${1#*=}"; shift ;;
        -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) usage ;;
        *) [ -z "$binary" ] || usage; binary="$1"; shift ;;
    esac
done
binary="${binary:-$here/skiff}"
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute: $prefix" >&2; exit 2 ;; esac
prefix="${prefix%/}"
destdir="${destdir%/}"

[ -f "$binary" ] || { echo "install.sh: no binary at $binary (give its path)" >&2; exit 1; }
version="$("$binary" --version 2>/dev/null)" || {
    echo "install.sh: $binary does not run here (--version failed): wrong architecture?" >&2
    exit 1
}
for f in server.toml agent.toml systemd/skiff-server.service systemd/skiff-agent.service; do
    [ -f "$here/$f" ] || { echo "install.sh: $here/$f missing" >&2; exit 1; }
done

bin_dir="$destdir$prefix/bin"
etc_dir="$destdir/etc/skiff"
unit_dir="$destdir/etc/systemd/system"
mkdir -p "$bin_dir" "$etc_dir" "$unit_dir"

# put SRC DEST MODE: DEST becomes SRC's content (written beside, then renamed,
# so a running binary or a reader never sees half a file); says what changed.
put() {
    local src="$1" dest="$2" mode="$3"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        chmod "$mode" "$dest"
        echo "unchanged  $dest"
        return
    fi
    local state=installed
    [ ! -e "$dest" ] || state=updated
    install -m "$mode" "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    echo "$state  $dest"
}

put "$binary" "$bin_dir/skiff" 0755

# Units name the installed binary (the prefix, never the staging dir).
tmp="$(mktemp -d "${TMPDIR:-/tmp}/skiff-install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for unit in skiff-server.service skiff-agent.service; do
    sed "s!/usr/local/bin/skiff!$prefix/bin/skiff!g" "$here/systemd/$unit" >"$tmp/$unit"
    put "$tmp/$unit" "$unit_dir/$unit" 0644
done

# Configs: the operator's own edits win over a newer example.
for config in server.toml agent.toml; do
    dest="$etc_dir/$config"
    if [ -f "$dest" ] && ! cmp -s "$here/$config" "$dest"; then
        put "$here/$config" "$dest.new" 0644
        echo "kept       $dest (yours differs; the new example is $dest.new)"
    else
        put "$here/$config" "$dest" 0644
    fi
done

if [ -z "$destdir" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "systemd    reloaded"
fi

cat <<EOT

$version installed as $prefix/bin/skiff. Next:
  1. edit /etc/skiff/server.toml (name, listen, bootstrap or join) on each server
     and /etc/skiff/agent.toml (name, servers, advertise) on each node;
  2. a joining server or a new agent needs its join token once: put
     SKIFF_JOIN_TOKEN=... (from \`skiff cluster token server|agent\`) in
     /etc/skiff/server.env or /etc/skiff/agent.env (mode 0600);
  3. systemctl enable --now skiff-server   (servers)
     systemctl enable --now skiff-agent    (nodes)
EOT
