#!/usr/bin/env bash
# build-guest-image.sh: build the tiny, real test guest that Stratus tests and
# the demo boot under QEMU.
#
# The guest is made only from Debian packages:
#   vmlinuz      the Debian cloud kernel (linux-image-*-cloud-amd64), fetched
#                with `apt-get download` and unpacked with `dpkg -x` (never
#                installed on this host)
#   initrd.img   a gzip'd cpio initramfs: busybox-static, the host's real
#                qemu-ga with its shared libraries, the kernel modules the
#                guest needs, and an /init script (see docs/guest-image.md)
#   disk.qcow2   a 64 MiB qcow2 data disk holding an ext4 filesystem (made
#                with `mkfs.ext4 -d`, never mounted on the host) that contains
#                the marker file /stratus-guest
#   manifest.json  kernel version, sha256 of every file, a suggested cmdline
#
# Usage: scripts/build-guest-image.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $STRATUS_GUEST_DIR, else ~/.cache/stratus/guest.
#
# The result is cached: the cache key hashes this script, the kernel package
# version and the busybox-static / qemu-guest-agent versions copied into the
# image. When manifest.json carries the same key and every file still has
# its recorded sha256, the script prints "guest image up to date" and exits.
# A build happens in a temporary sibling directory that replaces OUTPUT_DIR
# only once it is complete, so an interrupted build never leaves half an
# image behind. Concurrent runs serialise on OUTPUT_DIR.lock.
#
# Needs: apt-get, dpkg, cpio, gzip, mkfs.ext4 (e2fsprogs >= 1.43), qemu-img,
# busybox-static, qemu-guest-agent (scripts/setup-host.sh installs them all).
# Runs `apt-get update` (root only) only if the kernel cannot be resolved or
# downloaded with the current package lists.
set -euo pipefail

log() { echo "build-guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

OUT="${1:-${STRATUS_GUEST_DIR:-$HOME/.cache/stratus/guest}}"
OUT="${OUT%/}"
SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"

# Kernel modules the guest needs. Anything built into the kernel (listed in
# modules.builtin) is skipped; modules are copied with their dependencies.
#   virtio_pci      the virtio PCI transport (all devices below sit on it)
#   virtio_blk      /dev/vda
#   virtio_net      eth0
#   virtio_console  the virtio-serial port qemu-ga talks through
#   ext4            the data disk's filesystem
#   button, evdev   ACPI power button -> /dev/input/event* for busybox acpid
WANTED_MODULES=(virtio_pci virtio_blk virtio_net virtio_console ext4 button evdev)
DISK_SIZE=64M
CMDLINE="console=ttyS0 quiet"
BUSYBOX=/bin/busybox
QEMU_GA=/usr/sbin/qemu-ga

# --------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------
for tool in apt-get apt-cache dpkg dpkg-query cpio gzip mkfs.ext4 qemu-img ldd sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (run scripts/setup-host.sh)"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
[ -x "$QEMU_GA" ] || die "$QEMU_GA missing (install qemu-guest-agent)"

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

did_update=0
apt_update_once() {
    [ "$did_update" -eq 0 ] || return 1
    did_update=1
    [ "$(id -u)" -eq 0 ] || { log "apt-get update needed but not root"; return 1; }
    log "refreshing package lists (apt-get update)"
    apt-get update -q >&2 || return 1
}

# Resolves the versioned kernel package behind the linux-image-cloud-amd64
# metapackage's candidate, e.g. "linux-image-6.1.0-56-cloud-amd64 6.1.192-2".
# (One apt-cache call: without a pkgcache.bin each call costs ~0.7 s.)
resolve_kernel_pkg() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -nE 's/^Depends:.*(linux-image-[0-9][^ ,]*-cloud-amd64)( \(= ([^)]+)\))?.*/\1 \3/p'
}

SCRIPT_SHA="$(sha256sum "$SCRIPT" | cut -d' ' -f1)"
FILES=(vmlinuz initrd.img disk.qcow2)

# True when OUT holds a complete image whose manifest has "KEY": "VALUE" and
# whose files all still have their recorded sha256.
image_matches() {
    local m="$OUT/manifest.json" f want have
    [ -f "$m" ] || return 1
    grep "\"$1\": \"$2\"" "$m" >/dev/null || return 1
    for f in "${FILES[@]}"; do
        [ -f "$OUT/$f" ] || return 1
        want="$(sed -nE "s/^ *\"$f\": \\{\"sha256\": \"([0-9a-f]{64})\".*/\\1/p" "$m")"
        have="$(sha256sum "$OUT/$f" | cut -d' ' -f1)"
        [ -n "$want" ] && [ "$want" = "$have" ] || return 1
    done
}

