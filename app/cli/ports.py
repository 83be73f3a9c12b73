"""Local TCP ports: a free one (for `crucible up`'s embedded Valkey and the tests that start
pieces), whether one is free, who holds one that is not, and the ports `crucible up` needs.

Kept on its own so the test helpers (`bench/stack.py`) share it without importing a command.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from infra.settings import Settings

#: The command line of a piece of a Crucible stack (`crucible api`, `python -m app.cli executor`...).
CRUCIBLE_PIECE = re.compile(
    r"(?:\bapp\.cli|(?:^|/)crucible) "
    r"(?:api|dashboard|executor|worker|scheduler|up|embedded-redis|celery-ingress)\b"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (a port in TIME_WAIT counts as free,
    as it does for uvicorn and Valkey, which bind with SO_REUSEADDR; IPv4 or IPv6 as `host` is)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]  # socket.gaierror if `host` does not resolve
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def port_holder(port: int) -> tuple[int, str] | None:
    """The pid and command line of the process listening on `port`, when this user may see it."""
    import psutil

    try:
        listeners = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in listeners:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return conn.pid, " ".join(" ".join(psutil.Process(conn.pid).cmdline()).split())[:80]
            except psutil.Error:
                return conn.pid, "?"
    return None


@dataclass(frozen=True)
class Listener:
    """A port `crucible up` will have a piece listen on, and the setting that moves it."""

    piece: str
    host: str
    port: int
    variable: str

    @property
    def url(self) -> str:
        """Where to reach it from this machine."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def listeners(s: Settings) -> list[Listener]:
    return [
        Listener("API", s.api_host, s.api_port, "CRUCIBLE_API_PORT"),
        Listener("dashboard", s.dashboard_host, s.dashboard_port, "DASHBOARD_PORT"),
        Listener("executor", s.executor_host, s.executor_port, "EXECUTOR_PORT"),
    ]


def port_problem(wanted: list[Listener]) -> str | None:
    """One line on the first port that cannot be used: which, who holds it, what moves it."""
    seen: dict[int, Listener] = {}
    for listener in wanted:
        if listener.port in seen:
            other = seen[listener.port]
            return (f"the {listener.piece} and the {other.piece} are both given port {listener.port}; "
                    f"set {listener.variable} or {other.variable} to another port")  # fmt: skip
        seen[listener.port] = listener
        try:
            free = port_is_free(listener.host, listener.port)
        except (socket.gaierror, UnicodeError):
            return f"the {listener.piece}'s host {listener.host!r} is not an address of this machine"
        if not free:
            return f"port {listener.port} ({listener.piece}) is taken{_by(listener)}"
    return None


def _by(listener: Listener) -> str:
    """Who holds the port, and what to do about it."""
    holder = port_holder(listener.port)
    if holder is None:
        return f" by another process; set {listener.variable} to another port"
    pid, command = holder
    if CRUCIBLE_PIECE.search(command):
        return (f" by pid {pid} ({command}), a piece of another Crucible stack: stop that stack, "
                f"or set {listener.variable} to another port")  # fmt: skip
    return f" by pid {pid} ({command}); set {listener.variable} to another port"
