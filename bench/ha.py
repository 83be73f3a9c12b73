"""A Redis without a single point of failure on this machine: the embedded Valkey as primary, a
replica and three Sentinels, each its own process on loopback, in a temporary folder.

For the fail-over test (tests/e2e/test_failover.py) and `bench api --replicas`: nothing here is
used by the service itself.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app.cli.ha import MASTER, sentinel_conf, server_args, valkey_binary, wait_in_step
from bench.stack import free_port


@dataclass
class HaRedis:
    """Where the pieces listen, and their processes (by role: primary, replica, sentinel-N)."""

    folder: Path
    primary_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def sentinels(self) -> str:
        """`REDIS_SENTINELS`'s value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        """The settings a Crucible piece needs to use it."""
        return {"REDIS_SENTINELS": self.sentinels, "REDIS_SENTINEL_MASTER": MASTER}

    def master_port(self) -> int | None:
        """The port the Sentinels name as master now (None: none answers)."""
        for port in self.sentinel_ports:
            try:
                client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
                answer = client.sentinel_get_master_addr_by_name(MASTER)
                client.close()
                if answer:
                    return int(answer[1])
            except redis.RedisError:
                continue
        return None

    def kill(self, role: str) -> None:
        """SIGKILL one piece (`primary`, `replica-0`, `sentinel-0`...)."""
        process = self.processes[role]
        process.send_signal(signal.SIGKILL)
        process.wait()

    @property
    def replica_port(self) -> int:
        return self.replica_ports[0]

    def wait_replicated(self, seconds: float = 15) -> None:
        """Until the replica is in sync and every Sentinel knows both and the others."""
        if not wait_in_step(self.primary_port, self.sentinel_ports, len(self.replica_ports), seconds):
            raise TimeoutError(f"primary, replica and Sentinels not in step within {seconds}s")


def _start(binary: Path, folder: Path, role: str, args: list[str]) -> subprocess.Popen[bytes]:
    log = (folder / f"{role}.log").open("wb")
    return subprocess.Popen([str(binary), *args], cwd=folder, stdout=log, stderr=subprocess.STDOUT)


def _wait_ping(port: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.2).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answered on port {port} within {seconds}s")


@contextmanager
def ha_redis(
    replicas: int = 1, down_after_ms: int = 1000, failover_timeout_ms: int = 5000
) -> Iterator[HaRedis]:
    """Primary, `replicas` replicas and three Sentinels (quorum 2), stopped and removed
    afterwards. Roles: `primary`, `replica-0`..., `sentinel-0`..."""
    binary = valkey_binary()
    with tempfile.TemporaryDirectory(prefix="crucible-ha-") as tmp:
        folder = Path(tmp)
        ha = HaRedis(
            folder, free_port(), [free_port() for _ in range(replicas)], [free_port() for _ in range(3)]
        )
        try:
            roles = [("primary", ha.primary_port, None)]
            roles += [(f"replica-{n}", port, ha.primary_port) for n, port in enumerate(ha.replica_ports)]
            for role, port, follows in roles:
                (folder / role).mkdir()
                ha.processes[role] = _start(
                    binary, folder / role, role, server_args(port, folder / role, replica_of=follows)
                )
                _wait_ping(port)
            for n, port in enumerate(ha.sentinel_ports):
                conf = folder / f"sentinel-{n}.conf"
                conf.write_text(
                    sentinel_conf(port, folder, ha.primary_port, down_after_ms, failover_timeout_ms)
                )
                ha.processes[f"sentinel-{n}"] = _start(
                    binary, folder, f"sentinel-{n}", [str(conf), "--sentinel"]
                )
            for port in ha.sentinel_ports:
                _wait_ping(port)
            ha.wait_replicated()
            yield ha
        finally:
            for process in ha.processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in ha.processes.values():
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
