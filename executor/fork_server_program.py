"""The fork server: one pre-started Python interpreter per run slot that forks one child per run.

This file is not imported by the executor: it is the program a slot's server sandbox runs, as
`/sandbox/main.py` under the sandbox's own Python (standard library only), started by
`executor.fork_server`. Its sandbox is a cold run's (the slot's uid, user, pid, net, ipc, uts
and cgroup namespaces, the same read-only root, no new user namespaces, no new privileges), but
it keeps its capabilities inside its own user namespace and has no seccomp filter: it needs
them to give each run namespaces of its own. It never runs submitted code.

Per run (one at a time), on a request from the executor (a JSON header and file descriptors),
the server forks I into a new pid namespace (and returns to its own for the next one):
- I is pid 1 of the run's pid namespace (as bwrap's init) and its first process in the run's
  cgroups: it unshares mount, net, ipc, uts and cgroup namespaces, mounts the run's own /tmp,
  /dev/shm and /sandbox (holding main.py) and its /proc (masked as a cold run's), brings its
  loopback up, forks P, drops its capabilities and reaps until P ends, exiting as P did
  (128 + N for a signal, as bwrap reports it);
- P, the run, takes the run's stdin, stdout and stderr, closes every other descriptor, sets
  the rlimits, drops every capability, applies the seccomp filter, and only then runs the
  code as `python -u /sandbox/main.py` would, or, for any other language (and a compile
  step), execs its command. Once P is ready it says so on a pipe, which is
  how the executor tells our failures from the program's.
The server hands the executor a pidfd of I (the run's kill: the namespace dies with its pid
1), then says how I ended with its resource usage. Each run is a fresh fork of the untouched
server, so nothing a run does reaches the next.
"""

import ctypes
import fcntl
import gc
import importlib
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys

CONFIG_PATH = "/sandbox/config.json"
SECCOMP_PATH = "/sandbox/seccomp.bpf"
MAIN_PATH = "/sandbox/main.py"
MAX_REQUEST = 1 << 16
MAX_FDS = 64  # 4 of the run, and one a file: a submission brings at most 48 (CRUCIBLE_MAX_FILES)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_DUMPABLE, PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 4, 1, 22, 24, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
#: P's exit status when its own set-up failed (it then says nothing on the ready pipe)
SETUP_FAILED = 125

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    check(
        libc.mount(
            source and source.encode(),
            target.encode(),
            fstype and fstype.encode(),
            flags,
            data and ctypes.c_char_p(data.encode()),
        ),
        f"mount {target}",
    )


def prctl(option, arg2=0, arg3=0):
    check(libc.prctl(option, arg2, arg3, 0, 0), f"prctl {option}")


