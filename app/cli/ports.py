"""Local TCP ports: a free one (for `crucible up`'s embedded Valkey and the tests that start
pieces), whether one is free, and who holds one that is not.

Kept on its own so the test helpers (`bench/stack.py`) share it without importing a command.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (a port in TIME_WAIT counts as free,
    as it does for uvicorn and Valkey, which bind with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """`pid N (command line)` of the process listening on `port`, when this user may see it."""
    import psutil

    try:
        listeners = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in listeners:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                command = " ".join(" ".join(psutil.Process(conn.pid).cmdline()).split())[:80]
            except psutil.Error:
                command = "?"
            return f"pid {conn.pid} ({command})"
    return None
