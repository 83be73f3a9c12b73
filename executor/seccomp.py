"""A seccomp filter for sandboxed runs: system calls no submission needs are refused.

Namespaces already make most of these harmless (a run can only reach its own processes and
mounts); the filter shrinks the kernel surface a run can reach at all (io_uring, keyrings,
BPF, perf, module loading, Linux AIO...), refuses direct I/O, stops `ptrace` even of the
run's own processes, and allows only the socket families a run can use inside its namespaces.
Built once with libseccomp (through `pyseccomp`), handed to bwrap as BPF (`--seccomp FD`) per run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile

import structlog

log = structlog.get_logger(__name__)

#: Refused with EPERM. fanotify and inotify: /usr is shared by every slot, and watching it would
#: show a run, with timing, each file other tenants' runs open there (modules, headers).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "inotify_init", "inotify_init1", "inotify_add_watch",
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "unshare", "setns", "chroot",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "open_by_handle_at", "name_to_handle_at",
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex",
    "iopl", "ioperm", "lookup_dcookie",
)  # fmt: skip
#: Refused with ENOSYS, so runtimes that try them first (libuv's io_uring) fall back quietly.
#: Linux AIO too: its contexts are a host-wide budget (`fs.aio-max-nr`) one run could exhaust.
#: openat2 takes its flags in a struct the filter cannot read (O_DIRECT below): libcs fall back
#: to openat.
UNSUPPORTED = (
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "io_setup", "io_submit", "io_getevents", "io_pgetevents", "io_cancel", "io_destroy",
    "openat2",
)  # fmt: skip
#: O_DIRECT is refused (EINVAL, as a filesystem without it answers): direct reads bypass the
#: page cache, so each queues on the disk itself, and a run's reads could queue beyond its own
#: time-out behind the per-run read cap, holding its slot in uninterruptible sleep.
#: (system call, index of its flags argument)
DIRECT_IO_FLAGS_ARG = (("open", 1), ("openat", 2))
#: The only socket families a run may open: local sockets, IP (in its own empty network
#: namespace) and netlink (glibc asks it about interfaces). Every other family is refused with
#: EAFNOSUPPORT: AF_VSOCK, for one, is not confined by network namespaces and reaches the host
#: of a virtual machine.
SOCKET_FAMILIES = frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK})
#: Families are numbered below this (AF_MAX is 46 on Linux 6); the kernel refuses higher ones.
FAMILY_LIMIT = 64
#: The kernel reads the family as a 32-bit int: compare only those bits of the register.
INT_BITS = 0xFFFFFFFF


def build_filter() -> bytes | None:
    """The filter as BPF, or None where libseccomp is not installed (then none is applied)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as exc:
        log.warning("executor.no_seccomp", reason=str(exc))
        return None
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for errno_value, names in ((errno.EPERM, DENIED), (errno.ENOSYS, UNSUPPORTED)):
        for name in names:
            try:
                rules.add_rule(seccomp.ERRNO(errno_value), name)
            except (ValueError, RuntimeError):
                log.info("seccomp.unknown_syscall", syscall=name)  # not on this architecture
    direct = seccomp.ERRNO(errno.EINVAL)
    for name, index in DIRECT_IO_FLAGS_ARG:
        rules.add_rule(direct, name, seccomp.Arg(index, seccomp.MASKED_EQ, os.O_DIRECT, os.O_DIRECT))
    rules.add_rule(
        direct,
        "fcntl",
        seccomp.Arg(1, seccomp.EQ, fcntl.F_SETFL),
        seccomp.Arg(2, seccomp.MASKED_EQ, os.O_DIRECT, os.O_DIRECT),
    )
    for name in ("socket", "socketpair"):
        for family in range(FAMILY_LIMIT):
            if family not in SOCKET_FAMILIES:
                condition = seccomp.Arg(0, seccomp.MASKED_EQ, INT_BITS, family)
                rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), name, condition)
    with tempfile.TemporaryFile() as exported:  # libseccomp writes to a file descriptor
        rules.export_bpf(exported)
        exported.seek(0)
        return exported.read()
