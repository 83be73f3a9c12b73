"""Every Redis key and channel name Crucible uses, in one place (as arq keeps them in
`constants.py`). All live under the deployment's namespace (`CRUCIBLE_NAMESPACE`), so several
stacks can share one Redis.

The Lua scripts build the same names from the namespace they are given; each script's header
lists the keys it touches, and `tests/unit/test_redis_keys.py` holds those names to this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """The key names of one namespace."""

    ns: str

    # -- evaluation records (evaluations/store.py, lua/status.lua) ---------------------------
    def record(self, eval_id: str) -> str:
        """hash: one evaluation."""
        return f"{self.ns}:eval:{eval_id}"

    def timeline(self, eval_id: str) -> str:
        """list of JSON status changes."""
        return f"{self.ns}:eval:{eval_id}:events"

    @property
    def evaluations(self) -> str:
        """zset eval id -> created (ms): every evaluation."""
        return f"{self.ns}:evals"

    def by_status(self, status: str) -> str:
        """zset eval id -> created (ms): evaluations in one status."""
        return f"{self.ns}:evals:{status}"

    def by_owner(self, owner: str) -> str:
        """zset eval id -> created (ms): one API key's evaluations."""
        return f"{self.ns}:evals:owner:{owner}"

    def active(self, owner: str) -> str:
        """set: one API key's evaluations queued or running (its in-progress quota)."""
        return f"{self.ns}:active:{owner}"

    def running(self, owner: str) -> str:
        """set: one API key's evaluations running now (not waiting for a retry): its
        `max_running`, held by the broker's fetch."""
        return f"{self.ns}:running:{owner}"

    @property
    def stats(self) -> str:
        """hash of counters kept across processes (submitted, final statuses, retries)."""
        return f"{self.ns}:stats"

    def minute(self, minute: int) -> str:
        """hash: one minute's final statuses and latency buckets (kept two hours)."""
        return f"{self.ns}:minute:{minute}"

    def latency(self, system: str) -> str:
        """list: the latest submit-to-result latencies (ms) of one queue system."""
        return f"{self.ns}:latency:{system}"

    def histogram(self, name: str) -> str:
        """hash: a histogram's buckets, sum and count (wait_ms, run_ms)."""
        return f"{self.ns}:hist:{name}"

    @property
    def events(self) -> str:
        """channel: every status change."""
        return f"{self.ns}:events"

    def events_of(self, eval_id: str) -> str:
        """channel: one evaluation's status changes."""
        return f"{self.ns}:events:{eval_id}"

    def celery_wire_taken(self, queue_list: str) -> str:
        """list: Celery messages taken from `queue_list` whose evaluation is not yet known to
        be recorded (app/celery/ingress.py records them again at start and every minute)."""
        return f"{self.ns}:celery-wire:taken:{queue_list}"

    def celery_wire_task(self, task_id: str) -> str:
        """string: the eval_id a Celery producer's task id stands for (its revokes name the task)."""
        return f"{self.ns}:celery-wire:task:{task_id}"

    def celery_wire_revoked(self, task_id: str) -> str:
        """string with a TTL: a revoke that came before its task was taken ("terminate" or "")."""
        return f"{self.ns}:celery-wire:revoked:{task_id}"

    @property
    def celery_wire_alive(self) -> str:
        """string with a TTL: set while a Celery ingress runs (renewed every second)."""
        return f"{self.ns}:celery-wire:alive"

    @property
    def celery_wire_counts(self) -> str:
        """hash: Celery messages taken ("accepted", "duplicate", "rejected") and by reason."""
        return f"{self.ns}:celery-wire:counts"

    def celery_results(self, backend: str) -> str:
        """hash Celery result key -> "<seq> <meta JSON>": the latest result record of each task
        whose producer reads results from another Redis or database (`backend`, its id), until
        app/celery/results.py has written it there (lua/status.lua fills it)."""
        return f"{self.ns}:results:celery:{backend}"

    def celery_results_due(self, backend: str) -> str:
        """list: result keys of `celery_results(backend)` changed since the relay last looked."""
        return f"{self.ns}:results:celery:{backend}:due"

    @property
    def readers_channel(self) -> str:
        """channel the event streams' shared subscription keeps for itself."""
        return f"{self.ns}:events:readers"

    # -- making room in a nearly full Redis (infra/redis_memory.py, lua/shed.lua) -------------
    @property
    def shed_trimmed(self) -> str:
        """string: creation time (ms) up to which finished evaluations' outputs were trimmed."""
        return f"{self.ns}:shed:trimmed"

    @property
    def shed_lock(self) -> str:
        """string with a TTL: held by the one process shedding now."""
        return f"{self.ns}:shed:lock"

    # -- the broker (actors/broker.py, actors/lua/dispatch.lua) ------------------------------
    def queue(self, level: str) -> str:
        """list of message ids ready to run, oldest first."""
        return f"{self.ns}:queue:{level}"

    def doorbell(self, level: str) -> str:
        """list an enqueue rings so idle workers wake at once."""
        return f"{self.ns}:doorbell:{level}"

    @property
    def delayed(self) -> str:
        """zset message id -> eta (ms)."""
        return f"{self.ns}:delayed"

    @property
    def messages(self) -> str:
        """hash message id -> encoded message."""
        return f"{self.ns}:msgs"

    @property
    def message_levels(self) -> str:
        """hash message id -> level."""
        return f"{self.ns}:level"

    @property
    def message_tasks(self) -> str:
        """hash message id -> task id."""
        return f"{self.ns}:task"

    @property
    def task_messages(self) -> str:
        """hash task id -> message id: how a cancel finds a queued message."""
        return f"{self.ns}:task_msg"

    @property
    def message_evaluations(self) -> str:
        """hash message id -> the evaluation its fetch marks running."""
        return f"{self.ns}:eval_of"

    @property
    def deliveries(self) -> str:
        """hash message id -> how many times it was fetched (attempt tokens "<id>#<n>")."""
        return f"{self.ns}:deliveries"

    def once(self, key: str) -> str:
        """marks an idempotency key (a scheduler tick) already enqueued; expires."""
        return f"{self.ns}:once:{key}"

    def acks(self, worker_id: str) -> str:
        """set of message ids a worker fetched and has not acked."""
        return f"{self.ns}:acks:{worker_id}"

    @property
    def heartbeats(self) -> str:
        """zset worker id -> last heartbeat (ms, Redis's clock)."""
        return f"{self.ns}:heartbeats"

    @property
    def everything(self) -> str:
        """A SCAN pattern matching every key of the namespace."""
        return f"{self.ns}:*"

    # -- dead letters (actors/dlq.py, middleware/dead_letter.py) -----------------------------
    @property
    def dlq(self) -> str:
        """zset task id -> last failure (ms)."""
        return f"{self.ns}:dlq"

    @property
    def dlq_entries(self) -> str:
        """hash task id -> JSON entry."""
        return f"{self.ns}:dlq:entries"

    # -- workers and schedulers --------------------------------------------------------------
    @property
    def workers(self) -> str:
        """zset worker id -> last published (ms)."""
        return f"{self.ns}:workers"

    def worker(self, worker_id: str) -> str:
        """hash: one worker process's published stats."""
        return f"{self.ns}:worker:{worker_id}"

    @property
    def schedulers(self) -> str:
        """zset scheduler name -> last beat (ms)."""
        return f"{self.ns}:schedulers"

    @property
    def scheduler_runs(self) -> str:
        """list of JSON runs of the scheduled actors, newest first."""
        return f"{self.ns}:scheduler:runs"

    @property
    def results(self) -> str:
        """Prefix of Dramatiq's result backend (actors' return values, for the Celery shim)."""
        return f"{self.ns}:results"

    # -- API keys and quotas (evaluations/api_keys.py, evaluations/quotas.py) ----------------
    @property
    def api_keys(self) -> str:
        """hash key id -> JSON record."""
        return f"{self.ns}:keys"

    @property
    def api_key_hashes(self) -> str:
        """hash SHA-256 of a key -> key id."""
        return f"{self.ns}:keyhash"

    @property
    def webhook_secrets(self) -> str:
        """hash key id -> the secret its evaluations' webhooks are signed with."""
        return f"{self.ns}:webhook-secrets"

    # -- webhooks (evaluations/webhooks.py, actors/callbacks.py, lua/status.lua) -------------
    @property
    def callbacks_due(self) -> str:
        """zset "<eval_id> <final at ms>" -> when to hand it to a delivery (ms): finished
        evaluations whose webhook is still to be sent; a relay taking one pushes it a lease
        later, and drops it once the delivery message is enqueued."""
        return f"{self.ns}:callbacks:due"

    def callbacks_in_flight(self, owner: str) -> str:
        """string: how many of a key's webhook deliveries are being attempted now (expires)."""
        return f"{self.ns}:callbacks:inflight:{owner}"

    @property
    def callbacks_bell(self) -> str:
        """list rung when a webhook becomes due, so a relay wakes at once."""
        return f"{self.ns}:callbacks:bell"

    def bucket(self, key_id: str) -> str:
        """hash: one key's token bucket for submissions."""
        return f"{self.ns}:bucket:{key_id}"

    def stored_bytes(self, key_id: str) -> str:
        """prefix of counters (":<hour>" follows): bytes one key's finished evaluations stored."""
        return f"{self.ns}:stored:{key_id}"

    def read_bucket(self, key_id: str) -> str:
        """hash: one key's token bucket for reads."""
        return f"{self.ns}:reads:{key_id}"

    def streams(self, key_id: str) -> str:
        """counter: one key's open event streams."""
        return f"{self.ns}:streams:{key_id}"

    # -- migration from the legacy Celery deployment (app/migration/control.py) ----------------------
    @property
    def migration(self) -> str:
        """hash: the split's knobs as changed at run time."""
        return f"{self.ns}:migration"

    @property
    def legacy_pending(self) -> str:
        """set: evaluations sent to the legacy deployment, not yet finished."""
        return f"{self.ns}:legacy:pending"

    @property
    def shadow_pending(self) -> str:
        """set: evaluations whose shadow copy is not yet compared."""
        return f"{self.ns}:shadow:pending"

    @property
    def shadow_mismatches(self) -> str:
        """list of JSON mismatches between systems, newest first."""
        return f"{self.ns}:shadow:mismatches"