KRES="$(resolve_kernel_pkg || true)"
if [ -z "$KRES" ] && apt_update_once; then
    KRES="$(resolve_kernel_pkg || true)"
fi
if [ -z "$KRES" ]; then
    # No usable package lists (offline?): an intact image from this very
    # script is better than nothing.
    if image_matches script_sha256 "$SCRIPT_SHA"; then
        log "warning: cannot resolve the cloud kernel package; keeping the cached image"
        echo "guest image up to date ($OUT, kernel version not re-checked)"
        exit 0
    fi
    die "cannot resolve the cloud kernel package (apt-cache show linux-image-cloud-amd64)"
fi
KRES="${KRES%%$'\n'*}"
KPKG="${KRES%% *}"
KVER_PKG="${KRES#* }"
if [ -z "$KVER_PKG" ]; then   # unversioned dependency: ask for the candidate
    KVER_PKG="$(apt-cache policy "$KPKG" | sed -nE 's/^ *Candidate: (.+)$/\1/p')"
fi
[ -n "$KVER_PKG" ] && [ "$KVER_PKG" != "(none)" ] || die "no candidate version for $KPKG"
KREL="${KPKG#linux-image-}"        # uname -r of the guest, e.g. 6.1.0-56-cloud-amd64

BB_VERSION="$(pkg_version busybox-static)"
QGA_VERSION="$(pkg_version qemu-guest-agent)"
CACHE_KEY="$(printf '%s\n' "script=$SCRIPT_SHA" "kernel=$KPKG=$KVER_PKG" \
    "busybox-static=$BB_VERSION" "qemu-guest-agent=$QGA_VERSION" | sha256sum | cut -d' ' -f1)"
image_up_to_date() { image_matches cache_key "$CACHE_KEY"; }

if image_up_to_date; then
    echo "guest image up to date ($OUT, kernel $KREL)"
    exit 0
fi

# --------------------------------------------------------------------------
# Build (serialised; re-check the cache once the lock is held)
# --------------------------------------------------------------------------
PARENT="$(dirname "$OUT")"
NAME="$(basename "$OUT")"
mkdir -p "$PARENT"
exec 9>"$OUT.lock"
flock 9
if image_up_to_date; then
    echo "guest image up to date ($OUT, kernel $KREL)"
    exit 0
fi
# Leftovers of builds that were killed (we hold the lock, nobody else builds).
rm -rf "$PARENT/.$NAME.build."* "$PARENT/.$NAME.old."*

T0=$(date +%s.%N)
BUILD="$(mktemp -d "$PARENT/.$NAME.build.XXXXXX")"
OLD=""
cleanup() {
    # Interrupted between the two renames at the end: put the old image back.
    if [ -n "$OLD" ] && [ -e "$OLD" ] && [ ! -e "$OUT" ]; then
        mv -T "$OLD" "$OUT" || true
    fi
    rm -rf "$BUILD" ${OLD:+"$OLD"}
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

STAGE="$BUILD/work"          # scratch: downloads, unpacked kernel, raw disk
ROOT="$BUILD/work/initramfs" # initramfs tree
IMG="$BUILD/image"           # final files, renamed to OUT at the end
mkdir -p "$STAGE/deb" "$ROOT" "$IMG"

log "kernel $KPKG $KVER_PKG"
# apt-get download as root falls back to an unsandboxed download with a warning
# when _apt cannot write the directory; ask for that directly.
apt_download() {
    (cd "$STAGE/deb" && apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KVER_PKG") >&2
}
if ! apt_download; then
    apt_update_once || die "apt-get download $KPKG=$KVER_PKG failed"
    apt_download || die "apt-get download $KPKG=$KVER_PKG failed after apt-get update"
fi
deb=("$STAGE"/deb/*.deb)
dpkg -x "${deb[0]}" "$STAGE/kernel"
KDIR="$STAGE/kernel"
MODDIR="$KDIR/lib/modules/$KREL"
[ -f "$KDIR/boot/vmlinuz-$KREL" ] || die "no boot/vmlinuz-$KREL in ${deb[0]##*/}"
[ -d "$MODDIR" ] || die "no lib/modules/$KREL in ${deb[0]##*/}"
cp "$KDIR/boot/vmlinuz-$KREL" "$IMG/vmlinuz"

# ---- initramfs: directory skeleton ---------------------------------------
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/stratus,etc/acpi/PWRF,etc/acpi/PWRB,dev,proc,sys,run,tmp,mnt/disk,root,var/log,usr/share/udhcpc}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
ln -s ../run "$ROOT/var/run"
if [ "$(id -u)" -eq 0 ]; then
    # The kernel opens /dev/console before /init mounts devtmpfs.
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# ---- busybox with its applet links --------------------------------------
cp "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
    applet="${applet#/}"
    [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)
APPLETS=" $("$BUSYBOX" --list | tr '\n' ' ') "
case "$APPLETS" in *" acpid "*) HAVE_ACPID=1 ;; *) HAVE_ACPID=0 ;; esac
case "$APPLETS" in *" udhcpc "*) ;; *) die "busybox lacks udhcpc" ;; esac