class Server:
    """What every run's set-up needs, read once at start."""

    def __init__(self, sock):
        self.sock = sock
        with open(CONFIG_PATH) as f:
            self.config = json.load(f)
        self.filter = None
        if os.path.exists(SECCOMP_PATH):
            with open(SECCOMP_PATH, "rb") as f:
                self.filter = ctypes.create_string_buffer(f.read())
        with open("/proc/sys/kernel/cap_last_cap") as f:
            self.last_cap = int(f.read())
        self.pid_namespace = own_pid_namespace()
        # No user namespace may be made in this one from now on, by a run or by this server
        # (bwrap's --disable-userns, which this sandbox cannot use: see
        # executor.bwrap_command.fork_server_command); only a capability here could undo it,
        # and a run has none.
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        for name in self.config["preload"]:
            importlib.import_module(name)
        # objects made so far are never collected: a run's collections then do not write to
        # (and so copy) the server's pages
        gc.collect()
        gc.freeze()

    def serve(self):
        """Prepare a run's init ahead, hand it its run when asked; only returns in a run's own
        process, ready to run it."""
        self.sock.send(b'{"ready": true}')
        prepared = None
        while True:
            message, fds, flags, _ = socket.recv_fds(self.sock, MAX_REQUEST, MAX_FDS)
            if not message:
                os._exit(0)  # the executor closed its end
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self.report({"error": "a request was cut short"})
                os._exit(1)
            request = json.loads(message)
            try:
                if request["kind"] == "prepare":
                    if prepared is not None:  # one prepared init at most: the older goes
                        os.kill(prepared[0], signal.SIGKILL)
                        os.waitpid(prepared[0], 0)
                        os.close(prepared[1]), prepared[2].close()
                    prepared = self.prepare(request, fds)
                    if not isinstance(prepared, tuple):
                        return prepared  # (in the run's process)
                    continue
                if prepared is None:
                    raise RuntimeError("a run came with no init prepared for it")
                init, ready_read, hand = prepared
                prepared = None
                socket.send_fds(hand, [message], fds)
                hand.close()
                for fd in fds:
                    os.close(fd)
                self.supervise(init, ready_read)
            except BaseException as exc:
                self.report({"error": repr(exc)})
                os._exit(1)

    def prepare(self, request, cgroup_fds):
        """Fork I into a new pid namespace and its cgroups, to make its namespaces and mounts
        before its run comes: (I's pid, its ready pipe, the socket its run goes down)."""
        ready_read, ready_write = os.pipe()
        hand, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        check(libc.unshare(CLONE_NEWPID), "unshare pid")  # for the next child only
        init = os.fork()
        if init == 0:
            os.close(ready_read)
            hand.detach()
            return self.init(request, cgroup_fds, theirs, ready_write)
        check(libc.setns(self.pid_namespace, CLONE_NEWPID), "setns pid")
        for fd in (*cgroup_fds, ready_write):
            os.close(fd)
        theirs.close()
        return init, ready_read, hand

    def supervise(self, init, ready_read):
        """Hand the executor I's pidfd (its kill), then say how I ended and what it used."""
        pidfd = os.pidfd_open(init)
        socket.send_fds(self.sock, [b'{"started": true}'], [pidfd])
        os.close(pidfd)
        said = os.read(ready_read, 4096)
        os.close(ready_read)
        _, status, usage = os.wait4(init, 0)
        self.report(
            {
                "status": status,
                "ran": said == b"1",
                "error": said[1:].decode(errors="replace"),
                "utime": usage.ru_utime,
                "stime": usage.ru_stime,
                "maxrss": usage.ru_maxrss,
            }
        )

    def init(self, prepare, cgroup_fds, hand, ready_write):
        """I: pid 1 of the run's pid namespace, its first process in its cgroups, and the
        maker of its other namespaces and mounts, made before the run comes down `hand`;
        returns in P."""
        try:
            self.sock.detach()  # (the descriptor is closed below: see `run_process`)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            for fd in cgroup_fds:
                os.write(fd, b"0")
                os.close(fd)
            namespaces = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
            check(libc.unshare(namespaces), "unshare")
            self.mount_base(prepare["tmpfs_bytes"])
            loopback_up()
        except BaseException as exc:
            failed(ready_write, exc)
        message, fds, _, _ = socket.recv_fds(hand, MAX_REQUEST, MAX_FDS)
        if not message:
            os._exit(0)  # retired before its run came
        try:
            hand.close()
            # the run's header (limits, arguments) comes in a memfd only this process reads:
            # the server passes it on unread, so nothing of a run stays in the server's memory
            header_fd, stdin_fd, stdout_fd, stderr_fd, *files = fds
            request = json.loads(read_all(header_fd))
            self.mount_files(request, prepare["tmpfs_bytes"], files)
            # the run cannot open its init's /proc files (memory, environment)
            prctl(PR_SET_DUMPABLE, 0)
            go_read, go_write = os.pipe()
            program = os.fork()
        except BaseException as exc:
            failed(ready_write, exc)
        stdio = (stdin_fd, stdout_fd, stderr_fd)
        if program == 0:
            os.close(go_write)
            prctl(PR_SET_DUMPABLE, 1)  # as a cold run's program (an exec would reset it)
            return self.run_process(request, stdio, ready_write, go_read)
        try:
            drop_capabilities(self.last_cap)  # it only reaps from now on
        except OSError:
            os._exit(SETUP_FAILED)
        os.write(go_write, b"1")  # the program goes on only once its init holds no capability
        os.closerange(3, 1 << 16)
        while True:  # reap orphans too; end as the program did (bwrap's init does the same)
            try:
                pid, status = os.wait()
            except ChildProcessError:
                os._exit(SETUP_FAILED)
            if pid == program:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)

    def mount_base(self, tmpfs_bytes):
        """The run's own writable places, and a /proc of its pid namespace masked and
        read-only as a cold run's."""
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        config = self.config
        flags = MS_NOSUID | MS_NODEV
        mount("tmpfs", "/tmp", "tmpfs", flags, f"size={tmpfs_bytes},mode=1777")
        mount("tmpfs", "/dev/shm", "tmpfs", flags, f"size={config['shm_bytes']},mode=1777")
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for path in config["masked_files"]:  # as bwrap's --ro-bind /dev/null: unopenable
            if os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)
                mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        for path in config["masked_dirs"]:
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_RDONLY)
        # read-only, /proc/sys included, as a cold run's (`--remount-ro /proc`)
        mount(None, "/proc", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def mount_files(self, request, tmpfs_bytes, files):
        """The run's /tmp at its own size, and /sandbox holding only its files."""
        flags = MS_NOSUID | MS_NODEV
        if request["tmpfs_bytes"] != tmpfs_bytes:
            mount(None, "/tmp", None, MS_REMOUNT | flags, f"size={request['tmpfs_bytes']}")
        contents = [read_all(fd) for fd in files]
        size = sum(len(data) for data in contents) + 65536
        mount("tmpfs", "/sandbox", "tmpfs", flags, f"size={size},mode=755")
        for (path, mode), data in zip(request["files"], contents, strict=True):
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)  # a submission's folders
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.close(fd)
        mount(None, "/sandbox", None, MS_REMOUNT | MS_RDONLY | flags)

    def run_process(self, request, stdio, ready_write, go_read):
        """P: the run's limits and privileges; returns the code to run. It waits for its init
        to drop its capabilities first: else the program could start while it still held them."""
        try:
            if os.read(go_read, 1) != b"1":
                raise OSError("the run's init ended before it let the program go")
            os.close(go_read)
            os.setsid()
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            os.closerange(3, ready_write)
            os.closerange(ready_write + 1, 1 << 16)
            os.chdir(request.get("workdir", "/tmp"))
            for name, value in request["rlimits"].items():
                limit = getattr(resource, name)
                resource.setrlimit(limit, (value[0], value[1]))
            drop_capabilities(self.last_cap)
            if self.filter is not None:
                program = SockFprog(len(self.filter.raw) // 8, ctypes.addressof(self.filter))
                prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program))
            os.write(ready_write, b"1")
            os.close(ready_write)
        except BaseException as exc:
            failed(ready_write, exc)
        if request["exec"]:
            run_program(request["exec"])
        sys.argv[1:] = request["args"]
        return run_submission

    def report(self, message):
        self.sock.send(json.dumps(message).encode())


