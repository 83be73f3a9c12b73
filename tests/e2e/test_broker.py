"""The priority broker's Redis operations, against a real Redis, without worker processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict

import dramatiq
import pytest
import redis.asyncio as aioredis
from dramatiq import Worker
from dramatiq.broker import MessageProxy

from actors.broker import AsyncEnqueuer, PriorityBroker, PriorityConsumer
from evaluations.json_codec import MessageEncoder
from evaluations.queue import QUEUE_NAME
from evaluations.store import StatusChange
from middleware.dead_letter import DeadLetters
from middleware.priority import PriorityRouting
from middleware.running import MarkRunning
from middleware.state import (
    FETCH_MARK,
    PUBLISH,
    REDIS_ID_OPTION,
    SETTLE,
    STATUS_CHANGE,
    attempt_of,
    delivery_expectation,
    record_failure,
)


def make_broker(redis_url: str, namespace: str, **options: int) -> PriorityBroker:
    return PriorityBroker(url=redis_url, namespace=namespace, middleware=[PriorityRouting()], **options)


@pytest.fixture
def broker(redis_url: str, namespace: str) -> Iterator[PriorityBroker]:
    broker = make_broker(redis_url, namespace, heartbeat_timeout_ms=300)
    yield broker
    broker.client.close()


def declare(broker: PriorityBroker) -> dramatiq.Actor:
    def job(n: int) -> None: ...

    return dramatiq.actor(job, broker=broker, queue_name=QUEUE_NAME)


def fetch_all(consumer: PriorityConsumer) -> list[int]:
    taken = []
    while (message := next(consumer)) is not None:
        taken.append(message.args[0])
        if len(taken) == consumer.slots:
            break
    return taken


def test_fetch_takes_high_then_default_then_low_oldest_first(broker: PriorityBroker) -> None:
    job = declare(broker)
    for n, level in [(1, "low"), (2, "default"), (3, "low"), (4, "high"), (5, "default"), (6, "high")]:
        job.send_with_options(args=(n,), queue_level=level)
    consumer = PriorityConsumer(broker, slots=6)
    assert fetch_all(consumer) == [4, 6, 2, 5, 1, 3]


def test_fetch_takes_no_more_than_the_free_slots(broker: PriorityBroker) -> None:
    job = declare(broker)
    for n in range(5):
        job.send_with_options(args=(n,), queue_level="low")
    consumer = PriorityConsumer(broker, slots=2)
    first, second = next(consumer), next(consumer)
    assert [first.args[0], second.args[0]] == [0, 1]
    assert broker.queue_sizes()["low"] == 3
    job.send_with_options(args=(99,), queue_level="high")
    consumer.ack(first)
    assert next(consumer).args[0] == 99  # the freed slot goes to the high message


def test_a_message_a_settle_fetched_goes_to_the_consumer_restarted_meanwhile(broker: PriorityBroker) -> None:
    """Dramatiq settles from the worker thread with the consumer it had: after a connection
    error that one is closed, and its replacement comes 3 s later. A settle in between fetched
    the freed slot's next message into the closed consumer, where nobody took it, and its slot
    stayed busy for good: the worker ran nothing more."""
    job = declare(broker)
    for n in range(3):
        job.send_with_options(args=(n,), queue_level="low")
    closed = PriorityConsumer(broker, slots=2)
    first, _ = next(closed), next(closed)
    restarted = PriorityConsumer(broker, slots=2)
    closed.ack(first)  # the worker thread's settle, through the consumer it had
    assert next(restarted).args[0] == 2


def test_actor_option_sets_the_default_level(broker: PriorityBroker) -> None:
    def urgent() -> None: ...

    dramatiq.actor(urgent, broker=broker, queue_name=QUEUE_NAME, queue_level="high").send()
    assert broker.queue_sizes()["high"] == 1
    with pytest.raises(ValueError, match="queue_level"):
        dramatiq.actor(lambda: None, actor_name="bad", broker=broker, queue_name=QUEUE_NAME, queue_level="x")


def test_delayed_message_waits_for_its_time(broker: PriorityBroker) -> None:
    job = declare(broker)
    job.send_with_options(args=(1,), delay=400)
    consumer = PriorityConsumer(broker, slots=1)
    assert broker.queue_sizes()["delayed"] == 1
    assert next(consumer) is None
    time.sleep(0.5)
    assert next(consumer).args[0] == 1


def test_dead_workers_messages_come_back_at_the_head(redis_url: str, namespace: str) -> None:
    crashed = make_broker(redis_url, namespace, heartbeat_timeout_ms=300)
    survivor = make_broker(redis_url, namespace, heartbeat_timeout_ms=300)
    job = declare(crashed)
    declare(survivor)
    for n in range(3):
        job.send_with_options(args=(n,), queue_level="default")
    taken = next(PriorityConsumer(crashed, slots=1))
    assert taken.args[0] == 0
    assert crashed.queue_sizes()["in_flight"] == 1
    # the crashed worker never acks nor heartbeats again
    time.sleep(0.4)
    assert next(PriorityConsumer(survivor, slots=1)).args[0] == 0


def test_clean_leave_hands_unacked_messages_back(redis_url: str, namespace: str) -> None:
    leaving = make_broker(redis_url, namespace)
    job = declare(leaving)
    job.send_with_options(args=(7,), queue_level="low")
    next(PriorityConsumer(leaving, slots=1))
    assert leaving.queue_sizes()["low"] == 0
    leaving.close()
    other = make_broker(redis_url, namespace)
    declare(other)
    assert other.queue_sizes()["low"] == 1


def test_ack_forgets_and_nack_leaves_a_dead_letter_entry(broker: PriorityBroker) -> None:
    job = declare(broker)
    job.send(1)
    job.send(2)
    consumer = PriorityConsumer(broker, slots=2)
    first, second = next(consumer), next(consumer)
    consumer.ack(first)
    consumer.nack(second)
    assert broker.queue_sizes() == {"high": 0, "default": 0, "low": 0, "delayed": 0, "in_flight": 0}
    assert broker.client.zrange(f"{broker.namespace}:dlq", 0, -1) == [second.message_id.encode()]
    assert broker.client.hexists(f"{broker.namespace}:dlq:entries", second.message_id)
    assert not broker.client.hlen(f"{broker.namespace}:msgs")


@pytest.mark.parametrize("scripts_lost", [False, True])
def test_ack_commits_the_result_the_actor_left_in_the_same_round_trip(
    broker: PriorityBroker, scripts_lost: bool
) -> None:
    job = declare(broker)
    job.send(1)
    consumer = PriorityConsumer(broker, slots=1)
    message = next(consumer)
    record = f"{broker.namespace}:eval:e1"
    broker.client.hset(record, mapping={"status": "running", "attempt": "a1", "language": "python"})
    if scripts_lost:  # as after a Redis restart: the scripts are sent again, nothing is doubled
        broker.client.script_flush()
    change = StatusChange("e1", "completed", ("running",), {"output": "hi\n"}, expect={"attempt": "a1"})
    message.options[STATUS_CHANGE] = asdict(change)
    # a run's last chunks of live output, published in the same MULTI just before the status
    channel = f"{broker.namespace}:events:e1"
    message.options[PUBLISH] = [[channel, '{"type":"output","data":"hi\\n"}']]
    listener = broker.client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(channel)
    listener.get_message(timeout=1)  # the subscription's confirmation
    consumer.ack(message)
    assert broker.client.hget(record, "status") == b"completed"
    assert broker.client.hget(record, "output") == b"hi\n"
    assert broker.client.hget(f"{broker.namespace}:stats", "final:dramatiq:completed") == b"1"
    assert broker.queue_sizes()["in_flight"] == 0 and not broker.client.hlen(f"{broker.namespace}:msgs")
    heard = [json.loads(m["data"]) for m in iter(lambda: listener.get_message(timeout=1), None)]
    listener.close()
    assert heard[0] == {"type": "output", "data": "hi\n"} and heard[1]["status"] == "completed"
    assert len(heard) == 2


def test_a_stale_attempts_result_is_refused_and_its_message_still_settled(broker: PriorityBroker) -> None:
    job = declare(broker)
    job.send(1)
    consumer = PriorityConsumer(broker, slots=1)
    message = next(consumer)
    record = f"{broker.namespace}:eval:e2"
    broker.client.hset(record, mapping={"status": "running", "attempt": "newer"})
    change = StatusChange("e2", "failed", ("running",), {"error": "late"}, expect={"attempt": "older"})
    message.options[STATUS_CHANGE] = asdict(change)
    consumer.ack(message)
    assert broker.client.hget(record, "status") == b"running"
    assert not broker.client.hlen(f"{broker.namespace}:msgs")


def test_a_worker_marks_an_evaluation_running_and_skips_a_cancelled_one(
    redis_url: str, namespace: str
) -> None:
    broker = PriorityBroker(url=redis_url, namespace=namespace, middleware=[PriorityRouting(), MarkRunning()])
    seen = []

    @dramatiq.actor(broker=broker, queue_name=QUEUE_NAME, records_status=True)
    def job(eval_id: str) -> None:
        seen.append((eval_id, broker.client.hget(f"{namespace}:eval:{eval_id}", "status")))

    broker.client.hset(f"{namespace}:eval:a", mapping={"status": "queued"})
    broker.client.hset(f"{namespace}:eval:b", mapping={"status": "cancelled"})
    broker.client.hset(f"{namespace}:eval:c", mapping={"status": "queued"})
    job.send(eval_id="a")
    job.send(eval_id="b")
    # c's message comes without its mark (as a worker of an older release enqueued it): the
    # middleware marks it running itself
    sent = job.send(eval_id="c")
    broker.client.hdel(f"{namespace}:eval_of", sent.options[REDIS_ID_OPTION])
    worker = Worker(broker, worker_threads=1)
    worker.start()
    try:
        broker.join(QUEUE_NAME, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        broker.client.close()
    assert seen == [("a", b"running"), ("c", b"running")]  # running before the actor started; b never ran
    for eval_id in "ac":
        record = broker.client.hgetall(f"{namespace}:eval:{eval_id}")
        assert record[b"attempt"] and record[b"worker"] and record[b"started_at"]
    assert broker.client.hget(f"{namespace}:eval:b", "status") == b"cancelled"


@pytest.fixture
def two_workers(redis_url: str, namespace: str) -> Iterator[tuple[PriorityBroker, PriorityBroker]]:
    """Two workers' brokers declaring an actor that records statuses, and evaluation `a` queued
    with its message sent."""
    pair = tuple(
        PriorityBroker(
            url=redis_url,
            namespace=namespace,
            middleware=[PriorityRouting(), MarkRunning()],
            heartbeat_timeout_ms=300,
        )
        for _ in range(2)
    )
    for broker in pair:
        dramatiq.actor(lambda eval_id: None, broker=broker, actor_name="job", queue_name=QUEUE_NAME,
                       records_status=True)  # fmt: skip
    pair[0].client.hset(f"{namespace}:eval:a", mapping={"status": "queued"})
    pair[0].get_actor("job").send(eval_id="a")
    yield pair[0], pair[1]
    for broker in pair:
        broker.client.close()


def record_of(broker: PriorityBroker) -> tuple[bytes, bytes, bytes]:
    status, worker, attempt = broker.client.hmget(f"{broker.namespace}:eval:a", "status", "worker", "attempt")
    return status, worker, attempt


def take_and_go_silent(broker: PriorityBroker) -> tuple[PriorityConsumer, MessageProxy]:
    """Fetch `a` on `broker`, then let its heartbeat lapse (its peers may take it for dead)."""
    consumer = PriorityConsumer(broker, slots=1)
    taken = next(consumer)
    time.sleep(0.4)
    return consumer, taken


def events_of(broker: PriorityBroker) -> list[str]:
    return [json.loads(e)["status"] for e in broker.client.lrange(f"{broker.namespace}:eval:a:events", 0, -1)]


def test_a_fetch_marks_its_evaluation_running_and_a_hand_back_marks_it_queued(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    """The fetch saves the worker a round trip; a stopping worker's hand-back says so again."""
    crashed, survivor = two_workers
    consumer = PriorityConsumer(crashed, slots=1)
    taken = next(consumer)
    attempt = attempt_of(taken).encode()
    assert taken.options[FETCH_MARK]["applied"] and record_of(crashed)[0] == b"running"
    assert record_of(crashed)[2] == attempt
    assert record_of(crashed)[1].decode() == taken.options[FETCH_MARK]["worker"]
    consumer.requeue([taken])  # a worker stopping hands it back unstarted
    assert record_of(crashed) == (b"queued", b"", attempt)
    # a worker taken for dead may be stalled only: its evaluation stays running until refetched
    take_and_go_silent(crashed)
    assert record_of(crashed)[0] == b"running"
    survivor.dispatch("heartbeat")  # releases the silent worker's message
    assert record_of(crashed)[0] == b"running" and survivor.queue_sizes()["default"] == 1
    again = next(PriorityConsumer(survivor, slots=1))
    assert again.options[FETCH_MARK]["applied"]
    assert events_of(crashed) == ["running", "queued", "running", "running"]


