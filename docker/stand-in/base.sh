#!/usr/bin/env bash
# A local stand-in base for the images, for machines that cannot pull python:3.11-slim-bookworm
# or NGC PyTorch: Debian bookworm made by debootstrap from Debian's own packages, with Debian's
# Python 3.11 and its venv module, imported into the container engine as one layer. Run as root:
#
#   docker/stand-in/base.sh [IMAGE]        (default localhost/moue-stand-in:bookworm-python3.11)
#
# Needs debootstrap and podman or docker (apt-get install debootstrap podman). Environment:
# ENGINE (podman), MIRROR (http://deb.debian.org/debian). Does nothing if IMAGE exists; the CPU
# image then builds on it with --build-arg BASE=IMAGE (docs/containers.md), and
# docker/stand-in/Dockerfile.ngc lays NGC PyTorch's Python packages out on top of it.
set -euo pipefail
image=${1:-localhost/moue-stand-in:bookworm-python3.11}
engine=${ENGINE:-podman}
mirror=${MIRROR:-http://deb.debian.org/debian}

for tool in debootstrap "$engine"; do
  command -v "$tool" >/dev/null || {
    echo "base.sh: $tool is not installed; apt-get install debootstrap podman" >&2; exit 2; }
done
if "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "base.sh: $image exists; remove it ($engine rmi $image) to make it again"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "base.sh: debootstrap needs root; run it as root" >&2; exit 2; }

root=$(mktemp -d /var/tmp/moue-stand-in.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT  # never into mounts a failed debootstrap left
start=$SECONDS
# ca-certificates: pip reaches PyPI over https.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
  "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | "$engine" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image"
echo "base.sh: $image made in $((SECONDS - start)) s"
