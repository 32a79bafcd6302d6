"""The live-event pipeline: bounded per-session Redis Streams, a non-blocking forwarder, transcript parsing."""
from __future__ import annotations

import socket
import threading
import time

import redis as redis_lib

from app.calls.events import (
    LEG, MAX_EVENTS_PER_SESSION, TRANSCRIPT, EventForwarder, SessionEventLog, leg_event, transcript_event,
    valid_stream_id,
)
from app.calls.usage import record_billed_seconds, usage
from app.kallglot.stream_protocol import Transcript, parse_server_message
from app.redis_keys import RedisKeys

#: How long the silent Redis below keeps the forwarder's write waiting (the client's socket timeout).
REDIS_SILENCE_SECONDS = 120


def test_ten_thousand_transcript_events_stay_bounded_and_expire(redis_client: redis_lib.Redis, namespace: str) -> None:
    keys = RedisKeys(namespace)
    log = SessionEventLog(redis_client, keys)
    forwarder = EventForwarder(log)
    for n in range(10_000):
        assert forwarder.publish("sess_big", TRANSCRIPT, transcript_event(speaker="customer", text=f"line {n}",
                                                                           final=True, translation=f"línea {n}"))
    assert forwarder.flush(timeout=30)
    assert forwarder.dropped == 0 and forwarder.written == 10_000
    length = log.length("sess_big")
    # MAXLEN ~ trims whole macro nodes (100 entries by default): bounded near the cap, never the 10 000.
    assert MAX_EVENTS_PER_SESSION <= length <= MAX_EVENTS_PER_SESSION + 200
    assert 0 < redis_client.ttl(keys.session_live_events("sess_big")) <= log.ttl_seconds
    newest = log.latest("sess_big", 3)
    assert [e.data["text"] for e in newest] == ["line 9997", "line 9998", "line 9999"]
    assert newest[-1].data["translation"] == "línea 9999"
    # Transcript lines are not "live list" changes: the global stream stays empty.
    assert redis_client.xlen(keys.live_changes()) == 0


def test_leg_changes_are_announced_on_the_global_stream(redis_client: redis_lib.Redis, namespace: str) -> None:
    keys = RedisKeys(namespace)
    log = SessionEventLog(redis_client, keys)
    before = log.last_change_id()
    log.append("sess_a", LEG, leg_event(carrier="twilio", call_id="CA1", speaker="customer", state="started"))
    changes = log.wait(keys.live_changes(), before, block_ms=100)
    assert [(c.session_id, c.data["state"]) for c in changes] == [("sess_a", "started")]
    assert valid_stream_id(changes[0].id) and not valid_stream_id("1-2; DROP")


def test_the_forwarder_never_blocks_when_redis_is_gone(namespace: str) -> None:
    # A "Redis" that accepts the connection and never answers: the writer's first write hangs for the client's
    # whole socket timeout. Every publish must still return (the queue takes it, or it is dropped when full)
    # while that write is outstanding: Redis never answered once, so a publish that waited on it would not return.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = redis_lib.Redis(host="127.0.0.1", port=silent.getsockname()[1], socket_timeout=REDIS_SILENCE_SECONDS,
                               socket_connect_timeout=REDIS_SILENCE_SECONDS)
        forwarder = EventForwarder(SessionEventLog(hung, RedisKeys(namespace)), queue_size=100)
        accepted: list[bool] = []
        publisher = threading.Thread(target=lambda: accepted.extend(
            forwarder.publish("sess_x", TRANSCRIPT, {"text": str(n)}) for n in range(1000)), daemon=True)
        publisher.start()
        publisher.join(timeout=REDIS_SILENCE_SECONDS / 4)  # a liveness bound, far below the hung write's timeout
        assert not publisher.is_alive() and len(accepted) == 1000, "publish waited on Redis"
        assert not forwarder.flush(timeout=0)  # the writer is still stuck on Redis: nothing was written meanwhile
        assert forwarder.written == 0
        # The queue took what it holds (plus the batch the writer took); everything else was dropped, counted.
        assert 100 <= sum(accepted) <= 200 and forwarder.dropped == 1000 - sum(accepted)


def test_events_published_within_the_linger_share_one_pipeline(redis_client: redis_lib.Redis,
                                                               namespace: str) -> None:
    # A long linger so that every publish below lands inside it even on a loaded machine: the writer takes the
    # first event, waits, then drains the rest into the same pipeline.
    keys = RedisKeys(namespace)
    log = SessionEventLog(redis_client, keys)
    forwarder = EventForwarder(log, linger_seconds=1.0)
    for n in range(60):
        session_id = f"sess_{n % 3}"
        assert forwarder.publish(session_id, TRANSCRIPT, transcript_event(speaker="customer", text=f"line {n}",
                                                                          final=True, translation=f"línea {n}"))
    assert forwarder.publish("sess_0", LEG, leg_event(carrier="twilio", call_id="CA1", speaker="customer",
                                                       state="ended"))
    assert forwarder.flush(timeout=10)
    assert forwarder.batches == 1 and forwarder.written == 61 and forwarder.dropped == 0
    for n in range(3):  # every line reached its session's stream, in order, with its TTL set
        texts = [e.data.get("text") for e in log.latest(f"sess_{n}", 100) if e.kind == TRANSCRIPT]
        assert texts == [f"line {i}" for i in range(n, 60, 3)]
        assert 0 < redis_client.ttl(keys.session_live_events(f"sess_{n}")) <= log.ttl_seconds
    assert log.latest("sess_1", 1)[0].data["translation"] == "línea 58"
    changes = log.wait(keys.live_changes(), "0-0", block_ms=100)
    assert [(c.session_id, c.data["state"]) for c in changes] == [("sess_0", "ended")]
    assert 0 < redis_client.ttl(keys.live_changes()) <= log.ttl_seconds
    # A later batch on the same streams skips the EXPIRE it sent a moment ago: the TTL stays set.
    redis_client.expire(keys.session_live_events("sess_0"), 100)
    assert forwarder.publish("sess_0", TRANSCRIPT, {"text": "later"}) and forwarder.flush(timeout=10)
    assert forwarder.batches == 2 and 0 < redis_client.ttl(keys.session_live_events("sess_0")) <= 100
    assert log.latest("sess_0", 1)[0].data["text"] == "later"