# ---- qemu-ga and every shared library it needs --------------------------
copy_with_path() {      # copy_with_path /abs/path : same path inside ROOT, symlinks resolved
    mkdir -p "$ROOT$(dirname "$1")"
    cp -L "$1" "$ROOT$1"
}
mkdir -p "$ROOT/usr/sbin"
cp "$QEMU_GA" "$ROOT/usr/sbin/qemu-ga"
LIBS=()
while read -r lib; do
    [ -n "$lib" ] || continue
    copy_with_path "$lib"
    LIBS+=("$lib")
done < <(ldd "$QEMU_GA" | sed -nE 's@^\s*(\S+ => )?(/\S+) \(0x[0-9a-f]+\)$@\2@p' | sort -u)
case " ${LIBS[*]} " in
    *"/ld-linux"*) ;;
    *) die "ldd did not report the dynamic loader of $QEMU_GA" ;;
esac

# ---- kernel modules (with dependencies, decompressed, in load order) ---
declare -A MOD_SEEN=()
MOD_ORDER=()
BUILTIN_MODULES=()
need_tool() { command -v "$1" >/dev/null 2>&1 || die "missing '$1' (install $2) to unpack kernel modules"; }
mod_file() {            # mod_file NAME: path of NAME's .ko[.xz|.zst|.gz] under MODDIR
    local alt="${1//_/-}"
    find "$MODDIR/kernel" -type f \( -name "$1.ko" -o -name "$1.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) -print -quit
}
mod_builtin() {         # names in modules.builtin may use '-' or '_'
    local re="${1//[-_]/[-_]}"
    grep -qE "/${re}\.ko\$" "$MODDIR/modules.builtin"
}
add_module() {
    local name="$1" src rel dst deps dep
    [ -z "${MOD_SEEN[$name]:-}" ] || return 0
    MOD_SEEN[$name]=1
    if mod_builtin "$name"; then
        BUILTIN_MODULES+=("$name")
        return 0
    fi
    src="$(mod_file "$name")"
    [ -n "$src" ] || die "kernel module $name is neither built in nor shipped in $KPKG"
    rel="${src#"$KDIR"}"
    rel="${rel%.xz}"; rel="${rel%.zst}"; rel="${rel%.gz}"
    dst="$ROOT$rel"
    mkdir -p "$(dirname "$dst")"
    case "$src" in
        *.ko.xz) need_tool xz xz-utils; xz -dc "$src" > "$dst" ;;
        *.ko.zst) need_tool zstd zstd; zstd -q -dc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
    # The .modinfo section holds "depends=a,b,c" (no pipe into head: pipefail).
    deps="$("$BUSYBOX" strings -a "$dst" | sed -n 's/^depends=//p')"
    deps="${deps%%$'\n'*}"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    MOD_ORDER+=("$rel")
}
for m in "${WANTED_MODULES[@]}"; do
    add_module "$m"
done
printf '%s\n' "${MOD_ORDER[@]}" > "$ROOT/etc/stratus/modules"
cp "$MODDIR/modules.builtin" "$MODDIR/modules.order" "$ROOT/lib/modules/$KREL/" 2>/dev/null || true

