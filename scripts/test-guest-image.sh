#!/usr/bin/env bash
# test-guest-image.sh: boot the Stratus test guest for real and check it.
#
# Builds the guest if needed (scripts/build-guest-image.sh, cached), boots it
# under QEMU with TCG (KVM hangs on our CI hosts) on a throw-away qcow2 overlay
# of disk.qcow2, waits for the "stratus-guest: booted" console marker, then
# talks to qemu-ga over its virtio-serial socket (guest-sync, guest-ping,
# guest-info, guest-get-osinfo, guest-network-get-interfaces, guest-exec) and
# checks the answers: OS name, the 10.0.2.15 address from QEMU's user-mode
# network, command output written to and read back from the data disk.
# Finally it presses the ACPI power button (QMP system_powerdown), requires
# QEMU to exit within 20 s, and checks that the data disk was unmounted cleanly
# with the written file on it. Prints the timings it measured.
#
# Usage: scripts/test-guest-image.sh [GUEST_DIR]
#   GUEST_DIR defaults to $STRATUS_GUEST_DIR, else ~/.cache/stratus/guest.
#   STRATUS_TEST_GUEST_MEM   guest memory in MiB (default 128; at least 96:
#                            at 80 the kernel sometimes runs out of memory while
#                            unpacking the initramfs)
#   STRATUS_TEST_BOOT_TIMEOUT  seconds to wait for "booted" (default 90)
#   STRATUS_TEST_KEEP=1      keep the temp dir (console log) for inspection
# Exit status 0 when every check passed. QEMU is always killed and temp files
# removed on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
G="${1:-${STRATUS_GUEST_DIR:-$HOME/.cache/stratus/guest}}"
MEM="${STRATUS_TEST_GUEST_MEM:-128}"
BOOT_TIMEOUT="${STRATUS_TEST_BOOT_TIMEOUT:-90}"
POWERDOWN_TIMEOUT=20
QEMU="${QEMU:-qemu-system-x86_64}"

