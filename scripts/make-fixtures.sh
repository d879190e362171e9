#!/usr/bin/env bash
# make-fixtures.sh - build lazypull test images offline with umoci and push
# them to a local registry (see scripts/registry.sh).
#
# Usage:
#   scripts/make-fixtures.sh --registry 127.0.0.1:PORT [--creds user:pass]
#                            [--work DIR] [--big-mib N]
#
#   --registry HOST:PORT  plain-HTTP registry to push to (required)
#   --creds USER:PASS     basic-auth credentials for the registry (optional)
#   --work DIR            work dir; the OCI layout is DIR/layout and is kept
#                         afterwards (default: a mktemp dir, removed at exit)
#   --big-mib N           size of the incompressible file in big:latest (default 32)
#
# Images pushed (all tagged :latest, gzip layers, OCI media types):
#   busybox      1 layer: /bin/busybox (busybox-static), symlinks /bin/{sh,echo,cat,ls}
#                -> busybox, /etc/passwd (root, app uid 1234), /etc/group,
#                /root, /tmp, /home/app (1234:1234). Cmd ["/bin/sh"], no User.
#   multilayer   busybox layer (same digest) +
#                L2: /data/small.txt ("hello from layer 2\n"), /data/random.bin (2 MiB)
#                L3: whiteout /data/.wh.small.txt + /data/layer3.txt ("hello from layer 3\n")
#   user-numeric busybox with config User "1234"
#   user-named   busybox with config User "app"
#   shared-a     busybox + /shared/a.txt ("shared-a\n")
#   shared-b     busybox + /shared/b.txt ("shared-b\n")
#   multiarch    OCI image index: linux/amd64 = the busybox manifest,
#                linux/arm64 = 1 layer with /arch.txt ("arm64\n"), config arch arm64
#   big          busybox + /big/big.bin (N MiB incompressible data)
#   pause        busybox whose entrypoint sleeps for ever (a CRI sandbox image)
#
# All file mtimes and "created" timestamps are fixed (2024-01-01T00:00:00Z) and
# pseudo-random data comes from AES-128-CTR with fixed keys, so digests are
# reproducible and re-running the script is harmless (blobs already present are
# skipped by skopeo). A summary (manifest digests, layer sizes) is printed at the
# end and also written to WORK/summary.json when --work is given.
#
# Requires: umoci, skopeo, jq, openssl, sha256sum, /bin/busybox (busybox-static), curl.
set -euo pipefail

REGISTRY="" CREDS="" WORK="" BIG_MIB=32
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "make-fixtures.sh: $*" >&2; exit 1; }
log() { echo "+ $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --registry) REGISTRY=${2:?}; shift 2 ;;
    --creds) CREDS=${2:?}; shift 2 ;;
    --work) WORK=${2:?}; shift 2 ;;
    --big-mib) BIG_MIB=${2:?}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "make-fixtures.sh: unknown argument: $1" >&2; usage 2 ;;
  esac
done
[ -n "$REGISTRY" ] || { echo "make-fixtures.sh: --registry is required" >&2; usage 2; }
case "$BIG_MIB" in ''|*[!0-9]*) die "--big-mib must be a non-negative integer" ;; esac
for t in umoci skopeo jq openssl sha256sum curl; do
  command -v "$t" >/dev/null || die "$t not found"
done
BUSYBOX_SRC=${BUSYBOX_SRC:-/bin/busybox}
[ -x "$BUSYBOX_SRC" ] || die "$BUSYBOX_SRC not found (apt-get install busybox-static)"