# ---- /etc ----------------------------------------------------------------
IMAGE_VERSION="${CACHE_KEY:0:12}"
BUILT_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
cat > "$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > "$ROOT/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo stratus-guest > "$ROOT/etc/hostname"
printf 'hosts: files dns\n' > "$ROOT/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$ROOT/etc/hosts"
: > "$ROOT/etc/resolv.conf"
cat > "$ROOT/etc/os-release" <<EOF
NAME="Stratus test guest"
ID=stratus-guest
VERSION_ID=$IMAGE_VERSION
VERSION="$IMAGE_VERSION (kernel $KREL)"
PRETTY_NAME="Stratus test guest $IMAGE_VERSION"
BUILD_ID=$BUILT_AT
EOF
cat > "$ROOT/etc/stratus/build" <<EOF
cache_key=$CACHE_KEY
kernel_package=$KPKG=$KVER_PKG
busybox_static=$BB_VERSION
qemu_guest_agent=$QGA_VERSION
built_at=$BUILT_AT
EOF

# ---- udhcpc hook -----------------------------------------------------------
cat > "$ROOT/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc event hook: configures the interface with `ip`. $1 is the event.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    prefix="${mask:-}"
    if [ -z "$prefix" ]; then
        prefix="$(ipcalc -p "$ip" "$subnet")"; prefix="${prefix#PREFIX=}"
    fi
    if [ "$1" = bound ]; then
        ip -4 addr flush dev "$interface"
    fi
    ip addr replace "$ip/$prefix" dev "$interface"
    gw=""
    for r in $router; do gw="$r"; break; done
    [ -n "$gw" ] && ip route replace default via "$gw" dev "$interface"
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    [ "$1" = bound ] && echo "stratus-guest: net $interface $ip/$prefix gw ${gw:-none}" > /dev/console
    ;;
leasefail|nak)
    echo "stratus-guest: dhcp on $interface: $1" > /dev/console
    ;;
esac
exit 0
EOF
chmod 755 "$ROOT/usr/share/udhcpc/default.script"

# ---- clean shutdown --------------------------------------------------------
cat > "$ROOT/sbin/stratus-poweroff" <<'EOF'
#!/bin/sh
# Clean shutdown of the test guest: stop every process, unmount the data
# disk, then power off / reboot / halt through the kernel directly.
# Usage: stratus-poweroff [poweroff|reboot|halt] [reason]
mode="${1:-poweroff}"
mkdir /run/stratus-stopping 2>/dev/null || exit 0     # only once
echo "stratus-guest: shutting down ($mode, ${2:-requested})" > /dev/console
# Every process but PID 1 and this script: TERM, up to 3 s grace, then KILL.
others() {      # lists user-space processes other than 1 and us
    left=""
    for p in /proc/[0-9]*; do
        p="${p#/proc/}"
        [ "$p" = 1 ] || [ "$p" = "$$" ] && continue
        [ -e "/proc/$p/exe" ] || continue       # kernel threads and zombies
        read -r comm < "/proc/$p/comm" 2>/dev/null || comm="?"
        left="$left $p:$comm"
    done
    [ -n "$left" ]
}
kill -TERM -1 2>/dev/null
n=30
while others && [ "$n" -gt 0 ]; do
    sleep 0.1
    n=$((n - 1))
done
if others; then
    echo "stratus-guest: killing:$left" > /dev/console
    kill -KILL -1 2>/dev/null
fi
sync
if grep -q ' /mnt/disk ' /proc/mounts; then
    umount /mnt/disk 2>/dev/null || mount -o remount,ro /mnt/disk
fi
echo "stratus-guest: $mode" > /dev/console
case "$mode" in
    reboot) reboot -f ;;
    halt) halt -f ;;
    *) poweroff -f ;;
esac
EOF
# qemu-ga's guest-shutdown runs "/sbin/shutdown -h -P +0 <msg>" (-r reboot, -H halt).
cat > "$ROOT/sbin/shutdown" <<'EOF'
#!/bin/sh
# Minimal shutdown(8) for qemu-ga: returns at once, the shutdown runs detached.
mode=poweroff
for a in "$@"; do
    case "$a" in
        -r) mode=reboot ;;
        -H) mode=halt ;;
        -P|-h) ;;
    esac
