"""A free local TCP port, for `crucible up`'s embedded Valkey and for the tests that start pieces.

Kept on its own so the test helpers (`bench/stack.py`) share it without importing a command.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