T0=$(date +%s.%N)
KEEP_WORK=1
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/lazypull-fixtures.XXXXXX); KEEP_WORK=0; fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cleanup() { if [ "$KEEP_WORK" = 0 ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

LAYOUT="$WORK/layout"
BUNDLE="$WORK/bundle"
GEN="$WORK/gen"
# Start from scratch every time (idempotent; output is deterministic anyway).
rm -rf "$LAYOUT" "$BUNDLE" "$GEN" "$WORK/summary.json"
mkdir -p "$GEN"

CREATED=2024-01-01T00:00:00Z
EPOCH=1704067200
UMOCI_UNPACK_OPTS=()
if [ "$(id -u)" != 0 ]; then UMOCI_UNPACK_OPTS=(--rootless); fi
DEST_AUTH=() INSPECT_AUTH=()
if [ -n "$CREDS" ]; then DEST_AUTH=(--dest-creds "$CREDS"); INSPECT_AUTH=(--creds "$CREDS"); fi
CURL_AUTH=()
if [ -n "$CREDS" ]; then CURL_AUTH=(-u "$CREDS"); fi

code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${CURL_AUTH[@]}" "http://$REGISTRY/v2/" || true)
[ "$code" = 200 ] || die "registry http://$REGISTRY/v2/ answered '$code' (expected 200; wrong --registry or --creds?)"

# deterministic pseudo-random bytes: det_random BYTES KEYHEX > file
det_random() {
  head -c "$1" /dev/zero |
    openssl enc -aes-128-ctr -nosalt -K "$2" -iv 00000000000000000000000000000000
}

# Fix mtimes of every entry (incl. symlinks) below a rootfs.
stamp() { find "$1" -exec touch -h -d "@$EPOCH" {} +; }

unpack() { # unpack TAG -> $BUNDLE (fresh)
  rm -rf "$BUNDLE"
  umoci unpack "${UMOCI_UNPACK_OPTS[@]}" --image "$LAYOUT:$1" "$BUNDLE" >/dev/null
}
repack() { # repack TAG "created_by" [extra repack opts]
  local tag=$1 by=$2; shift 2
  stamp "$BUNDLE/rootfs"
  umoci repack --history.created "$CREATED" --history.created_by "$by" "$@" \
    --image "$LAYOUT:$tag" "$BUNDLE"
}
cfg() { # cfg TAG [umoci config opts] - config change, no history entry, fixed created
  local tag=$1; shift
  umoci config --no-history --created "$CREATED" --image "$LAYOUT:$tag" "$@"
}
manifest_digest() { # digest of tag in the local layout
  jq -r --arg t "$1" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$LAYOUT/index.json"
}

log "building images in $LAYOUT"
umoci init --layout "$LAYOUT"

# ---- busybox:latest -------------------------------------------------------
umoci new --image "$LAYOUT:busybox"
unpack busybox
R="$BUNDLE/rootfs"
mkdir -p "$R/bin" "$R/etc" "$R/root" "$R/tmp" "$R/home/app"
cp "$BUSYBOX_SRC" "$R/bin/busybox"
chmod 0755 "$R/bin/busybox"
for l in sh echo cat ls; do ln -s busybox "$R/bin/$l"; done
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'app:x:1234:1234:app:/home/app:/bin/sh' > "$R/etc/passwd"
printf '%s\n' 'root:x:0:' 'app:x:1234:' > "$R/etc/group"
chmod 0644 "$R/etc/passwd" "$R/etc/group"
chmod 0755 "$R" "$R/bin" "$R/etc" "$R/home" "$R/home/app"
chmod 0700 "$R/root"
chmod 1777 "$R/tmp"
if [ "$(id -u)" = 0 ]; then chown 1234:1234 "$R/home/app"; fi
repack busybox "busybox base layer"
cfg busybox --config.cmd /bin/sh --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin

# ---- multilayer:latest ----------------------------------------------------
unpack busybox
mkdir -p "$R/data"
printf 'hello from layer 2\n' > "$R/data/small.txt"
det_random $((2 * 1024 * 1024)) 000102030405060708090a0b0c0d0e0f > "$R/data/random.bin"
chmod 0644 "$R/data/small.txt" "$R/data/random.bin"
repack multilayer "layer 2: /data/small.txt /data/random.bin" --refresh-bundle
rm "$R/data/small.txt"
printf 'hello from layer 3\n' > "$R/data/layer3.txt"
chmod 0644 "$R/data/layer3.txt"
repack multilayer "layer 3: rm /data/small.txt, add /data/layer3.txt"
cfg multilayer

# ---- user-numeric / user-named -------------------------------------------
cfg busybox --tag user-numeric --config.user 1234
cfg busybox --tag user-named --config.user app
# A CRI sandbox ("pause") image: busybox sleeping for ever.
cfg busybox --tag pause --clear config.cmd --config.entrypoint /bin/busybox \
  --config.entrypoint sleep --config.entrypoint 2147483647

# ---- shared-a / shared-b --------------------------------------------------
for x in a b; do
  unpack busybox
  mkdir -p "$R/shared"
  printf 'shared-%s\n' "$x" > "$R/shared/$x.txt"
  chmod 0644 "$R/shared/$x.txt"
  repack "shared-$x" "add /shared/$x.txt"
  cfg "shared-$x"
done

# ---- big:latest -----------------------------------------------------------
unpack busybox
mkdir -p "$R/big"
det_random $((BIG_MIB * 1024 * 1024)) 0f0e0d0c0b0a09080706050403020100 > "$R/big/big.bin"
chmod 0644 "$R/big/big.bin"
repack big "add /big/big.bin (${BIG_MIB} MiB)"
cfg big

# ---- multiarch:latest (OCI index, built by hand) --------------------------
umoci new --image "$LAYOUT:multiarch-arm64"
unpack multiarch-arm64
printf 'arm64\n' > "$R/arch.txt"
chmod 0644 "$R/arch.txt"
chmod 0755 "$R"
repack multiarch-arm64 "add /arch.txt"
cfg multiarch-arm64 --architecture arm64 --os linux
rm -rf "$BUNDLE"

desc() { # desc TAG ARCH -> manifest descriptor with platform
  jq -c --arg t "$1" --arg a "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)
    | {mediaType, digest, size, platform: {architecture: $a, os: "linux"}}' "$LAYOUT/index.json"
}
AMD=$(desc busybox amd64)
ARM=$(desc multiarch-arm64 arm64)
[ "$(jq -r '.architecture' "$LAYOUT/blobs/sha256/$(jq -r '.config.digest' "$LAYOUT/blobs/sha256/$(manifest_digest busybox | cut -d: -f2)" | cut -d: -f2)")" = amd64 ] \
  || die "busybox config architecture is not amd64 (non-amd64 build host?)"
jq -cn --argjson a "$AMD" --argjson b "$ARM" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: [$a, $b]}' > "$GEN/index.json"
IDX_SHA=$(sha256sum "$GEN/index.json" | cut -d' ' -f1)
IDX_SIZE=$(stat -c %s "$GEN/index.json")
cp "$GEN/index.json" "$LAYOUT/blobs/sha256/$IDX_SHA"
jq --arg d "sha256:$IDX_SHA" --argjson s "$IDX_SIZE" \
  '.manifests = ([.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] != "multiarch")]
     + [{mediaType: "application/vnd.oci.image.index.v1+json", digest: $d, size: $s,
         annotations: {"org.opencontainers.image.ref.name": "multiarch"}}])' \
  "$LAYOUT/index.json" > "$GEN/layout-index.json"
