"""Booting a real Linux kernel in QEMU with the host's filesystem as its root, to test on a
kernel of our choosing (Debian's, cgroup v2 only) whatever the host runs.

The guest is Debian's own kernel (`linux-image-amd64`: /boot/vmlinuz-*) with an initramfs
written here, at test time: busybox (`busybox-static`) and the kernel's 9p and virtio modules.
Its init loads them, mounts the host's `/` read-only over 9p (QEMU's virtfs, passthrough: the
host's owners and modes as they are), mounts one host folder writable at the same path (the
only place the guest writes on the host), and hands pid 1 to the program it is given, which
mounts what else it needs and powers the machine off when done (`tests/cgroup_v2_guest.py`).
KVM is used where the host gives it, else QEMU emulates the CPU (TCG: slower, but any host).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
BOOT = Path("/boot")
MODULES = Path("/lib/modules")
#: What the guest's init loads (with what they need, from modules.dep) to mount 9p over virtio.
NEEDED = ("virtio_pci", "9pnet_virtio", "9p")
#: 9p's largest message: bigger reads and fewer round trips than its 8 KiB default.
MSIZE = 512 * 1024
#: The host's owners and modes as they are (QEMU runs as root); the host's mounts under `/` are
#: separate devices, their inode numbers remapped so that none collide.
SHARE = "security_model=passthrough,multidevs=remap"
#: Printed by the init once the host's root is mounted, just before the program starts.
MOUNTED = "CRUCIBLE-VM-ROOT-MOUNTED"

INIT = """#!/bin/busybox sh
b=/bin/busybox
$b mkdir -p /dev /proc /newroot
$b mount -t devtmpfs dev /dev
for m in {modules}; do $b insmod /modules/$m.ko || echo "insmod $m failed"; done
opts=trans=virtio,version=9p2000.L,msize={msize}
fail() {{ echo "$1"; $b poweroff -f; }}
$b mount -t 9p -o $opts,ro,cache=loose hostroot /newroot || fail "mount of the host root failed"
$b mount -t 9p -o $opts,rw scratch /newroot{scratch} || fail "mount of {scratch} failed"
$b mount --move /dev /newroot/dev
echo {mounted}
exec $b switch_root /newroot {argv}
"""


@dataclass
class Boot:
    returncode: int | None
    console: str
    seconds: float
    accel: str
    #: whether the guest printed its ready line in time, and when
    ready: bool
    ready_s: float | None


def kernel() -> tuple[Path, str] | None:
    """The newest installed kernel with its modules: (vmlinuz, release)."""
    for image in sorted(BOOT.glob("vmlinuz-*"), reverse=True):
        release = image.name.removeprefix("vmlinuz-")
        if (MODULES / release / "modules.dep").exists() and os.access(image, os.R_OK):
            return image, release
    return None


def unavailable() -> str | None:
    """Why the VM cannot be booted here (what is missing), or None."""
    if os.uname().machine != "x86_64":
        return "the VM tests boot an x86_64 kernel with qemu-system-x86_64 (x86_64 hosts only)"
    missing = []
    if not shutil.which(QEMU):
        missing.append("qemu-system-x86")
    if kernel() is None:
        missing.append("linux-image-amd64")
    if not BUSYBOX.exists() or _dynamic(BUSYBOX):
        missing.append("busybox-static")
    if missing:
        return f"apt-get install {' '.join(missing)} (./dev test installs them)"
    return None


def _dynamic(binary: Path) -> bool:
    """Whether an ELF64 binary needs a dynamic loader (a PT_INTERP header): the initramfs has none."""
    with binary.open("rb") as f:
        head = f.read(65536)
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    size, count = struct.unpack_from("<HH", head, 0x36)
    return any(struct.unpack_from("<I", head, phoff + i * size)[0] == 3 for i in range(count))


def accels() -> list[str]:
    """What to try, best first: KVM where the CPU has virtualisation (vmx/svm) and /dev/kvm is
    ours, then emulation. (A nested guest may offer /dev/kvm without them: its VMs then hang
    before the kernel prints a line.) CRUCIBLE_VM_ACCEL=kvm or tcg picks one."""
    if chosen := os.environ.get("CRUCIBLE_VM_ACCEL"):
        return [chosen]
    flags = set()
    with contextlib.suppress(OSError):
        flags = set(Path("/proc/cpuinfo").read_text().split())
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK) and bool(flags & {"vmx", "svm"})
    return ["kvm", "tcg"] if kvm else ["tcg"]


def boot(argv: list[str], scratch: Path, *, memory_mb: int, cpus: int, ready: str, ready_within_s: float,
         timeout_s: float) -> Boot:  # fmt: skip
    """Boot the guest with `argv` as its pid 1 and `scratch` (a host folder) writable at the same
    path; its console is returned when it powers off (or is killed at `timeout_s`). A guest that
    has not printed `ready` within `ready_within_s` is taken as one that cannot run here
    (`Boot.ready` False): with KVM, emulation is tried next."""
    tried = []
    for accel in accels():
        booted = _boot(accel, argv, scratch, memory_mb, cpus, ready, ready_within_s, timeout_s)
        if booted.ready:
            return booted
        tried.append(f"{accel}: {' | '.join(booted.console.strip().splitlines()[-3:]) or 'no output'}")
    booted.console = "\n".join(tried) + "\n" + booted.console
    return booted


def _boot(accel: str, argv: list[str], scratch: Path, memory_mb: int, cpus: int, ready: str,
          ready_within_s: float, timeout_s: float) -> Boot:  # fmt: skip
    image, release = kernel() or (None, "")
    assert image is not None, unavailable()
    with tempfile.TemporaryDirectory(prefix="crucible-vm-") as work:
        initrd = Path(work) / "initrd.gz"
        initrd.write_bytes(initramfs(release, scratch, argv))
        command = [
            QEMU, "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-m", str(memory_mb), "-smp", str(cpus),
            "-kernel", str(image), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-nodefaults", "-net", "none",
            "-virtfs", f"local,path=/,mount_tag=hostroot,{SHARE},readonly=on",
            "-virtfs", f"local,path={scratch},mount_tag=scratch,{SHARE}",
        ]  # fmt: skip
        began = time.monotonic()
        lines: list[str] = []
        seen = threading.Event()
        ready_s = None
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True) as qemu:  # fmt: skip
            assert qemu.stdout is not None
            reader = threading.Thread(target=_read, args=(qemu.stdout, lines, ready, seen), daemon=True)
            reader.start()
            if seen.wait(ready_within_s):
                ready_s = time.monotonic() - began
                with contextlib.suppress(subprocess.TimeoutExpired):
                    qemu.wait(max(0.0, timeout_s - (time.monotonic() - began)))
            if qemu.poll() is None:
                os.killpg(qemu.pid, 9)
                qemu.wait()
            reader.join()
            return Boot(qemu.returncode, "".join(lines), time.monotonic() - began, accel, seen.is_set(),
                        ready_s)  # fmt: skip


def _read(stream: IO[bytes], lines: list[str], ready: str, seen: threading.Event) -> None:
    for line in stream:
        text = line.decode(errors="replace")
        lines.append(text)
        if ready in text:
            seen.set()


def initramfs(release: str, scratch: Path, argv: list[str]) -> bytes:
    """A gzipped newc cpio: busybox, the modules (decompressed: busybox's insmod takes plain
    ones) and the init."""
    order = modules_in_order(release)
    init = INIT.format(
        modules=" ".join(name for name, _ in order), msize=MSIZE, scratch=scratch,
        mounted=MOUNTED, argv=" ".join(_quote(arg) for arg in argv),
    )  # fmt: skip
    archive = Cpio()
    for folder in ("bin", "modules", "dev", "proc", "newroot"):
        archive.add(folder, b"", 0o40755)
    archive.add("bin/busybox", BUSYBOX.read_bytes(), 0o100755)
    for name, path in order:
        archive.add(f"modules/{name}.ko", _module_bytes(path), 0o100644)
    archive.add("init", init.encode(), 0o100755)
    return gzip.compress(archive.finish(), compresslevel=1)


def modules_in_order(release: str) -> list[tuple[str, Path]]:
    """`NEEDED` and what they depend on, each after its dependencies (names as insmod's)."""
    root = MODULES / release
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    by_name = {_name(path): path for path in deps}
    builtin = (root / "modules.builtin").read_text().split() if (root / "modules.builtin").exists() else []
    builtin_names = {_name(path) for path in builtin}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in deps.get(path, []):
            visit(dep)
        if path not in order:
            order.append(path)

    for wanted in NEEDED:
        if wanted in by_name:
            visit(by_name[wanted])
        elif wanted.replace("-", "_") not in builtin_names:
            raise FileNotFoundError(f"kernel {release} has no module {wanted}")
    return [(_name(path), root / path) for path in order]


def _name(path: str) -> str:
    name = Path(path).name
    return name[: name.index(".ko")].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise OSError(f"{path}: zstd-compressed modules are not supported here")
    return data


class Cpio:
    """The newc format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1

    def add(self, name: str, data: bytes, mode: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self.inode += 1
        self.out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        self.out.write(encoded)
        self._pad()
        self.out.write(data)
        self._pad()

    def finish(self) -> bytes:
        self.add("TRAILER!!!", b"", 0)
        return self.out.getvalue()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def fresh_folder() -> Path:
    """A folder the guest may write into (its only writable place on the host)."""
    return Path(tempfile.mkdtemp(prefix="crucible-vm-out-"))


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
