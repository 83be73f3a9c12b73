"""CPU time by process role (API, workers, executor, sandbox, Valkey), read from /proc: what an
evaluation costs, and where.

A role is a process and its descendants: its own time, what its living descendants used, and
what its reaped children used (the kernel adds a child's time to its parent's once it is
reaped, so short-lived sandboxes still count). The sandbox is everything under the executor
(cold bwraps and fork servers, with every run they forked); the executor is its own time.
Whatever else the machine did meanwhile (kernel threads, the benchmark's own client) is `other`.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
ROLES = ("api", "workers", "executor", "sandbox", "valkey")


@dataclass(frozen=True)
class Times:
    own: float
    reaped: float


def _stat(pid: int) -> tuple[int, Times] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the command: state, ppid, ... utime (12th), stime, cutime, cstime
    ticks = [int(v) for v in fields[11:15]]
    return int(fields[1]), Times((ticks[0] + ticks[1]) * TICK_S, (ticks[2] + ticks[3]) * TICK_S)


def _processes() -> dict[int, tuple[int, Times]]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))):
            found[int(name)] = stat
    return found


def _descendants(top: int, table: Mapping[int, tuple[int, Times]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [top]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far by role, for the stack whose top processes are `pids` (api, workers,
    executor, valkey), plus the machine's total and the other user processes' (`outside`)."""
    table = _processes()
    out = {role: 0.0 for role in ROLES}
    seen = {os.getpid(), *_descendants(os.getpid(), table)}
    for role, top in pids.items():
        if top not in table:
            continue
        tree = _descendants(top, table)
        seen.update((top, *tree))
        below = sum(table[p][1].own + table[p][1].reaped for p in tree)
        own, reaped = table[top][1].own, table[top][1].reaped
        if role == "executor":
            out["executor"] += own
            out["sandbox"] += reaped + below
        else:
            out[role] += own + reaped + below
    out["outside"] = outside_s(table, seen)
    out["machine"] = machine_cpu_s()
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["client"] = me.ru_utime + me.ru_stime
    return out


def outside_s(table: Mapping[int, tuple[int, Times]], seen: set[int]) -> float:
    """CPU seconds of the user processes living now that are neither the stack's nor this
    client's (another job on the host): between two snapshots, roughly how much of `other`
    was not the stack's doing. Kernel threads are left out: part of their work (softirqs,
    loopback traffic) is the stack's."""
    kernel = {2, *_descendants(2, table)}
    return sum(t.own + t.reaped for pid, (_, t) in table.items() if pid not in seen and pid not in kernel)


def machine_cpu_s() -> float:
    """CPU seconds every core spent busy since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) * TICK_S


def per_run_ms(before: Mapping[str, float], after: Mapping[str, float], runs: int) -> dict[str, float]:
    """CPU ms per evaluation by role between two snapshots; `other` is the rest of the machine's."""
    spent = {role: (after[role] - before[role]) * 1000 / runs for role in (*ROLES, "machine", "client")}
    spent["other"] = spent.pop("machine") - sum(spent[role] for role in ROLES) - spent.pop("client")
    spent["total"] = sum(spent[role] for role in ROLES) + spent["other"]
    return spent
