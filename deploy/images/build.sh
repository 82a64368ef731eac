#!/usr/bin/env bash
# Builds Skiff's small test images from busybox-static, without any Docker
# engine: each layer is a reproducible tar (sorted, owner 0, mtime 0), the
# OCI layout (blobs, config, manifest, index.json) is written by hand, and
# skopeo pushes it to the registry given (see registry.sh).
#
#   build.sh REGISTRY_ADDR [OUT_DIR]
#
# Pushes, under REGISTRY_ADDR/skiff-test/:
#   web:v1, web:v2        busybox httpd serving "v1"/"v2" on $PORT (default 80);
#                         v2 also has a passing HTTP Healthcheck
#   web-user:v1           same page as v1, User "www" (1000:1000, also in group
#                         staff=50), default port 8080
#   unhealthy:v1          serves, but its Healthcheck (/bin/false) always fails
#   layers:v1             4 layers: a whiteout, an opaque dir, a hardlink, an
#                         absolute symlink, a zstd and an uncompressed layer;
#                         StopSignal SIGINT, Entrypoint + Cmd
#   many:v1               25 layers (overlay lowerdir limits)
#   tamper:v1             base + one layer of its own (for digest-mismatch tests)
#   multiarch:v1          an image index: linux/amd64 (= web:v1) and linux/arm64
#   web-docker:v1         web:v1 as a Docker schema 2 manifest
#   web:v3                like web:v2 (same passing Healthcheck), serving "v3"
#   hello:v1, hello:v2    the demo's image (deploy/demo.sh): `/` answers, from a
#                         CGI, who answered: "hello from replica <id8> of
#                         <service> on node <node>, version v1|v2" (from
#                         SKIFF_ALLOC_ID, SKIFF_SERVICE, SKIFF_NODE); any other
#                         path is a 404 ($PORT as web:v1). SKIFF_IMAGES_ONLY=
#                         hello builds only these two (and the base layer).
#   web-500:v1            healthy but failing: `/` answers HTTP 500 on every
#                         request (a CGI index), its Healthcheck GETs
#                         /health.html (200); $PORT as web:v1
#   postgres:v1           a real PostgreSQL 15 from Debian's packages, with the
#                         official image's conventions (PGDATA, POSTGRES_PASSWORD
#                         [_FILE], POSTGRES_USER, POSTGRES_DB, POSTGRES_HOST_AUTH_
#                         METHOD, /docker-entrypoint-initdb.d; postgres/docker-
#                         entrypoint.sh): initdb on an empty PGDATA, *:5432,
#                         scram-sha-256 for host connections, runs as postgres
#                         (999:999); Volume /var/lib/postgresql/data (owned by
#                         999), StopSignal SIGINT, Healthcheck pg_isready; psql,
#                         pg_dump and friends on PATH
#   redis:v1              a real Redis 7 from Debian's packages: redis-server on
#                         *:6379 with --protected-mode no, as redis (998:998),
#                         data in /data (a Volume, owned by 998), Healthcheck
#                         `redis-cli ping`; redis-cli
# All share the same base layer (busybox, /etc/passwd, /etc/group); postgres
# and redis add one layer each (see the section at the end: .debs fetched with
# apt-get download, cached in ${SKIFF_IMAGE_CACHE:-/var/cache/skiff-images}).
# Writes OUT_DIR/images.env: `skiff-test/NAME:TAG=sha256:<manifest digest>`
# lines, and `tamper-layer=sha256:<digest of tamper's own layer>`.
#
# Needs: busybox (busybox-static), skopeo, tar, gzip, zstd, sha256sum; for
# postgres and redis also apt-get, dpkg-deb, readelf (binutils) and flock.
# SKIFF_IMAGES_DB=0 builds neither postgres nor redis.
set -euo pipefail

ADDR="${1:?usage: build.sh REGISTRY_ADDR [OUT_DIR]}"
OUT="${2:-$(mktemp -d "${TMPDIR:-/tmp}/skiff-images.XXXXXX")}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/skiff-images-work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

for tool in busybox skopeo tar gzip zstd sha256sum; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not installed (apt-get install busybox-static skopeo zstd)" >&2; exit 1; }
done
# busybox-static installs a statically linked /bin/busybox, which runs in
# an image with no libc.
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX="$(command -v busybox)"