def test_a_worker_taken_for_dead_that_finishes_before_a_refetch_keeps_its_result(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    stalled, peer = two_workers
    consumer, taken = take_and_go_silent(stalled)
    peer.dispatch("heartbeat")  # the stalled worker is taken for dead; its message is queued again
    change = StatusChange("a", "completed", ("running",), {"output": "1\n"},
                          expect={"attempt": attempt_of(taken)})  # fmt: skip
    taken.options[STATUS_CHANGE] = asdict(change)
    consumer.ack(taken)
    assert record_of(stalled)[0] == b"completed"
    assert peer.queue_sizes() == {"high": 0, "default": 0, "low": 0, "delayed": 0, "in_flight": 0}


def test_a_stalled_workers_late_result_gives_way_to_the_delivery_that_took_over(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    """Each delivery has its own attempt token: the late result of a worker taken for dead is
    refused, and its ack leaves the message to the worker running it now."""
    stalled, peer = two_workers
    consumer, taken = take_and_go_silent(stalled)
    peer_consumer = PriorityConsumer(peer, slots=1)
    again = next(peer_consumer)  # releases the stalled worker's message and runs it
    assert attempt_of(again) != attempt_of(taken) and record_of(peer)[2] == attempt_of(again).encode()
    late = StatusChange(
        "a", "completed", ("running",), {"output": "late\n"}, expect={"attempt": attempt_of(taken)}
    )
    taken.options[STATUS_CHANGE] = asdict(late)
    consumer.ack(taken)
    assert record_of(peer)[0] == b"running" and peer.queue_sizes()["in_flight"] == 1
    result = StatusChange(
        "a", "completed", ("running",), {"output": "1\n"}, expect={"attempt": attempt_of(again)}
    )
    again.options[STATUS_CHANGE] = asdict(result)
    peer_consumer.ack(again)
    assert record_of(peer)[0] == b"completed"
    assert peer.client.hget(f"{peer.namespace}:eval:a", "output") == b"1\n"
    assert peer.queue_sizes()["in_flight"] == 0


@pytest.mark.parametrize("settle", ["retry", "requeue"])
def test_a_stalled_workers_retry_or_hand_back_leaves_the_delivery_that_took_over_alone(
    two_workers: tuple[PriorityBroker, PriorityBroker], settle: str
) -> None:
    """As Backoff plans them (a failed attempt, a shutdown): neither the record nor the message
    of the worker running it now changes."""
    stalled, peer = two_workers
    consumer, taken = take_and_go_silent(stalled)
    assert next(PriorityConsumer(peer, slots=1)) is not None
    status, fields = (
        ("running", {"next_retry_at": "soon"}) if settle == "retry" else ("queued", {"worker": ""})
    )
    change = StatusChange("a", status, ("running",), fields, delivery_expectation(taken))
    taken.options[STATUS_CHANGE] = asdict(change)
    taken.options[SETTLE] = {"command": settle, "delay_ms": 60_000, "policy": "default"}
    consumer.ack(taken)
    record = peer.client.hgetall(f"{peer.namespace}:eval:a")
    assert record[b"status"] == b"running" and not record.get(b"next_retry_at")
    assert peer.queue_sizes() == {"high": 0, "default": 0, "low": 0, "delayed": 0, "in_flight": 1}


@pytest.mark.parametrize("settle", ["ack", "requeue"])
def test_a_worker_taken_for_dead_twice_over_leaves_the_latest_delivery_to_be_redelivered(
    two_workers: tuple[PriorityBroker, PriorityBroker], settle: str
) -> None:
    """Its delivery was fetched again by a peer that was taken for dead in turn: its late result
    is refused and its settle leaves the message, back in its queue for redelivery, alone."""
    first, second = two_workers
    first_consumer, taken = take_and_go_silent(first)
    take_and_go_silent(second)  # releases the first's; then goes silent
    first.dispatch("heartbeat")  # the first is back: releases the second's message
    assert first.queue_sizes()["default"] == 1
    if settle == "ack":
        late = StatusChange("a", "completed", ("running",), {"output": "late\n"}, delivery_expectation(taken))
        taken.options[STATUS_CHANGE] = asdict(late)
        first_consumer.ack(taken)
    else:
        first_consumer.requeue([taken])
    # still there: queued, or fetched anew by the settle's refill (a delivery of its own)
    sizes = first.queue_sizes()
    assert sizes["default"] + sizes["in_flight"] == 1
    status, _, attempt = record_of(first)
    assert status == b"running" and attempt not in (attempt_of(taken).encode(), b"")
    assert first.client.hget(f"{first.namespace}:eval:a", "output") is None


def test_a_stalled_workers_dead_letter_leaves_the_delivery_that_took_over_alone(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    stalled, peer = two_workers
    consumer, taken = take_and_go_silent(stalled)
    assert next(PriorityConsumer(peer, slots=1)) is not None
    DeadLetters().before_nack(peer, taken)  # its retries ran out
    consumer.nack(taken)
    assert record_of(peer)[0] == b"running" and peer.client.zcard(f"{peer.namespace}:dlq") == 0
    assert peer.queue_sizes()["in_flight"] == 1


def test_a_hand_back_of_a_message_another_worker_took_since_changes_nothing(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    stalled, peer = two_workers
    consumer, taken = take_and_go_silent(stalled)
    assert next(PriorityConsumer(peer, slots=1)) is not None  # releases it, and runs it
    consumer.requeue([taken])  # the stalled worker, stopping, hands back what it thinks it holds
    assert record_of(peer)[0] == b"running"
    assert peer.queue_sizes()["default"] == 0 and peer.queue_sizes()["in_flight"] == 1


def test_a_failed_attempt_is_retried_later_and_its_slot_freed(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    broker, _ = two_workers
    consumer = PriorityConsumer(broker, slots=1)
    taken = next(consumer)  # a MessageProxy, as Dramatiq hands it to the middleware
    taken.options[SETTLE] = {"command": "retry", "delay_ms": 60_000, "policy": "default"}
    consumer.ack(taken)
    assert broker.queue_sizes()["delayed"] == 1 and broker.queue_sizes()["in_flight"] == 0
    assert not consumer.outstanding and record_of(broker)[0] == b"running"


def test_an_evaluation_message_carries_its_task_id_and_a_time_limit_above_its_timeout() -> None:
    from evaluations.queue import evaluation_message
    from evaluations.submission_spec import RunSpec

    message = evaluation_message("e1", RunSpec("print(1)", "python", 30))
    assert message.message_id == "celery-e1"
    assert message.kwargs == {"eval_id": "e1", "code": "print(1)", "language": "python", "timeout": 30}
    assert message.options["time_limit"] > 30_000


async def test_cleanup_drops_message_bookkeeping_an_earlier_release_left_behind(
    two_workers: tuple[PriorityBroker, PriorityBroker], aredis: aioredis.Redis
) -> None:
    """Workers from before `eval_of` and `deliveries` existed forget a message without them;
    the hourly cleanup drops those entries, and only those."""
    broker, _ = two_workers
    ns = broker.namespace
    broker.client.hset(f"{ns}:eval:b", mapping={"status": "queued"})
    broker.get_actor("job").send(eval_id="b")
    consumer = PriorityConsumer(broker, slots=2)
    a, b = next(consumer), next(consumer)
    old_release_forgot = a.options[REDIS_ID_OPTION]
    for hash_name in ("msgs", "level", "task"):
        broker.client.hdel(f"{ns}:{hash_name}", old_release_forgot)
    kept = b.options[REDIS_ID_OPTION].encode()
    assert broker.client.hlen(f"{ns}:eval_of") == broker.client.hlen(f"{ns}:deliveries") == 2
    # more, so the hashes outgrow Redis's compact encoding and are scanned a page at a time
    broker.client.hset(f"{ns}:eval_of", mapping={f"gone-{n}": f"e{n}" for n in range(300)})

    assert await AsyncEnqueuer(aredis, ns).sweep_orphans(page=20) == 302
    assert broker.client.hkeys(f"{ns}:eval_of") == broker.client.hkeys(f"{ns}:deliveries") == [kept]
    assert await AsyncEnqueuer(aredis, ns).sweep_orphans() == 0
    consumer.ack(b)  # the live message settles as before, and its bookkeeping goes with it
    assert broker.client.hlen(f"{ns}:eval_of") == broker.client.hlen(f"{ns}:deliveries") == 0


def test_a_failure_whose_text_is_not_valid_unicode_is_still_dead_lettered(
    two_workers: tuple[PriorityBroker, PriorityBroker],
) -> None:
    """An error message naming a file the OS gave as bytes carries lone surrogates, which no
    JSON encoder here (nor Redis's Lua) takes: the failure is recorded with them replaced."""
    broker, _ = two_workers
    consumer = PriorityConsumer(broker, slots=1)
    taken = next(consumer)
    path = b"/data/r\xe9sum\xe9".decode(errors="surrogateescape")  # a Latin-1 name, read as bytes
    record_failure(taken, OSError(f"cannot read {path}"))
    DeadLetters().before_nack(broker, taken)
    consumer.nack(taken)
    ns = broker.namespace
    assert record_of(broker)[0] == b"failed"
    entry = json.loads(broker.client.hget(f"{ns}:dlq:entries", broker.client.zrange(f"{ns}:dlq", 0, 0)[0]))
    assert entry["exception_class"] == "OSError" and entry["exception_message"] == "cannot read /data/r?sum?"


def test_messages_read_alike_whichever_encoder_wrote_them() -> None:
    """Workers encode with orjson; what Dramatiq's own encoder wrote (an earlier release, a
    retried dead letter) still reads, even what orjson refuses."""
    ours, dramatiqs = MessageEncoder(), dramatiq.encoder.JSONEncoder()
    message = asdict(dramatiq.Message("crucible", "evaluate", (), {"eval_id": "e1", "timeout": 5.0}, {}))
    assert ours.encode(message) == dramatiqs.encode(message)
    odd = {"kwargs": {"code": "\ud800", "timeout": float("inf")}}
    assert ours.decode(dramatiqs.encode(odd)) == odd
