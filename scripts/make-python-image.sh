#!/usr/bin/env bash
# Build the Debian bookworm + python3 test image and push it to a registry twice: as plain gzip
# (REG/py:gzip) and converted to eStargz by Debian's ctr-remote (REG/py:esgz). The rootfs comes
# from `debootstrap --variant=minbase --include=python3 bookworm` (about a minute, from Debian's
# packages) and is cached in CACHE/rootfs for the next run. Needs root, debootstrap, umoci,
# skopeo, containerd and ctr-remote (it starts a private containerd to convert).
# Usage: scripts/make-python-image.sh --registry HOST:PORT [--cache DIR] [--no-esgz]
#   --cache DIR  where the rootfs is kept [default: /var/tmp/lazypull-python]
#   --no-esgz    push py:gzip only
set -euo pipefail
cd "$(dirname "$0")/.."
REG="" CACHE=/var/tmp/lazypull-python ESGZ=1
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) REG=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --no-esgz) ESGZ=0; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "make-python-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$REG" ] || { echo "make-python-image: --registry HOST:PORT is required" >&2; exit 2; }
log() { echo "make-python-image: $*" >&2; }
mkdir -p "$CACHE"
if [ ! -x "$CACHE/rootfs/usr/bin/python3" ]; then
  log "debootstrap bookworm + python3 into $CACHE/rootfs (about a minute)"
  rm -rf "$CACHE/rootfs.tmp" "$CACHE/rootfs"
  if ! debootstrap --variant=minbase --include=python3 bookworm "$CACHE/rootfs.tmp" >"$CACHE/debootstrap.log" 2>&1; then
    tail -20 "$CACHE/debootstrap.log" >&2
    exit 1
  fi
  mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
fi
WORK=$(mktemp -d /tmp/lazypull-pyimg.XXXXXX)
CPID=""
cleanup() {
  [ -n "$CPID" ] && { kill "$CPID" 2>/dev/null || true; wait "$CPID" 2>/dev/null || true; }
  for m in $(grep -o " $WORK[^ ]*" /proc/mounts | sort -r || true); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
log "packing the image (umoci) and pushing $REG/py:gzip"
umoci init --layout "$WORK/layout" >/dev/null
umoci new --image "$WORK/layout:py" >/dev/null
umoci unpack --image "$WORK/layout:py" "$WORK/bundle" >/dev/null
cp -a "$CACHE/rootfs/." "$WORK/bundle/rootfs/"
umoci repack --image "$WORK/layout:py" "$WORK/bundle" >/dev/null
umoci config --image "$WORK/layout:py" --config.cmd /usr/bin/python3 >/dev/null
rm -rf "$WORK/bundle"
skopeo copy -q --dest-tls-verify=false "oci:$WORK/layout:py" "docker://$REG/py:gzip"
[ "$ESGZ" = 1 ] || exit 0
log "converting to eStargz with ctr-remote and pushing $REG/py:esgz"
mkdir -p "$WORK/ctd"
cat > "$WORK/ctd/config.toml" <<CFG
version = 2
root = "$WORK/ctd/root"
state = "$WORK/ctd/state"
[grpc]
  address = "$WORK/ctd/containerd.sock"
CFG
containerd --config "$WORK/ctd/config.toml" >"$WORK/ctd/log" 2>&1 &
CPID=$!
for _ in $(seq 100); do [ -S "$WORK/ctd/containerd.sock" ] && break; sleep 0.1; done
C="ctr-remote -a $WORK/ctd/containerd.sock"
$C images pull --plain-http "$REG/py:gzip" >/dev/null
$C images convert --estargz --oci "$REG/py:gzip" "$REG/py:esgz" >/dev/null
$C images push --plain-http "$REG/py:esgz" >/dev/null