BLOBS="$WORK/blobs"
mkdir -p "$BLOBS"
: >"$OUT/images.env"

sha() { sha256sum "$1" | cut -d' ' -f1; }

# Layers used by digest ("@sha256:..." in image's layer list): descriptor, diff id.
declare -A LAYER_DESC=() LAYER_DIFF=()
# Paths that make_layer writes with an owner of their own: "UID:GID:PATH"
# (relative to the layer's dir; a dir's entry only, not its content).
LAYER_OWNED=()

# make_layer SRC_DIR COMPRESSION(gzip|zstd|none) -> sets L_DESC (descriptor JSON), L_DIFF
make_layer() {
  local src="$1" comp="$2" tarfile="$WORK/layer.tar" blob media own excl=()
  for own in ${LAYER_OWNED[@]+"${LAYER_OWNED[@]}"}; do excl+=("--exclude=./${own#*:*:}"); done
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu \
    --anchored ${excl[@]+"${excl[@]}"} -C "$src" -cf "$tarfile" .
  for own in ${LAYER_OWNED[@]+"${LAYER_OWNED[@]}"}; do
    tar --owner="u:${own%%:*}" --group="g:$(echo "$own" | cut -d: -f2)" --numeric-owner --mtime=@0 \
      --format=gnu --no-recursion -C "$src" -rf "$tarfile" "./${own#*:*:}"
  done
  L_DIFF="sha256:$(sha "$tarfile")"
  case "$comp" in
    gzip) gzip -n -c "$tarfile" >"$WORK/layer.blob"; media="application/vnd.oci.image.layer.v1.tar+gzip" ;;
    zstd) zstd -q -c "$tarfile" >"$WORK/layer.blob"; media="application/vnd.oci.image.layer.v1.tar+zstd" ;;
    none) cp "$tarfile" "$WORK/layer.blob"; media="application/vnd.oci.image.layer.v1.tar" ;;
    *) echo "bad compression $comp" >&2; exit 1 ;;
  esac
  blob="$(sha "$WORK/layer.blob")"
  mv "$WORK/layer.blob" "$BLOBS/$blob"
  L_DESC="{\"mediaType\":\"$media\",\"digest\":\"sha256:$blob\",\"size\":$(stat -c %s "$BLOBS/$blob")}"
  L_DIGEST="sha256:$blob"
}

# put_blob FILE MEDIA -> sets B_DESC
put_blob() {
  local d
  d="$(sha "$1")"
  cp "$1" "$BLOBS/$d"
  B_DESC="{\"mediaType\":\"$2\",\"digest\":\"sha256:$d\",\"size\":$(stat -c %s "$1")}"
}

# image NAME TAG ARCH CONFIG_BODY LAYER... (each LAYER "dir:compression")
# writes the OCI layout $WORK/oci/NAME with ref TAG; sets M_DESC.
image() {
  local name="$1" tag="$2" arch="$3" body="$4"; shift 4
  local descs="" diffs="" spec
  for spec in "$@"; do
    case "$spec" in
      @*) L_DESC="${LAYER_DESC[${spec#@}]}"; L_DIFF="${LAYER_DIFF[${spec#@}]}" ;;
      *) make_layer "${spec%:*}" "${spec##*:}" ;;
    esac
    descs="${descs:+$descs,}$L_DESC"
    diffs="${diffs:+$diffs,}\"$L_DIFF\""
  done
  printf '{"architecture":"%s","os":"linux","config":{%s},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$arch" "$body" "$diffs" >"$WORK/config.json"
  put_blob "$WORK/config.json" application/vnd.oci.image.config.v1+json
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
    "$B_DESC" "$descs" >"$WORK/manifest.json"
  put_blob "$WORK/manifest.json" application/vnd.oci.image.manifest.v1+json
  M_DESC="$B_DESC"
  layout "$name" "$tag" "$M_DESC"
}

# layout NAME TAG DESCRIPTOR: an OCI layout dir holding every blob so far.
layout() {
  local dir="$WORK/oci/$1"
  mkdir -p "$dir/blobs"
  rm -rf "$dir/blobs/sha256"
  cp -r "$BLOBS" "$dir/blobs/sha256"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  local desc="${3%\}},\"annotations\":{\"org.opencontainers.image.ref.name\":\"$2\"}}"
  printf '{"schemaVersion":2,"manifests":[%s]}' "$desc" >"$dir/index.json"
}

