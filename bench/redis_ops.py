"""Redis operations per evaluation: what one hello world costs Redis, by command, and the
background traffic of an idle stack, to size one Redis primary.

    .venv/bin/python -m bench redis-ops [--evaluations 200] [--cpu-evaluations 2000]
                                        [--idle 10] [--json out.json]

A fresh embedded Valkey (or REDIS_URL), one executor, one worker (2 processes x 4 threads) and
the API; a warm-up of 50 hello worlds (scripts loaded, counters made). Then, with MONITOR on
(commands called from Lua scripts show as such), after `CONFIG RESETSTAT`:

- idle: `--idle` seconds with nothing submitted: commands per second, by process;
- submit: `--evaluations` hello worlds through `POST /api/eval`, 64 in flight, until every one
  is `completed` (this process watches `ZCARD` of the completed index; its own commands are
  left out); idle traffic over the same time is subtracted;
- + get: the same, each followed by one `GET /api/eval/{id}` once completed;
- + events: the same, each followed through `GET /api/eval/{id}/events` from its submission.

Last, without MONITOR, `--cpu-evaluations` hello worlds as in `submit`: Valkey's CPU
(`used_cpu_sys` + `used_cpu_user`) over them, less the idle CPU over the same time, per
evaluation, and 1 / that: the evaluations/s one Redis core would carry if Redis were the only
bound (a derived ceiling, not a measured rate), next to the rate the whole stack reached.
`INFO commandstats` counts commands called from scripts as well (checked at start).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import redis

from bench.common import HELLO, Stack, print_table, progress, redis_server, stack, write_json
from evaluations.redis_keys import RedisKeys

IN_FLIGHT = 64


class Monitor:
    """MONITOR in a thread: (role, command, "script"|"call") counts, where role is the stack
    process the connection belongs to; this process's own connections are left out."""

    def __init__(self, url: str, roles: dict[int, str], mine: set[int]) -> None:
        self.url, self.roles, self.mine = url, roles, mine
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.marker = ""
        self.ready = threading.Event()
        self.done = threading.Event()

    def start(self) -> None:
        self.counts.clear()
        self.marker = f"bench-redis-ops-{uuid.uuid4().hex}"
        self.ready.clear()
        self.done.clear()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        client = redis.Redis.from_url(self.url)
        with client.monitor() as monitor:
            self.ready.set()
            for entry in monitor.listen():
                if self.marker in entry["command"]:
                    break
                if entry.get("client_type") == "lua":
                    role, kind = "script", "script"
                else:
                    port = int(entry.get("client_port") or 0)
                    if port in self.mine:
                        continue
                    role, kind = self.roles.get(port, "other"), "call"
                name = label(entry["command"].split(" ", 5))
                self.counts[(role, name, kind)] += 1
        client.close()
        self.done.set()

    def stop(self, client: redis.Redis) -> Counter[tuple[str, str, str]]:
        client.echo(self.marker)
        self.done.wait(60)
        return Counter(self.counts)


#: dispatch.lua's commands (its ARGV[1]): an EVALSHA of it is labelled with the command
DISPATCH = {"enqueue", "submit", "enqueue_once", "retry", "cancel", "fetch", "heartbeat", "ack",
            "nack", "requeue", "leave", "sweep", "sizes"}  # fmt: skip


def label(words: list[str]) -> str:
    """A command's name; an EVALSHA of dispatch.lua's with its command ("EVALSHA fetch")."""
    name = words[0].strip('"').upper()
    if name == "EVALSHA" and len(words) > 4 and words[4].strip('"') in DISPATCH:
        return f"EVALSHA {words[4].strip(chr(34))}"
    return "EVALSHA other" if name == "EVALSHA" else name


def client_ports(running: Stack) -> tuple[dict[int, str], dict[str, int]]:
    """Local port of each Redis connection of the stack's processes -> role ("worker", "api"),
    and how many processes of each role hold one."""
    port = redis.Redis.from_url(running.url).connection_pool.connection_kwargs.get("port", 6379)
    roles: dict[int, str] = {}
    processes: Counter[str] = Counter()
    for role in ("workers", "api"):
        top = psutil.Process(running.pids[role])
        for proc in [top, *top.children(recursive=True)]:
            try:
                connections = proc.net_connections("tcp")
            except psutil.Error:
                continue
            ports = [c.laddr.port for c in connections if c.raddr and c.raddr.port == port]
            if ports:
                processes[role] += 1
                roles.update(dict.fromkeys(ports, role.rstrip("s")))
    return roles, dict(processes)


