"""Which bridge workers are alive: a short-TTL key per worker, so "the relay is gone" is known, not assumed.

Every worker (each gunicorn process of each instance) keeps ``{ns}:worker-alive:{worker_id}``
(:meth:`app.redis_keys.RedisKeys.worker_alive`) with a TTL of :data:`WORKER_ALIVE_TTL_SECONDS`, renewed every
:data:`WORKER_ALIVE_REFRESH_SECONDS` by a background thread (a greenlet under gevent), started like the reaper. A relay
records its worker's id on the leg when its media socket is accepted (:meth:`WorkerLiveness.record_relay`).
Whoever waits for that relay to say why its stream ended (a Telnyx Call Control ``streaming.stopped``) can then
stop waiting as soon as the key is gone: a worker killed with SIGKILL renews nothing, and its key is gone within
the TTL — instead of waiting a fixed settle time that a killed worker's caller spends in silence.

What the key proves and what it does not:

- Present: the worker ran its renewal within the last TTL. Its relay may still record an end: wait for it.
- Gone: the worker has not run for a whole TTL — killed, or stalled (CPU-starved, swapping) for that long. A
  relay that ends on purpose records its end *before* it closes the carrier socket (app/relay/core.py), so the
  carrier cannot report that stop before the record exists; only a carrier-side stop (the caller hung up) can
  race a stalled relay, and that call's own hang-up is checked again before anything is restored.
- Unknown (no worker recorded on the leg: the relay had not accepted the socket yet, or a restore just replaced
  it): nothing is known, so the caller waits the full settle, as before.

The id is ``{instance token}:{pid}``: unique per process even when an app is built before gunicorn forks.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading

import redis

from app.background import spawn
from app.redis_keys import RECORD_TTL_SECONDS, RedisKeys

log = logging.getLogger(__name__)

#: A worker whose key was not renewed for this long counts as gone. Renewed five times per TTL, so a worker
#: whose event loop stalls for up to ~0.8 s still counts as alive.
WORKER_ALIVE_TTL_SECONDS = 1.0
WORKER_ALIVE_REFRESH_SECONDS = 0.2
#: The call description's field naming the worker whose relay serves the leg's newest stream.
RELAY_WORKER_FIELD = "relay_worker"


class WorkerLiveness:
    """This worker's liveness key, and whether another worker's is still there."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, ttl_seconds: float = WORKER_ALIVE_TTL_SECONDS,
                 refresh_seconds: float = WORKER_ALIVE_REFRESH_SECONDS, instance_token: str | None = None) -> None:
        self._redis = client
        self._keys = keys
        self.ttl_seconds = ttl_seconds
        self.refresh_seconds = refresh_seconds
        self._instance_token = instance_token or secrets.token_hex(6)
        self._stop = threading.Event()

    @property
    def worker_id(self) -> str:
        """This process's id (read per call: a forked worker has its own pid)."""
        return f"{self._instance_token}:{os.getpid()}"

    def beat(self) -> None:
        """Renew this worker's key (``SET … PX``: the TTL in milliseconds)."""
        self._redis.set(self._keys.worker_alive(self.worker_id), "1", px=max(1, int(self.ttl_seconds * 1000)))

    def is_alive(self, worker_id: str) -> bool:
        """True while ``worker_id``'s key exists (it renewed it within the TTL)."""
        return bool(self._redis.exists(self._keys.worker_alive(worker_id)))

    def record_relay(self, carrier: str, call_id: str) -> None:
        """This worker's relay now serves the leg's newest stream: say so on the leg's description."""
        self.beat()  # the key exists before anyone can read the leg's worker
        key = self._keys.call(carrier, call_id)
        with self._redis.pipeline(transaction=False) as pipe:  # one key: no cross-slot question
            pipe.hset(key, RELAY_WORKER_FIELD, self.worker_id)
            pipe.expire(key, RECORD_TTL_SECONDS)
            pipe.execute()

    def forget_relay(self, carrier: str, call_id: str) -> None:
        """A new stream replaces the leg's: its worker is unknown until that stream's relay records itself."""
        self._redis.hdel(self._keys.call(carrier, call_id), RELAY_WORKER_FIELD)

    def run_forever(self) -> None:
        """Renew the key until :meth:`stop`; a Redis error is logged and the next renewal tried."""
        failures = 0
        while not self._stop.is_set():
            try:
                self.beat()
                failures = 0
            except redis.RedisError as exc:  # Redis down: others see this worker as gone, and wait their settle
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("worker liveness key not renewed (%d failures): %s", failures, exc)
            self._stop.wait(self.refresh_seconds)

    def stop(self) -> None:
        """Stop renewing and drop the key (a worker shutting down is gone for whoever waits on its relays)."""
        self._stop.set()
        try:
            self._redis.delete(self._keys.worker_alive(self.worker_id))
        except redis.RedisError:
            pass  # it lapses by itself within the TTL


def start_worker_liveness(liveness: WorkerLiveness) -> bool:
    """Start renewing this worker's key when running under gevent (gunicorn's gevent worker), like the reaper;
    False (nothing started) elsewhere: the test client and the CLI run no relays."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    if not monkey.is_module_patched("threading"):
        return False
    spawn(liveness.run_forever, name="worker-liveness")
    return True