# push NAME TAG [skopeo flags...]: pushes the layout NAME as skiff-test/NAME:TAG.
push() {
  local src="$1" tag="$2" dest="$3"; shift 3
  skopeo copy --quiet --insecure-policy --dest-tls-verify=false \
    --digestfile "$WORK/digest" "$@" "oci:$WORK/oci/$src:$tag" "docker://$ADDR/skiff-test/$dest:$tag" >&2
  echo "skiff-test/$dest:$tag=$(cat "$WORK/digest")" >>"$OUT/images.env"
}

# --- base layer: busybox, its applets as absolute symlinks, users ----------
BASE="$WORK/src/base"
mkdir -p "$BASE"/{bin,etc,tmp,root,proc,sys,dev,www,usr/local/bin}
chmod 1777 "$BASE/tmp"
cp "$BUSYBOX" "$BASE/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf /bin/busybox "$BASE/bin/$applet"
done
cat >"$BASE/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
www:x:1000:1000:www:/www:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$BASE/etc/group" <<'EOF'
root:x:0:
staff:x:50:www
www:x:1000:
nogroup:x:65534:
EOF
cat >"$BASE/usr/local/bin/serve" <<'EOF'
#!/bin/sh
# Serves /www on $PORT (default $DEFAULT_PORT, else 80), in the foreground.
exec /bin/busybox httpd -f -p "${PORT:-${DEFAULT_PORT:-80}}" -h /www "$@"
EOF
chmod 755 "$BASE/usr/local/bin/serve"

page_layer() { # DIR TEXT
  mkdir -p "$1/www"
  echo "$2" >"$1/www/index.html"
}

WEB_ENV='"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":["/usr/local/bin/serve"],"ExposedPorts":{"80/tcp":{}},"WorkingDir":"/www"'

# --- hello:v1, hello:v2: replicas that say who they are ---------------------
# With no /www/index.html, busybox httpd runs /www/cgi-bin/index.cgi for `/`
# (its environment is the container's: the agent's SKIFF_* variables); any
# other path is a 404, so nothing of the image or the node is listed.
hello_layer() { # DIR VERSION
  mkdir -p "$1/www/cgi-bin"
  cat >"$1/www/cgi-bin/index.cgi" <<EOF
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
id="\$(echo "\${SKIFF_ALLOC_ID:-unknown}" | cut -c1-8)"
echo "hello from replica \$id of \${SKIFF_SERVICE:-?} on node \${SKIFF_NODE:-?}, version $2"
EOF
  chmod 755 "$1/www/cgi-bin/index.cgi"
}
for v in v1 v2; do
  hello_layer "$WORK/src/hello-$v" "$v"
  image hello "$v" amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"hello\",\"version\":\"$v\"}" \
    "$BASE:gzip" "$WORK/src/hello-$v:gzip"
  push hello "$v" hello
done
if [ "${SKIFF_IMAGES_ONLY:-}" = hello ]; then
  echo "OUT_DIR=$OUT"
  exit 0
fi

page_layer "$WORK/src/web-v1" "skiff-test web v1"
image web v1 amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"web\",\"version\":\"v1\"}" \
  "$BASE:gzip" "$WORK/src/web-v1:gzip"
WEB_V1_DESC="$M_DESC"
push web v1 web

page_layer "$WORK/src/web-v2" "skiff-test web v2"
image web v2 amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"web\",\"version\":\"v2\"},\"Healthcheck\":{\"Test\":[\"CMD-SHELL\",\"wget -q -O /dev/null http://127.0.0.1:\${PORT:-80}/ || exit 1\"],\"Interval\":1000000000,\"Timeout\":1000000000,\"Retries\":3}" \
  "$BASE:gzip" "$WORK/src/web-v2:gzip"
push web v2 web

image web-user v1 amd64 '"User":"www","Env":["PATH=/usr/local/bin:/usr/bin:/bin","DEFAULT_PORT=8080"],"Entrypoint":["/usr/local/bin/serve"],"ExposedPorts":{"8080/tcp":{}},"WorkingDir":"/www"' \
  "$BASE:gzip" "$WORK/src/web-v1:gzip"
