#!/usr/bin/env bash
# Prepares a Debian/Ubuntu host without a Docker engine to build and run the
# images with podman (root needed): installs podman, runc and debootstrap, and
# sets containers.conf so podman does not try to raise ulimits (some VMs forbid
# it; check.sh passes explicit --ulimit values instead).
# Idempotent; does nothing that is already done.
set -euo pipefail

need=()
for cmd in podman runc debootstrap; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
done
if ((${#need[@]})); then
    [[ $EUID -eq 0 ]] || { echo "setup-host.sh: run as root to install ${need[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends podman runc debootstrap uidmap fuse-overlayfs </dev/null
fi

conf=/etc/containers/containers.conf
if ! grep -q '^default_ulimits *= *\[\]' "$conf" 2>/dev/null; then
    mkdir -p /etc/containers
    if grep -q '^\[containers\]' "$conf" 2>/dev/null; then
        sed -i '/^\[containers\]/a default_ulimits = []' "$conf"
    else
        printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
fi
podman --version
