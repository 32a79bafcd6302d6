"""A worker's liveness key (app/calls/workers.py) against a real Redis: present while renewed, gone within its TTL
once the worker stops renewing (as a SIGKILL'd worker does), and the relay's worker recorded on the leg."""
from __future__ import annotations

import os
import threading
import time

from types import SimpleNamespace

import pytest
import redis as redis_lib
from flask import Flask
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.calls.workers import RELAY_WORKER_FIELD, WorkerLiveness
from app.carriers.telnyx import streams
from app.extensions import services
from app.redis_keys import RedisKeys
from tests.support.virtual_time import VirtualClock
from tests.support.waiting import wait_until


def test_a_worker_that_renews_its_key_stays_alive_past_the_ttl(redis_client: redis_lib.Redis,
                                                                namespace: str) -> None:
    worker = WorkerLiveness(redis_client, RedisKeys(namespace), ttl_seconds=0.3, refresh_seconds=0.05)
    renewing = threading.Thread(target=worker.run_forever, daemon=True)
    renewing.start()
    try:
        assert wait_until(lambda: worker.is_alive(worker.worker_id), 2)
        seen_alive = []
        deadline = time.monotonic() + 1.0  # more than three TTLs
        while time.monotonic() < deadline:
            seen_alive.append(worker.is_alive(worker.worker_id))
            time.sleep(0.02)
        assert all(seen_alive)
    finally:
        worker.stop()
        renewing.join(2)
    assert not renewing.is_alive()
    assert not worker.is_alive(worker.worker_id)  # a worker shutting down drops its key at once


def test_a_worker_that_stops_renewing_is_gone_within_its_ttl(redis_client: redis_lib.Redis, namespace: str) -> None:
    """A killed worker renews nothing: its key lapses by itself (no one deletes it)."""
    keys = RedisKeys(namespace)
    worker = WorkerLiveness(redis_client, keys, ttl_seconds=0.3)
    worker.beat()
    assert worker.is_alive(worker.worker_id)
    # Within its TTL: Redis holds the key for at most 300 ms (no clock of ours is asserted on), then drops it.
    assert 0 < redis_client.pttl(keys.worker_alive(worker.worker_id)) <= 300
    assert wait_until(lambda: not worker.is_alive(worker.worker_id), 5)


def test_an_unknown_worker_is_not_alive(redis_client: redis_lib.Redis, namespace: str) -> None:
    assert not WorkerLiveness(redis_client, RedisKeys(namespace)).is_alive("nobody:1")


def test_worker_ids_are_per_process_and_per_app(redis_client: redis_lib.Redis, namespace: str) -> None:
    """The pid is part of the id (an app built before gunicorn forks still gives each worker its own key), and two
    apps in one process (two instances' tests) do not share one."""
    a = WorkerLiveness(redis_client, RedisKeys(namespace))
    b = WorkerLiveness(redis_client, RedisKeys(namespace))
    assert a.worker_id.endswith(f":{os.getpid()}") and a.worker_id != b.worker_id
    a.beat()
    assert a.is_alive(a.worker_id) and not b.is_alive(b.worker_id)


def test_the_relay_records_its_worker_on_the_leg_and_a_restore_forgets_it(redis_client: redis_lib.Redis,
                                                                           namespace: str) -> None:
    keys = RedisKeys(namespace)
    worker = WorkerLiveness(redis_client, keys)
    redis_client.hset(keys.call("telnyx", "v3:abc"), mapping={"session_id": "sess_1"})
    worker.record_relay("telnyx", "v3:abc")
    description = redis_client.hgetall(keys.call("telnyx", "v3:abc"))
    assert description[RELAY_WORKER_FIELD.encode()] == worker.worker_id.encode()
    assert description[b"session_id"] == b"sess_1"  # the rest of the description untouched
    assert worker.is_alive(worker.worker_id)  # recording renews the key: a reader never sees a worker without one
    assert redis_client.ttl(keys.call("telnyx", "v3:abc")) > 0
    worker.forget_relay("telnyx", "v3:abc")
    assert RELAY_WORKER_FIELD.encode() not in redis_client.hgetall(keys.call("telnyx", "v3:abc"))


def test_renewal_survives_redis_errors(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis unreachable: the renewal loop logs and keeps trying, it never dies: it is still renewing after ten
    failures in a row (its second warning). The client fails at once (no retries of its own), so this is quick."""
    dead = redis_lib.Redis(host="127.0.0.1", port=1, socket_timeout=0.1, socket_connect_timeout=0.1,
                           retry=Retry(NoBackoff(), 0))
    worker = WorkerLiveness(dead, RedisKeys(namespace), refresh_seconds=0.01)
    renewing = threading.Thread(target=worker.run_forever, daemon=True)
    with caplog.at_level("WARNING", logger="app.calls.workers"):
        renewing.start()
        assert wait_until(lambda: any("(10 failures)" in r.getMessage() for r in caplog.records), 10)
        assert renewing.is_alive()
        worker.stop()
        renewing.join(10)
    assert not renewing.is_alive()


# ----- the Call Control settle, against the liveness key (in-process app, real Redis) ------------------------------
def _settle(app: Flask, worker: str | None, settle_seconds: float,
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, VirtualClock]:
    """Run the stop handler's settle for a live leg whose relay is on ``worker``, on a virtual clock: why it
    stopped, and the clock (its ``slept`` polls say how long the settle waited, however loaded the machine)."""
    monkeypatch.setattr(streams, "RELAY_SETTLE_SECONDS", settle_seconds)
    clock = VirtualClock()
    monkeypatch.setattr(streams, "time", SimpleNamespace(monotonic=clock, sleep=clock.sleep))
    call = {"session_id": "sess_x", "state": "live", **({RELAY_WORKER_FIELD: worker} if worker else {})}
    with app.app_context():
        _record, why = streams._settled(services(), "v3:nothing-recorded", call)
        return why, clock


def test_the_settle_stops_at_once_when_the_relays_worker_is_gone(telnyx_app: Flask,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    why, clock = _settle(telnyx_app, "gone-instance:4242", 5.0, monkeypatch)
    assert why == "worker gone" and clock.slept == []  # not one poll of the 5 s settle


def test_the_settle_waits_in_full_while_the_relays_worker_lives(telnyx_app: Flask,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with telnyx_app.app_context():
        workers = services().workers
        workers.beat()
        renewing = threading.Thread(target=workers.run_forever, daemon=True)
        renewing.start()
    try:
        why, clock = _settle(telnyx_app, workers.worker_id, 0.6, monkeypatch)
    finally:
        workers.stop()
        renewing.join(10)
    assert why == "settle over" and sum(clock.slept) >= 0.6


def test_the_settle_waits_in_full_when_no_worker_is_recorded(telnyx_app: Flask,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore forgot the old stream's worker and the new relay has not recorded its own: nothing is known."""
    why, clock = _settle(telnyx_app, None, 0.6, monkeypatch)
    assert why == "settle over" and sum(clock.slept) >= 0.6