push web-user v1 web-user

page_layer "$WORK/src/unhealthy" "skiff-test unhealthy v1"
image unhealthy v1 amd64 "$WEB_ENV,\"Healthcheck\":{\"Test\":[\"CMD\",\"/bin/false\"],\"Interval\":1000000000,\"Timeout\":1000000000,\"StartPeriod\":0,\"Retries\":2}" \
  "$BASE:gzip" "$WORK/src/unhealthy:gzip"
push unhealthy v1 unhealthy

# --- layers:v1 -------------------------------------------------------------
L2="$WORK/src/layers-2"; L3="$WORK/src/layers-3"; L4="$WORK/src/layers-4"
mkdir -p "$L2"/{data,opq,keep} "$L3"/{data,opq} "$L4/etc"
echo a >"$L2/data/a"; echo b >"$L2/data/b"; ln "$L2/data/b" "$L2/data/b-hardlink"
echo x >"$L2/opq/x"; echo y >"$L2/opq/y"; echo k >"$L2/keep/k"
: >"$L3/data/.wh.a"
: >"$L3/opq/.wh..wh..opq"; echo z >"$L3/opq/z"
echo 4 >"$L4/etc/layers-version"
ln -s /etc/passwd "$L4/abs-link"
image layers v1 amd64 '"Env":["PATH=/usr/bin:/bin"],"Entrypoint":["/bin/sh","-c"],"Cmd":["sleep 3600"],"StopSignal":"SIGINT"' \
  "$BASE:gzip" "$L2:gzip" "$L3:zstd" "$L4:none"
push layers v1 layers

# --- many:v1: 25 layers ----------------------------------------------------
many=("$BASE:gzip")
for i in $(seq 1 24); do
  mkdir -p "$WORK/src/many-$i/many"
  echo "$i" >"$WORK/src/many-$i/many/$i"
  many+=("$WORK/src/many-$i:gzip")
done
image many v1 amd64 '"Env":["PATH=/usr/bin:/bin"],"Cmd":["/bin/sh"]' "${many[@]}"
push many v1 many

# --- tamper:v1: a layer no other image has ---------------------------------
mkdir -p "$WORK/src/tamper/tamper"
echo "only in tamper $(date +%s%N)" >"$WORK/src/tamper/tamper/file"
image tamper v1 amd64 '"Cmd":["/bin/sh"]' "$BASE:gzip" "$WORK/src/tamper:gzip"
echo "tamper-layer=$L_DIGEST" >>"$OUT/images.env"
push tamper v1 tamper

# --- multiarch:v1: an index of linux/amd64 (web:v1) and linux/arm64 ---------
image multiarch-arm64 v1 arm64 "$WEB_ENV" "$BASE:gzip" "$WORK/src/web-v1:gzip"
ARM_DESC="$M_DESC"
platform() { printf '%s' "${1%\}},\"platform\":{\"architecture\":\"$2\",\"os\":\"linux\"}}"; }
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s,%s]}' \
  "$(platform "$WEB_V1_DESC" amd64)" "$(platform "$ARM_DESC" arm64)" >"$WORK/index.json"
put_blob "$WORK/index.json" application/vnd.oci.image.index.v1+json
layout multiarch v1 "$B_DESC"
push multiarch v1 multiarch --all

# --- web-docker:v1: Docker schema 2 ------------------------------------------
image web v1 amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"web\",\"version\":\"v1\"}" \
  "$BASE:gzip" "$WORK/src/web-v1:gzip"
push web v1 web-docker --format v2s2

# --- web:v3: a third version for rollback tests ----------------------------
page_layer "$WORK/src/web-v3" "skiff-test web v3"
image web v3 amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"web\",\"version\":\"v3\"},\"Healthcheck\":{\"Test\":[\"CMD-SHELL\",\"wget -q -O /dev/null http://127.0.0.1:\${PORT:-80}/ || exit 1\"],\"Interval\":1000000000,\"Timeout\":1000000000,\"Retries\":3}" \
  "$BASE:gzip" "$WORK/src/web-v3:gzip"
push web v3 web