mv "$GEN/layout-index.json" "$LAYOUT/index.json"
T1=$(date +%s.%N)

# ---- push -----------------------------------------------------------------
IMAGES=(busybox multilayer user-numeric user-named shared-a shared-b multiarch big pause)
for name in "${IMAGES[@]}"; do
  log "push $name -> $REGISTRY/$name:latest"
  skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false "${DEST_AUTH[@]}" \
    "oci:$LAYOUT:$name" "docker://$REGISTRY/$name:latest" >&2
done
T2=$(date +%s.%N)

# ---- summary ----------------------------------------------------------------
inspect_raw() { skopeo inspect --raw --tls-verify=false "${INSPECT_AUTH[@]}" "docker://$1"; }
layers_line() { # manifest JSON on stdin -> "N layers: size,size,..."
  jq -r '"\(.layers | length) layer(s), sizes: \([.layers[].size] | map(tostring) | join(" ")) bytes"'
}
SUMMARY="[]"
echo
printf '%-13s %-73s %s\n' IMAGE "MANIFEST DIGEST" LAYERS
for name in "${IMAGES[@]}"; do
  # digest from the exact bytes ($(...) would strip umoci's trailing newline)
  inspect_raw "$REGISTRY/$name:latest" > "$GEN/raw.json"
  raw=$(cat "$GEN/raw.json")
  dig="sha256:$(sha256sum < "$GEN/raw.json" | cut -d' ' -f1)"
  want=$(manifest_digest "$name")
  [ "$dig" = "$want" ] || die "$name: registry digest $dig != layout digest $want"
  mt=$(printf '%s' "$raw" | jq -r '.mediaType // "?"')
  if [ "$mt" = application/vnd.oci.image.index.v1+json ]; then
    printf '%-13s %-73s %s\n' "$name" "$dig" "OCI index, $(printf '%s' "$raw" | jq '.manifests | length') manifests"
    children="[]"
    while read -r cd plat; do
      craw=$(inspect_raw "$REGISTRY/$name@$cd")
      printf '  %-11s %-73s %s\n' "$plat" "$cd" "$(printf '%s' "$craw" | layers_line)"
      children=$(jq -c --arg p "$plat" --arg d "$cd" --argjson m "$craw" \
        '. + [{platform: $p, digest: $d, layers: [$m.layers[] | {digest, size}]}]' <<<"$children")
    done < <(printf '%s' "$raw" | jq -r '.manifests[] | "\(.digest) \(.platform.os)/\(.platform.architecture)"')
    SUMMARY=$(jq -c --arg n "$name" --arg d "$dig" --arg mt "$mt" --argjson c "$children" \
      '. + [{name: $n, digest: $d, mediaType: $mt, manifests: $c}]' <<<"$SUMMARY")
  else
    printf '%-13s %-73s %s\n' "$name" "$dig" "$(printf '%s' "$raw" | layers_line)"
    SUMMARY=$(jq -c --arg n "$name" --arg d "$dig" --arg mt "$mt" --argjson m "$raw" \
      '. + [{name: $n, digest: $d, mediaType: $mt, config: $m.config.digest, layers: [$m.layers[] | {digest, size}]}]' <<<"$SUMMARY")
  fi
done
if [ "$KEEP_WORK" = 1 ]; then
  jq . <<<"$SUMMARY" > "$WORK/summary.json"
  echo "layout: $LAYOUT   summary: $WORK/summary.json"
fi
T3=$(date +%s.%N)
awk -v a="$T0" -v b="$T1" -v c="$T2" -v d="$T3" \
  'BEGIN { printf "timings: build %.1fs, push %.1fs, inspect %.1fs, total %.1fs\n", b-a, c-b, d-c, d-a }'