done
setsid /sbin/stratus-poweroff "$mode" "shutdown $*" </dev/null >/dev/null 2>&1 &
exit 0
EOF
# busybox acpid runs /etc/acpi/PWRF/00000080 for the power button.
for b in PWRF PWRB; do
    cat > "$ROOT/etc/acpi/$b/00000080" <<'EOF'
#!/bin/sh
setsid /sbin/stratus-poweroff poweroff "ACPI power button" </dev/null >/dev/null 2>&1 &
EOF
done
chmod 755 "$ROOT/sbin/stratus-poweroff" "$ROOT/sbin/shutdown" "$ROOT"/etc/acpi/*/00000080

# ---- /init -------------------------------------------------------------------
cat > "$ROOT/init" <<'EOF'
#!/bin/sh
# PID 1 of the Stratus test guest (busybox sh). Console markers are lines
# starting with "stratus-guest: "; see docs/guest-image.md.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
exec </dev/console >/dev/console 2>&1

say() { echo "stratus-guest: $*"; }
say "init started (kernel $(uname -r))"

# poweroff/reboot/halt without -f signal PID 1 (USR2/TERM/USR1).
trap '/sbin/stratus-poweroff poweroff "signal USR2" &' USR2
trap '/sbin/stratus-poweroff reboot "signal TERM" &' TERM
trap '/sbin/stratus-poweroff halt "signal USR1" &' USR1

COUNTER=0
SHELL_ON_CONSOLE=0
HOST=stratus-guest
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        stratus.counter=1) COUNTER=1 ;;
        stratus.shell=1) SHELL_ON_CONSOLE=1 ;;
        stratus.hostname=?*) HOST="${arg#stratus.hostname=}" ;;
    esac
done
hostname "$HOST"
echo "$HOST" > /etc/hostname

# Kernel modules, dependencies first (listed at build time).
while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "$ko" 2>/dev/null || say "insmod ${ko##*/} failed"
done < /etc/stratus/modules

wait_for() {    # wait_for TENTHS TEST...: poll TEST every 0.1 s
    n="$1"; shift
    while ! "$@"; do
        n=$((n - 1)); [ "$n" -gt 0 ] || return 1
        sleep 0.1
    done
}

# Network: lo, then DHCP on eth0 (QEMU user networking hands out 10.0.2.15).
ip link set lo up
if wait_for 30 [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /usr/share/udhcpc/default.script -x "hostname:$HOST" \
        -t 5 -T 1 -b >/run/udhcpc.log 2>&1
else
    say "no eth0"
fi

# Data disk.
if wait_for 10 [ -b /dev/vda ]; then
    if mount -t ext4 -o rw /dev/vda /mnt/disk 2>/run/mount-vda.err; then
        say "disk /dev/vda mounted at /mnt/disk"
    else
        say "disk /dev/vda not mounted: $(cat /run/mount-vda.err)"
    fi
fi

# ACPI power button (system_powerdown) -> clean shutdown.
if command -v acpid >/dev/null 2>&1; then
    if wait_for 10 [ -e /dev/input/event0 ]; then
        acpid -f -c /etc/acpi -l /run/acpid.log &
    else
        say "no input event device: ACPI power button not handled"
    fi
fi

# Guest agent on the virtio-serial port org.qemu.guest_agent.0. devtmpfs only
# makes /dev/vportNpM; udev would add the by-name links, so do it here.
link_vports() {
    for d in /sys/class/virtio-ports/*; do
        [ -r "$d/name" ] || continue
        n="$(cat "$d/name" 2>/dev/null)"
        [ -n "$n" ] || continue
        [ -e "/dev/virtio-ports/$n" ] || ln -sf "../${d##*/}" "/dev/virtio-ports/$n"
    done
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]
}
QGA_PORT=/dev/virtio-ports/org.qemu.guest_agent.0
if wait_for 30 link_vports; then
    mkdir -p /run/qemu-ga
    (
        while :; do
            qemu-ga -m virtio-serial -p "$QGA_PORT" -t /run/qemu-ga >>/run/qemu-ga.log 2>&1
            rc=$?
            [ -d /run/stratus-stopping ] && exit 0
            say "qemu-ga exited (status $rc), restarting"
            sleep 1
        done
    ) &
    say "qemu-ga started on $QGA_PORT"
else
    say "no virtio-serial port org.qemu.guest_agent.0: qemu-ga not started"
fi

