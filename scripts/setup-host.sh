#!/usr/bin/env bash
#! Installs every system package Stratus needs to build, run and test on Debian 12.
#!
#! Idempotent: a package already present is not reinstalled, and apt is only
#! touched when something is missing. QEMU comes from bookworm-backports because
#! QEMU 7.2 under TCG corrupts guests that write memory during live migration
#! (see docs/operations/qemu.md); 10.x does not.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -E bash "$0" "$@"
        fi
        echo "setup-host: must run as root (or with sudo) to install packages" >&2
        exit 1
    fi
}

PACKAGES=(
    qemu-system-x86 qemu-utils          # the QEMU driver and image tooling
    postgresql                          # the PostgreSQL backend's tests
    busybox-static cpio zstd xz-utils   # building the tiny test guest
    qemu-guest-agent                    # the guest agent copied into that guest
    iproute2 nftables                   # host networking
    openssl                             # migration TLS certificates (tests; see docs/operations.md)
    ca-certificates curl build-essential pkg-config
)

missing=()
for p in "${PACKAGES[@]}"; do
    case "$p" in \#*) continue ;; esac
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

# QEMU must be the backports build (>= 8): check the version actually installed.
qemu_ok=1
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    major=$(qemu-system-x86_64 --version | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/')
    if [ "${major:-0}" -lt 8 ]; then qemu_ok=0; fi
else
    qemu_ok=0
fi

if [ ${#missing[@]} -eq 0 ] && [ $qemu_ok -eq 1 ]; then
    echo "setup-host: all system packages present"
    exit 0
fi

need_root "$@"
export DEBIAN_FRONTEND=noninteractive

if [ -r /etc/os-release ] && grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > /etc/apt/sources.list.d/stratus-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    BACKPORTS=(-t bookworm-backports)
else
    BACKPORTS=()
fi

apt-get update -q
apt-get install -y -q --no-install-recommends "${BACKPORTS[@]}" qemu-system-x86 qemu-utils
real=()
for p in "${missing[@]}"; do
    case "$p" in qemu-system-x86|qemu-utils) ;; *) real+=("$p") ;; esac
done
if [ ${#real[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${real[@]}"
fi
echo "setup-host: installed: ${missing[*]:-} (qemu: $(qemu-system-x86_64 --version | head -1))"