async def run(running: Stack, client: redis.Redis, count: int, follow: str = "") -> float:
    """`count` hello worlds, IN_FLIGHT at a time, each then read (`follow` "get") or followed
    from its submission ("events"); returns the seconds until every one was completed."""
    done_key = RedisKeys(running.namespace).by_status("completed")
    before = client.zcard(done_key)
    gate = asyncio.Semaphore(IN_FLIGHT)
    start = time.perf_counter()
    async with running.client(limits=httpx.Limits(max_connections=IN_FLIGHT * 2)) as http:

        async def one() -> None:
            async with gate:
                response = await http.post("/api/eval", json={"code": HELLO})
                response.raise_for_status()
                eval_id = response.json()["eval_id"]
                if follow == "events":
                    async with http.stream("GET", f"/api/eval/{eval_id}/events") as events:
                        events.raise_for_status()
                        async for _ in events.aiter_lines():
                            pass
            if follow == "get":
                await until(lambda: client.zscore(done_key, eval_id) is not None)
                (await http.get(f"/api/eval/{eval_id}")).raise_for_status()

        with progress(count, follow or "submit", "eval") as bar:
            sending = asyncio.gather(*(one() for _ in range(count)))
            while (finished := client.zcard(done_key) - before) < count:
                bar.update(finished - bar.n)
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - start
            await sending
    return elapsed


async def until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 (a Redis read, not an event of this process)
        await asyncio.sleep(0.05)


def cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measured(
    client: redis.Redis, monitor: Monitor | None, job: Callable[[], Awaitable[float]]
) -> tuple[float, float, Counter[tuple[str, str, str]]]:
    """Run `job` after CONFIG RESETSTAT: (seconds, Valkey CPU seconds, MONITOR's counts)."""
    if monitor:
        monitor.start()
    client.config_resetstat()
    cpu = cpu_seconds(client)
    seconds = asyncio.run(job())
    time.sleep(0.5)  # the last acknowledgements
    seconds_cpu = cpu_seconds(client) - cpu
    counts = monitor.stop(client) if monitor else Counter()
    return seconds + 0.5, seconds_cpu, counts