if [ "$COUNTER" = 1 ]; then
    (
        i=0
        while :; do
            sleep 0.5 &         # the period timer runs while we print
            t=$!
            i=$((i + 1))
            read -r up _ < /proc/uptime
            echo "stratus-guest: counter $i time=$(date +%s) uptime=$up"
            wait "$t"
        done
    ) &
fi

read -r up _ < /proc/uptime
say "up ${up}s"
say "booted"

if [ "$SHELL_ON_CONSOLE" = 1 ]; then
    while :; do
        setsid cttyhack sh -l
        sleep 1
    done &
fi
# PID 1 must never exit; `wait` also reaps orphans re-parented to us. Once
# stratus-poweroff has begun (it TERMs every process, then waits for them to
# go), start nothing new: just sleep in place until the power goes.
while [ ! -d /run/stratus-stopping ]; do
    sleep 3600 &
    wait $! 2>/dev/null
done
exec sleep 2147483647
EOF
chmod 755 "$ROOT/init"

# ---- pack the initramfs ------------------------------------------------------
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -9 -n) > "$IMG/initrd.img"

# ---- data disk: ext4 built from a directory, no mount -----------------------
mkdir -p "$STAGE/disk"
cat > "$STAGE/disk/stratus-guest" <<EOF
stratus test guest data disk
image $IMAGE_VERSION built $BUILT_AT
EOF
truncate -s "$DISK_SIZE" "$STAGE/disk.raw"
mkfs.ext4 -q -F -L stratus-data -E root_owner=0:0 -d "$STAGE/disk" "$STAGE/disk.raw"
qemu-img convert -q -f raw -O qcow2 "$STAGE/disk.raw" "$IMG/disk.qcow2"

# ---- manifest ------------------------------------------------------------------
json_list() { local s="" x; for x in "$@"; do s+="${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
mod_names=()
for rel in "${MOD_ORDER[@]}"; do n="${rel##*/}"; mod_names+=("${n%.ko}"); done
{
    printf '{\n'
    printf '  "format": 1,\n'
    printf '  "cache_key": "%s",\n' "$CACHE_KEY"
    printf '  "script_sha256": "%s",\n' "$SCRIPT_SHA"
    printf '  "image_version": "%s",\n' "$IMAGE_VERSION"
    printf '  "built_at": "%s",\n' "$BUILT_AT"
    printf '  "kernel_package": "%s",\n' "$KPKG"
    printf '  "kernel_package_version": "%s",\n' "$KVER_PKG"
    printf '  "kernel_version": "%s",\n' "$KREL"
    printf '  "busybox_static_version": "%s",\n' "$BB_VERSION"
    printf '  "qemu_guest_agent_version": "%s",\n' "$QGA_VERSION"
    printf '  "cmdline": "%s",\n' "$CMDLINE"
    printf '  "min_memory_mib": 96,\n'
    printf '  "modules_loaded": %s,\n' "$(json_list "${mod_names[@]}")"
    printf '  "modules_builtin": %s,\n' "$(json_list "${BUILTIN_MODULES[@]}")"
    printf '  "acpid": %s,\n' "$([ "$HAVE_ACPID" = 1 ] && echo true || echo false)"
    printf '  "files": {\n'
    last=$(( ${#FILES[@]} - 1 ))
    for i in "${!FILES[@]}"; do
        f="${FILES[$i]}"
        printf '    "%s": {"sha256": "%s", "size": %s}%s\n' "$f" \
            "$(sha256sum "$IMG/$f" | cut -d' ' -f1)" "$(stat -c %s "$IMG/$f")" \
            "$([ "$i" -eq "$last" ] && echo "" || echo ",")"
    done
    printf '  }\n'
    printf '}\n'
} > "$IMG/manifest.json"

# ---- move into place -------------------------------------------------------------
rm -rf "$STAGE"
chmod 755 "$IMG"
if [ -e "$OUT" ]; then
    OLD="$PARENT/.$NAME.old.$$"
    mv -T "$OUT" "$OLD"
fi
mv -T "$IMG" "$OUT"
T1=$(date +%s.%N)
echo "guest image built: $OUT"
log "built in $(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b-a}')s:" \
    "$(cd "$OUT" && stat -c '%n %s' "${FILES[@]}" | tr '\n' ' ')"
log "kernel modules: ${mod_names[*]:-none} (built in: ${BUILTIN_MODULES[*]:-none})"