# --- web-500:v1: healthy, but every request to / fails ----------------------
# With no /www/index.html, busybox httpd runs /www/cgi-bin/index.cgi for `/`;
# a CGI "Status:" header becomes the status line ("HTTP/1.1 500 ...", then
# the connection closes: no Content-Length). The Healthcheck only GETs the
# static /health.html, so the replica counts as healthy.
W500="$WORK/src/web-500"
mkdir -p "$W500/www/cgi-bin"
cat >"$W500/www/cgi-bin/index.cgi" <<'EOF'
#!/bin/sh
printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n'
echo "skiff-test web-500 v1"
EOF
chmod 755 "$W500/www/cgi-bin/index.cgi"
echo "skiff-test web-500 healthy" >"$W500/www/health.html"
image web-500 v1 amd64 "$WEB_ENV,\"Labels\":{\"org.skiff.test\":\"web-500\",\"version\":\"v1\"},\"Healthcheck\":{\"Test\":[\"CMD-SHELL\",\"wget -q -O /dev/null http://127.0.0.1:\${PORT:-80}/health.html || exit 1\"],\"Interval\":1000000000,\"Timeout\":1000000000,\"Retries\":3}" \
  "$BASE:gzip" "$W500:gzip"
push web-500 v1 web-500

# --- postgres:v1 and redis:v1: real servers from Debian's packages ----------
# The .debs are fetched with `apt-get download` into $CACHE/debs (nothing is
# installed on this host and no maintainer script runs), unpacked with
# `dpkg-deb -x` into a scratch dir, and the layer keeps only the programs
# named below, every shared library they load (their ELF NEEDED entries,
# followed recursively; a library that no listed package has fails the build)
# and the data they read (postgres' share dir and extensions, zoneinfo). No
# LLVM: postgres' JIT (llvmjit.so) is left out. The built layers are cached in
# $CACHE/layers, keyed by this script, the entrypoints and the package lists,
# so a later build only copies and pushes them (the package versions are the
# ones of the first build after a change; remove $CACHE to fetch anew).
# SKIFF_IMAGES_DB=0 leaves both images out.
if [ "${SKIFF_IMAGES_DB:-1}" != 0 ]; then
  HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  CACHE="${SKIFF_IMAGE_CACHE:-/var/cache/skiff-images}"
  if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
    CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/skiff-images"
    mkdir -p "$CACHE"
  fi
  DEBS="$CACHE/debs"
  mkdir -p "$DEBS" "$CACHE/layers"
  PG_MAJOR=15
  PG_PKGS="postgresql-$PG_MAJOR postgresql-client-$PG_MAJOR libpq5 tzdata util-linux
    libc6 libgcc-s1 libstdc++6 libicu72 libssl3 libxml2 libxslt1.1 liblz4-1 libzstd1 zlib1g
    libuuid1 libldap-2.5-0 libsasl2-2 libgnutls30 libp11-kit0 libidn2-0 libunistring2
    libtasn1-6 libnettle8 libhogweed6 libgmp10 libffi8 libgssapi-krb5-2 libkrb5-3
    libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libpam0g libaudit1 libcap-ng0
    libselinux1 libpcre2-8-0 libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblzma5
    libreadline8 libtinfo6"
  REDIS_PKGS="redis-tools util-linux libc6 libgcc-s1 libstdc++6 libatomic1 libjemalloc2 liblzf1 libssl3
    libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblzma5 liblz4-1 libzstd1 libcap-ng0"
  for tool in apt-get dpkg-deb readelf flock; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not installed (apt-get install apt dpkg binutils util-linux)" >&2; exit 1; }
  done
  DB_KEY="$(cat "${BASH_SOURCE[0]}" "$HERE/postgres/docker-entrypoint.sh" "$HERE/redis/docker-entrypoint.sh" \
    <(echo "$PG_PKGS" "$REDIS_PKGS") | sha256sum | cut -c1-16)"

  # fetch_debs PKG...: a .deb of each PKG in $DEBS, downloaded if missing.
  fetch_debs() {
    local missing=() p
    for p in "$@"; do
      compgen -G "$DEBS/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    if ! (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >&2); then
      # A fresh machine may have no package lists yet: update them once.
      [ "$(id -u)" = 0 ] || { echo "build.sh: apt-get download failed (run apt-get update?)" >&2; exit 1; }
      apt-get update -q >&2
      (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${missing[@]}" >&2)
    fi
  }

  # unpack_debs DIR PKG...: the files of each PKG's .deb under DIR.
  unpack_debs() {
    local dir="$1" p deb; shift
    mkdir -p "$dir"
    for p in "$@"; do
      deb="$(ls -v "$DEBS/${p}"_*.deb | tail -n 1)"
      dpkg-deb -x "$deb" "$dir"
    done
  }

  # copy_elf STAGE DEST PATH...: each PATH (relative, under STAGE) into DEST,
  # with every shared library it needs, recursively, from STAGE's lib dirs.
  copy_elf() {
    local stage="$1" dest="$2" f lib dir found; shift 2
    local -A seen=()
    local queue=("$@")
    while [ "${#queue[@]}" -gt 0 ]; do
      f="${queue[0]}"; queue=("${queue[@]:1}")
      [ -z "${seen[$f]:-}" ] || continue
      seen[$f]=1
      mkdir -p "$dest/$(dirname "$f")"
      cp -L "$stage/$f" "$dest/$f"
      for lib in $(readelf -d "$stage/$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        found=""
        for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
          if [ -e "$stage/$dir/$lib" ]; then found="$dir/$lib"; break; fi
        done
        [ -n "$found" ] || { echo "build.sh: $f needs $lib, which no package listed has" >&2; exit 1; }
        queue+=("$found")
      done
    done
    # The interpreter the programs name (an absolute link in libc6).
    mkdir -p "$dest/lib64"
    ln -sfn /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$dest/lib64/ld-linux-x86-64.so.2"
  }

  # cached_layer NAME BUILD_FUNCTION: the layer NAME from $CACHE/layers, else
  # built by BUILD_FUNCTION DIR and stored; sets L_DESC, L_DIFF, L_DIGEST.
  cached_layer() {
    local name="$1" build="$2" cached="$CACHE/layers/$1-$DB_KEY"
    if [ ! -s "$cached.meta" ]; then
      "$build" "$WORK/src/$name"
      make_layer "$WORK/src/$name" gzip
      cp "$BLOBS/${L_DIGEST#sha256:}" "$cached.blob.tmp"
      mv "$cached.blob.tmp" "$cached.blob"
      printf '%s\n%s\n%s\n' "$L_DESC" "$L_DIFF" "$L_DIGEST" >"$cached.meta.tmp"
      mv "$cached.meta.tmp" "$cached.meta"
      find "$CACHE/layers" -name "$name-*" ! -name "$name-$DB_KEY.*" -delete
    fi
    { read -r L_DESC; read -r L_DIFF; read -r L_DIGEST; } <"$cached.meta"
    LAYER_DESC[$L_DIGEST]="$L_DESC"
    LAYER_DIFF[$L_DIGEST]="$L_DIFF"
    cp "$cached.blob" "$BLOBS/${L_DIGEST#sha256:}"
  }

  # add_user DIR NAME ID HOME: the base's passwd and group, plus NAME (ID:ID).
  add_user() {
    mkdir -p "$1/etc"
    { cat "$BASE/etc/passwd"; echo "$2:x:$3:$3:$2:$4:/bin/sh"; } >"$1/etc/passwd"
    { cat "$BASE/etc/group"; echo "$2:x:$3:"; } >"$1/etc/group"
  }

  build_postgres() {
    local dir="$1" stage="$WORK/stage-postgres" pg="usr/lib/postgresql/$PG_MAJOR" b progs=()
    fetch_debs $PG_PKGS
    # shellcheck disable=SC2086
    unpack_debs "$stage" $PG_PKGS
    for b in postgres initdb pg_ctl pg_isready psql pg_dump pg_dumpall pg_restore pg_controldata \
      createdb dropdb createuser dropuser; do
      progs+=("$pg/bin/$b")
    done
    for b in "$stage/$pg"/lib/*.so; do
      [ "${b##*/}" = llvmjit.so ] || progs+=("$pg/lib/${b##*/}")
    done
    copy_elf "$stage" "$dir" "${progs[@]}" usr/bin/setpriv
    mkdir -p "$dir/usr/share/postgresql" "$dir/usr/share/zoneinfo"
    cp -a "$stage/usr/share/postgresql/$PG_MAJOR" "$dir/usr/share/postgresql/"
    rm -rf "$dir/usr/share/postgresql/$PG_MAJOR/man"
    # The official image's change: listen on every address by default.
    sed -ri "s!^#?(listen_addresses)\s*=\s*\S+.*!\1 = '*'!" \
      "$dir/usr/share/postgresql/$PG_MAJOR/postgresql.conf.sample"
    (cd "$stage/usr/share/zoneinfo" && tar --exclude=./right --exclude=./posix -cf - .) |
      tar -C "$dir/usr/share/zoneinfo" -xf -
    add_user "$dir" postgres 999 /var/lib/postgresql
    mkdir -p "$dir/usr/local/bin" "$dir/docker-entrypoint-initdb.d" \
      "$dir/var/lib/postgresql/data" "$dir/var/run/postgresql"
    chmod 700 "$dir/var/lib/postgresql/data"
    chmod 3777 "$dir/var/run/postgresql"
    cp "$HERE/postgres/docker-entrypoint.sh" "$dir/usr/local/bin/docker-entrypoint.sh"
    chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
  }

  build_redis() {
    local dir="$1" stage="$WORK/stage-redis"
    fetch_debs $REDIS_PKGS
    # shellcheck disable=SC2086
    unpack_debs "$stage" $REDIS_PKGS
    copy_elf "$stage" "$dir" usr/bin/redis-check-rdb usr/bin/redis-cli usr/bin/setpriv
    # As in Debian: redis-server is redis-check-rdb under another name.
    ln -s redis-check-rdb "$dir/usr/bin/redis-server"
    add_user "$dir" redis 998 /data
    mkdir -p "$dir/data" "$dir/usr/local/bin"
    cp "$HERE/redis/docker-entrypoint.sh" "$dir/usr/local/bin/docker-entrypoint.sh"
    chmod 755 "$dir/usr/local/bin/docker-entrypoint.sh"
  }

  # One build at a time fills the cache (tests build images in parallel).
  exec 9>"$CACHE/lock"
  flock 9
  # The data dirs belong to the servers' users (the layer's other files to root).
  LAYER_OWNED=("999:999:var/lib/postgresql/data" "999:999:var/run/postgresql")
  cached_layer postgres build_postgres
  PG_LAYER="$L_DIGEST"
  LAYER_OWNED=("998:998:data")
  cached_layer redis build_redis
  REDIS_LAYER="$L_DIGEST"
  LAYER_OWNED=()
  flock -u 9
  exec 9>&-

  HEALTH_1S='"Interval":1000000000,"Timeout":3000000000,"StartPeriod":60000000000,"Retries":3'
  PG_CONFIG="\"Env\":[\"PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/bin:/usr/bin:/bin\",\"PGDATA=/var/lib/postgresql/data\"],\"Entrypoint\":[\"/usr/local/bin/docker-entrypoint.sh\"],\"Cmd\":[\"postgres\"],\"ExposedPorts\":{\"5432/tcp\":{}},\"Volumes\":{\"/var/lib/postgresql/data\":{}},\"StopSignal\":\"SIGINT\",\"Labels\":{\"org.skiff.test\":\"postgres\",\"version\":\"v1\"},\"Healthcheck\":{\"Test\":[\"CMD\",\"/usr/lib/postgresql/$PG_MAJOR/bin/pg_isready\",\"-q\",\"-h\",\"127.0.0.1\",\"-p\",\"5432\"],$HEALTH_1S}"
  image postgres v1 amd64 "$PG_CONFIG" "$BASE:gzip" "@$PG_LAYER"
  push postgres v1 postgres
  REDIS_CONFIG='"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":["/usr/local/bin/docker-entrypoint.sh"],"Cmd":["redis-server"],"WorkingDir":"/data","ExposedPorts":{"6379/tcp":{}},"Volumes":{"/data":{}},"Labels":{"org.skiff.test":"redis","version":"v1"},"Healthcheck":{"Test":["CMD","/usr/bin/redis-cli","ping"],'"$HEALTH_1S}"
  image redis v1 amd64 "$REDIS_CONFIG" "$BASE:gzip" "@$REDIS_LAYER"
  push redis v1 redis
fi

echo "OUT_DIR=$OUT"