say() { echo "test-guest-image: $*"; }
fail() { say "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

for tool in "$QEMU" qemu-img python3 debugfs dumpe2fs; do
    command -v "$tool" >/dev/null 2>&1 || fail "missing tool '$tool'"
done

"$HERE/build-guest-image.sh" "$G"
for f in vmlinuz initrd.img disk.qcow2 manifest.json; do
    [ -f "$G/$f" ] || fail "$G/$f missing"
done
KREL="$(sed -nE 's/^ *"kernel_version": "([^"]+)".*/\1/p' "$G/manifest.json")"

T="$(mktemp -d /tmp/stratus-guest-test.XXXXXX)"
PIDFILE="$T/qemu.pid"
QEMU_PID=""
qemu_alive() {
    [ -n "$QEMU_PID" ] || return 1
    kill -0 "$QEMU_PID" 2>/dev/null || return 1
    # A zombie is dead too (daemonized QEMU is reaped by PID 1 eventually).
    [ "$(awk '{print $3}' "/proc/$QEMU_PID/stat" 2>/dev/null || echo Z)" != Z ]
}
cleanup() {
    local rc=$?
    if [ -z "$QEMU_PID" ] && [ -s "$PIDFILE" ]; then QEMU_PID="$(cat "$PIDFILE")"; fi
    if qemu_alive; then
        kill "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 20); do qemu_alive || break; sleep 0.1; done
        qemu_alive && kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$T/console.log" ]; then
        say "console log (last 40 lines):"
        tail -n 40 "$T/console.log" | sed 's/^/  | /'
    fi
    if [ "${STRATUS_TEST_KEEP:-0}" = 1 ]; then
        say "kept $T"
    else
        rm -rf "$T"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

qemu-img create -q -f qcow2 -b "$G/disk.qcow2" -F qcow2 "$T/disk.qcow2"

# ---- boot ----------------------------------------------------------------------
# -nographic is redundant with -display none and the explicit -serial/-monitor,
# and QEMU refuses it with -daemonize unless every default port is redirected.
T_START="$(now)"
"$QEMU" -machine q35 -accel tcg,tb-size=32 -m "$MEM" \
    -nographic -monitor none -parallel none \
    -kernel "$G/vmlinuz" -initrd "$G/initrd.img" -append 'console=ttyS0 quiet' \
    -drive "file=$T/disk.qcow2,if=virtio" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -device virtio-serial \
    -chardev "socket,id=qga0,path=$T/qga.sock,server=on,wait=off" \
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    -serial "file:$T/console.log" -display none \
    -qmp "unix:$T/qmp.sock,server=on,wait=off" \
    -daemonize -pidfile "$PIDFILE"
QEMU_PID="$(cat "$PIDFILE")"
say "QEMU pid $QEMU_PID, ${MEM} MiB, TCG; waiting up to ${BOOT_TIMEOUT}s for 'stratus-guest: booted'"

deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
until grep -qE $'^stratus-guest: booted\r?$' "$T/console.log" 2>/dev/null; do
    qemu_alive || fail "QEMU exited during boot"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no 'stratus-guest: booted' within ${BOOT_TIMEOUT}s"
    sleep 0.1
done
T_BOOTED="$(since "$T_START")"
say "booted after ${T_BOOTED}s ($(grep -m1 '^stratus-guest: up ' "$T/console.log" | sed 's/^stratus-guest: //' | tr -d '\r') in the guest)"
if [ -r "/proc/$QEMU_PID/status" ]; then
    say "QEMU RSS: $(awk '/^VmRSS/ {print $2, $3}' "/proc/$QEMU_PID/status")"
fi

# ---- guest agent ---------------------------------------------------------------
cat > "$T/qga.py" <<'PY'
import base64, json, socket, sys, time

sock_path, t_start, krel = sys.argv[1], float(sys.argv[2]), sys.argv[3]
failures = []

def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)

class Agent:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.sync_id = int(time.time()) % 100000

    def _line(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.s.settimeout(left)
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("guest agent socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.replace(b"\xff", b"").strip()

    def sync(self, timeout):
        """guest-sync until the agent echoes our id (discarding stale replies)."""
        self.sync_id += 1
        # 0xFF resets the agent's JSON parser in case a half command is pending.
        self.s.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync", "arguments": {"id": self.sync_id}}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("return") == self.sync_id:
                return

    def cmd(self, execute, arguments=None, timeout=10):
        req = {"execute": execute}
        if arguments is not None:
            req["arguments"] = arguments
        self.s.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line:
                msg = json.loads(line)
                if "error" in msg:
                    raise RuntimeError(f"{execute}: {msg['error']}")
                return msg["return"]

# The chardev is server=on,wait=off: connect, then sync until qemu-ga answers.
agent = None
deadline = time.monotonic() + 60
while True:
    try:
        if agent is None:
            agent = Agent(sock_path)
        agent.sync(timeout=1.0)
        break
    except (TimeoutError, socket.timeout):
        pass                       # not answering yet: sync again on the same connection
    except OSError:
        agent = None               # socket not there yet or closed: reconnect
        time.sleep(0.2)
    if time.monotonic() > deadline:
        print("FAIL guest agent did not answer guest-sync within 60 s", flush=True)
        sys.exit(1)
print(f"time guest agent answering {time.time() - t_start:.2f}s after QEMU start", flush=True)

check(agent.cmd("guest-ping") == {}, "guest-ping")

info = agent.cmd("guest-info")
enabled = [c["name"] for c in info.get("supported_commands", []) if c.get("enabled")]
check("guest-exec" in enabled, f"guest-info: qemu-ga {info.get('version')}, {len(enabled)} commands enabled")

osinfo = agent.cmd("guest-get-osinfo")
check(osinfo.get("name") == "Stratus test guest" and osinfo.get("id") == "stratus-guest",
      f"guest-get-osinfo: name={osinfo.get('name')!r} id={osinfo.get('id')!r} "
      f"version-id={osinfo.get('version-id')!r}")
check(osinfo.get("kernel-release") == krel, f"guest-get-osinfo: kernel-release={osinfo.get('kernel-release')!r}")

addrs = {}
for _ in range(50):   # DHCP normally finished before "booted"; allow 5 s more
    addrs = {}
    for iface in agent.cmd("guest-network-get-interfaces"):
        addrs[iface["name"]] = [a["ip-address"] for a in iface.get("ip-addresses", [])]
    if "10.0.2.15" in addrs.get("eth0", []):
        break
    time.sleep(0.1)
check("10.0.2.15" in addrs.get("eth0", []), f"guest-network-get-interfaces: {addrs}")

def run(argv, timeout=20):
    pid = agent.cmd("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = agent.cmd("guest-exec-status", {"pid": pid})
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            return st.get("exitcode"), out, err
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest-exec {argv} did not finish")
        time.sleep(0.1)

rc, out, err = run(["/bin/sh", "-c", "echo hello > /mnt/disk/x; cat /mnt/disk/x"])
check(rc == 0 and out == "hello\n", f"guest-exec sh -c 'echo hello > /mnt/disk/x; cat /mnt/disk/x': rc={rc} out={out!r} err={err!r}")
rc, out, err = run(["/bin/sh", "-c", "head -n1 /mnt/disk/stratus-guest; sync"])
check(rc == 0 and out.startswith("stratus test guest"), f"guest-exec marker file on the data disk: {out.strip()!r}")

sys.exit(1 if failures else 0)
PY

cat > "$T/qmp.py" <<'PY'
import json, socket, sys

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rwb")

def reply():
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            return msg

json.loads(f.readline())    # greeting
for cmd in ({"execute": "qmp_capabilities"}, {"execute": sys.argv[2]}):
    f.write(json.dumps(cmd).encode() + b"\n")
    f.flush()
    msg = reply()
    if "error" in msg:
        print(f"FAIL QMP {cmd['execute']}: {msg['error']}")
        sys.exit(1)
print(f"ok   QMP {sys.argv[2]}")
PY

if ! python3 "$T/qga.py" "$T/qga.sock" "$T_START" "$KREL" | sed 's/^/test-guest-image: /'; then
    fail "guest agent checks failed"
fi

# ---- ACPI power-down -------------------------------------------------------------
python3 "$T/qmp.py" "$T/qmp.sock" system_powerdown | sed 's/^/test-guest-image: /' ||
    fail "QMP system_powerdown failed"
T_PD="$(now)"
while qemu_alive; do
    if awk -v a="$T_PD" -v b="$(now)" -v t="$POWERDOWN_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
        grep -q '^stratus-guest: shutting down' "$T/console.log" &&
            fail "guest began shutting down but QEMU did not exit within ${POWERDOWN_TIMEOUT}s" ||
            fail "system_powerdown ignored: QEMU still running after ${POWERDOWN_TIMEOUT}s (no ACPI power-button handling in the guest)"
    fi
    sleep 0.1
done
say "QEMU exited $(since "$T_PD")s after system_powerdown"
grep -q '^stratus-guest: shutting down (poweroff, ACPI power button)' "$T/console.log" ||
    fail "QEMU exited but the guest did not log an ACPI power-button shutdown"
say "ok   guest shut down cleanly via the ACPI power button"

# ---- data disk after shutdown ------------------------------------------------------
qemu-img convert -q -f qcow2 -O raw "$T/disk.qcow2" "$T/disk.raw"
state="$(dumpe2fs -h "$T/disk.raw" 2>/dev/null | sed -nE 's/^Filesystem state: +//p')"
[ "$state" = clean ] || fail "data disk filesystem state after shutdown: '$state' (want clean)"
content="$(debugfs -R 'cat /x' "$T/disk.raw" 2>/dev/null)"
[ "$content" = hello ] || fail "data disk /x after shutdown: '$content' (want hello)"
say "ok   data disk clean after shutdown, /x persisted"

say "PASS (boot to 'booted' ${T_BOOTED}s; see agent timing above)"