def own_pid_namespace():
    """Move the server into a pid namespace of its own user namespace, and return it.

    Each run's pid namespace is made by unsharing one for the next child, after which the
    server must set its own back; the kernel allows that only in a pid namespace owned by a
    user namespace the server has capabilities in, which bwrap's is not. The process that
    started stays behind as the namespace's parent, ending as the server does.
    """
    check(libc.unshare(CLONE_NEWPID), "unshare pid")
    server = os.fork()
    if server:
        os.closerange(3, 1 << 16)  # the socket stays with the server alone
        _, status = os.waitpid(server, 0)
        os._exit(max(0, os.waitstatus_to_exitcode(status)))
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.open("/proc/self/ns/pid", os.O_RDONLY)


def failed(ready_write, exc):
    """A set-up step of I or P failed: say which (C reports it), and end without running."""
    try:
        os.write(ready_write, b"0" + repr(exc).encode()[:4000])
    finally:
        os._exit(SETUP_FAILED)


def loopback_up():
    """The run's own loopback, up (as bwrap brings it up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def drop_capabilities(last_cap):
    """No capability left, now or after an exec (bounding and ambient sets emptied too)."""
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two all-zero (effective, permitted, inheritable) sets
    check(libc.capset(header, data), "capset")


def read_all(fd):
    """What a descriptor holds, to its end; it is closed."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def run_program(argv):
    """Any other language: its command replaces this process (an exec resets what the
    interpreter was; the rlimits, no capabilities and the seccomp filter stay). Signals the
    interpreter ignores (SIGPIPE, SIGXFSZ) get their default back first, as a cold run starts
    with: an ignored signal would survive the exec."""
    for number in range(1, signal.NSIG):
        if signal.getsignal(number) is signal.SIG_IGN:
            try:
                signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        os.write(2, f"failed to execute {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127)


def run_submission():
    """The submission, run as the script /sandbox/main.py in a fresh `__main__`; ends the
    process with the status a cold interpreter would."""
    import importlib.machinery
    import types

    main = types.ModuleType("__main__")
    main.__file__ = MAIN_PATH
    main.__builtins__ = __builtins__
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", MAIN_PATH)
    main.__cached__ = None
    sys.modules["__main__"] = main
    with open(MAIN_PATH, "rb") as f:
        source = f.read()
    try:
        code = compile(source, MAIN_PATH, "exec")
    except SyntaxError as exc:
        finish(main, uncaught(exc.with_traceback(None)))
    try:
        exec(code, main.__dict__)
    except SystemExit as exc:
        finish(main, exit_status(exc))
    except BaseException as exc:  # without this frame, as the interpreter prints it
        finish(main, uncaught(exc.with_traceback(exc.__traceback__.tb_next)))
    finish(main, 0)


def uncaught(exc):
    """Print an uncaught exception as the interpreter would; the exit status it then has."""
    try:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    except SystemExit as hook_exit:
        return exit_status(hook_exit)
    except BaseException:
        sys.__excepthook__(type(exc), exc, exc.__traceback__)
    return -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1


def exit_status(exc):
    """`sys.exit(code)`'s status, as the interpreter turns it into one."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    try:
        sys.stderr.write(f"{exc.code}\n")
    except Exception:
        pass
    return 1


def finish(main, status):
    """End as the interpreter's own exit does (threads joined, atexit handlers, __del__ of the
    program's objects, streams flushed), but without tearing down every module: that writes
    to, and so copies, every page inherited from the server (measured: 7 ms of a 12 ms run)."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    import atexit

    atexit._run_exitfuncs()
    main.__dict__.clear()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            if stream is sys.stdout and status == 0:
                status = 120  # the interpreter's status when its output could not be written
    if status < 0:  # died of a signal, as the interpreter does after a KeyboardInterrupt
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def server_socket():
    """The one socket the executor handed over (its number is the only inherited one)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                return socket.socket(fileno=fd)
        except OSError:
            continue
    raise SystemExit("fork server: no socket to the executor")


if __name__ == "__main__":
    server = Server(server_socket())
    run = server.serve()
    del server
    run()