def test_a_full_queue_drops_and_counts_while_the_writer_lingers(redis_client: redis_lib.Redis,
                                                                namespace: str) -> None:
    # The writer holds one event and lingers; the queue (10) takes ten more, the rest are refused at once.
    log = SessionEventLog(redis_client, RedisKeys(namespace))
    forwarder = EventForwarder(log, queue_size=10, linger_seconds=1.0)
    accepted = [forwarder.publish("sess_full", TRANSCRIPT, {"text": str(n)}) for n in range(50)]
    assert 10 <= sum(accepted) <= 11 and not all(accepted[-30:])
    assert forwarder.dropped == 50 - sum(accepted)
    assert forwarder.flush(timeout=10)
    assert forwarder.written == sum(accepted) == log.length("sess_full")
    kept = [int(e.data["text"]) for e in log.latest("sess_full", 100)]
    assert kept == [n for n, ok in enumerate(accepted) if ok]


def test_the_relay_hook_only_queues_the_line_and_the_writer_builds_the_event(redis_client: redis_lib.Redis,
                                                                             namespace: str) -> None:
    from app.relay.bridge import transcript_forwarder

    log = SessionEventLog(redis_client, RedisKeys(namespace))
    forwarder = EventForwarder(log, linger_seconds=1.0)
    forward = transcript_forwarder(forwarder, "sess_hook", "agent")
    before = time.time()
    forward(Transcript(final=True, speaker="", text="Hello", language="en", translation="Hola",
                       translation_language="es", item_id="u1"))
    deadline = time.monotonic() + 5
    while forwarder._pending and time.monotonic() < deadline:  # the writer takes it, then lingers 1 s
        time.sleep(0.005)
    forward(Transcript(final=False, speaker="customer", text="Tha"))
    session_id, kind, queued, build = forwarder._pending[0]  # what the media path handed over, not built
    assert (session_id, kind, build is not None) == ("sess_hook", TRANSCRIPT, True)
    assert isinstance(queued, tuple) and isinstance(queued[0], Transcript) and queued[0].text == "Tha"
    assert forwarder.flush(timeout=10) and forwarder.written == 2
    final, partial = [e.data for e in log.latest("sess_hook", 10)]
    assert before - 0.001 <= final.pop("at") <= time.time()
    assert final == {"speaker": "agent", "text": "Hello", "final": True, "language": "en", "translation": "Hola",
                     "translation_language": "es", "item": "u1"}
    assert (partial["speaker"], partial["text"], partial["final"]) == ("customer", "Tha", False)


def test_a_build_that_fails_loses_its_batch_not_the_writer(redis_client: redis_lib.Redis, namespace: str) -> None:
    log = SessionEventLog(redis_client, RedisKeys(namespace))
    forwarder = EventForwarder(log, linger_seconds=0)

    def broken(_: object) -> dict[str, object]:
        raise ValueError("a bug")

    assert forwarder.publish_built("sess_bug", TRANSCRIPT, broken, None) and forwarder.flush(timeout=10)
    assert forwarder.dropped == 1 and forwarder.written == 0
    assert forwarder.publish("sess_bug", TRANSCRIPT, {"text": "after"}) and forwarder.flush(timeout=10)
    assert forwarder.written == 1 and [e.data["text"] for e in log.latest("sess_bug", 10)] == ["after"]


def test_transcript_messages_carry_language_and_translation() -> None:
    final = parse_server_message('{"type":"transcript.final","id":"u1","speaker":"customer","language":"en",'
                                 '"text":"Hello","translation":{"language":"es","text":"Hola"}}')
    assert final == Transcript(final=True, speaker="customer", text="Hello", language="en", translation="Hola",
                               translation_language="es", item_id="u1")
    partial = parse_server_message('{"type":"transcript.partial","speaker":"agent","text":"Hel"}')
    assert partial == Transcript(final=False, speaker="agent", text="Hel")


def test_billed_minutes_per_number_and_day(redis_client: redis_lib.Redis, namespace: str) -> None:
    keys = RedisKeys(namespace)
    for session_id, number, seconds in (("s1", "+15550001", 90.0), ("s2", "+15550001", 30.0),
                                        ("s3", "+15550002", 600.0)):
        redis_client.hset(keys.session(session_id), mapping={"to": number, "status": "ended"})
        assert record_billed_seconds(redis_client, keys, session_id, seconds, ended_at=time.time())
    assert not record_billed_seconds(redis_client, keys, "unknown", 5.0)
    rows = {(r.number, r.sessions, r.minutes) for r in usage(redis_client, keys)}
    assert rows == {("+15550001", 2, "2.00"), ("+15550002", 1, "10.00")}