def scripts_counted(client: redis.Redis) -> bool:
    """Whether INFO commandstats counts commands a script calls (Redis 7 and Valkey do)."""
    client.config_resetstat()
    client.eval("redis.call('echo', 'x') redis.call('echo', 'y') return 1", 0)
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_echo", {}).get("calls", 0)) == 2


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench redis-ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--evaluations", type=int, default=200, help="per counted phase")
    parser.add_argument("--cpu-evaluations", type=int, default=2000, help="for Redis CPU")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle traffic")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    n = args.evaluations
    with redis_server() as url, stack(url) as running:
        client = redis.Redis.from_url(url, decode_responses=True)
        mine = {int(client.client_info()["addr"].rsplit(":", 1)[1])}
        in_scripts = scripts_counted(client)
        asyncio.run(run(running, client, 50))
        roles, processes = client_ports(running)
        monitor = Monitor(url, roles, mine)
        time.sleep(1)

        async def idle() -> float:
            await asyncio.sleep(args.idle)
            return args.idle

        idle_s, idle_cpu, idle_counts = measured(client, monitor, idle)
        phases: dict[str, Counter[tuple[str, str, str]]] = {}
        seconds: dict[str, float] = {}
        for follow, name in (("", "submit"), ("get", "+ get"), ("events", "+ events")):
            seconds[name], _, phases[name] = measured(
                client, monitor, lambda follow=follow: run(running, client, n, follow)
            )
        cpu_n = args.cpu_evaluations
        cpu_s, cpu_used, _ = measured(client, None, lambda: run(running, client, cpu_n))
        version = client.info("server").get("valkey_version") or client.info("server")["redis_version"]
        client.close()

    def per_eval(name: str) -> dict[tuple[str, str], float]:
        """Commands per evaluation by (command, kind), less idle traffic over the phase."""
        out: Counter[tuple[str, str]] = Counter()
        for (_, command, kind), calls in phases[name].items():
            out[(command, kind)] += calls
        for (_, command, kind), calls in idle_counts.items():
            out[(command, kind)] -= calls * seconds[name] / idle_s
        return {key: value / n for key, value in out.items() if value / n >= 0.005}

    table = {name: per_eval(name) for name in phases}
    keys = sorted(set().union(*table.values()), key=lambda k: (k[1], -table["submit"].get(k, 0)))
    rows = [[f"{command} ({kind})", *(f"{table[p].get((command, kind), 0):.2f}" for p in table)]
            for command, kind in keys]  # fmt: skip
    totals = {p: {kind: sum(v for (_, k), v in table[p].items() if k == kind) for kind in ("call", "script")}
              for p in table}  # fmt: skip
    rows.append(["calls sent (total)", *(f"{totals[p]['call']:.1f}" for p in table)])
    rows.append(["called by scripts (total)", *(f"{totals[p]['script']:.1f}" for p in table)])
    print_table(f"Redis commands per hello world (Valkey {version}; idle traffic subtracted)",
                ["command (sent / by a script)", *table], rows)  # fmt: skip

    idle_by: Counter[tuple[str, str]] = Counter()
    for (role, command, kind), calls in idle_counts.items():
        idle_by[(role, f"{command} ({kind})")] += calls
    ordered = sorted(idle_by.items(), key=lambda item: (item[0][0], -item[1]))
    idle_rows = [[role, command, f"{calls / idle_s:.2f}",
                  f"{calls / idle_s / processes[role + 's']:.2f}" if role + "s" in processes else "-"]
                 for (role, command), calls in ordered]  # fmt: skip
    print_table(f"Idle stack: commands per second ({processes.get('workers', 0)} worker processes "
                f"with a Redis connection, {processes.get('api', 0)} API)",
                ["process", "command", "per second", "per process"], idle_rows)  # fmt: skip

    idle_cpu_rate = idle_cpu / idle_s
    net_cpu = cpu_used - idle_cpu_rate * cpu_s
    cpu_per_eval = net_cpu / cpu_n
    figures: dict[str, object] = {
        "valkey_version": version,
        "commandstats_counts_script_calls": in_scripts,
        "evaluations": n,
        "commands_per_evaluation": {
            p: {f"{c} ({k})": round(v, 3) for (c, k), v in table[p].items()} for p in table
        },
        "totals_per_evaluation": totals,
        "idle_seconds": idle_s,
        "idle_processes": processes,
        "idle_commands_per_second": {f"{r}: {c}": round(v / idle_s, 3) for (r, c), v in idle_by.items()},
        "idle_cpu_share": round(idle_cpu_rate, 5),
        "cpu_evaluations": cpu_n,
        "cpu_seconds": round(cpu_s, 2),
        "stack_evaluations_per_s": round(cpu_n / cpu_s, 1),
        "redis_cpu_s": round(cpu_used, 3),
        "redis_cpu_us_per_evaluation": round(cpu_per_eval * 1e6, 1),
        "derived_ceiling_per_redis_core": round(1 / cpu_per_eval) if cpu_per_eval > 0 else None,
    }
    print_table(
        "Redis CPU per hello world (no MONITOR)",
        ["evaluations", "stack rate", "Redis CPU", "idle CPU", "per evaluation", "1 core ceiling"],
        [[cpu_n, f"{cpu_n / cpu_s:.1f}/s", f"{cpu_used:.2f} s", f"{idle_cpu_rate * 100:.1f} %",
          f"{cpu_per_eval * 1e6:.0f} µs", f"{1 / cpu_per_eval:,.0f}/s" if cpu_per_eval > 0 else "-"]],
    )  # fmt: skip
    print(f"(INFO commandstats counts commands called from scripts: {'yes' if in_scripts else 'no'})")
    write_json(args.json, "redis-ops", figures)
    return figures


if __name__ == "__main__":
    main()
