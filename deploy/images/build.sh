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
#   web-500:v1            healthy but failing: `/` answers HTTP 500 on every
#                         request (a CGI index), its Healthcheck GETs
#                         /health.html (200); $PORT as web:v1
# All share the same base layer (busybox, /etc/passwd, /etc/group).
# Writes OUT_DIR/images.env: `skiff-test/NAME:TAG=sha256:<manifest digest>`
# lines, and `tamper-layer=sha256:<digest of tamper's own layer>`.
#
# Needs: busybox (busybox-static), skopeo, tar, gzip, zstd, sha256sum.
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

# make_layer SRC_DIR COMPRESSION(gzip|zstd|none) -> sets L_DESC (descriptor JSON), L_DIFF
make_layer() {
  local src="$1" comp="$2" tarfile="$WORK/layer.tar" blob media
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu \
    -C "$src" -cf "$tarfile" .
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
    make_layer "${spec%:*}" "${spec##*:}"
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

echo "OUT_DIR=$OUT"
