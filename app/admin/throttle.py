"""Sign-in throttling: per-address limits (Flask-Limiter, Redis storage) plus an exponential delay per name and
address. There is no global limit: nothing an attacker does from other addresses can lock the real admin out.

- The client address is the socket peer, or the entry ``TRUSTED_PROXY_HOPS`` proxies up the
  ``X-Forwarded-For`` chain (werkzeug's ``ProxyFix``, installed by the app factory): a client cannot choose it
  by sending its own header.
- Per address, failed sign-ins (answered 401) count against :data:`ADDRESS_LIMITS`, and every sign-in POST
  against :data:`MAX_ATTEMPTS_PER_MINUTE` (counted on arrival, so a parallel burst cannot slip past the
  failure count); once a limit is reached, the address gets 429 with ``Retry-After`` until its window ends,
  without the password being checked. The counters
  live in Redis under ``{REDIS_NAMESPACE}:admin:limiter`` (see :mod:`app.redis_keys`), shared by every worker.
- Per (name, address) pair, each consecutive failure doubles the wait before the next try
  (1 s, 2 s, 4 s … up to :data:`MAX_DELAY_SECONDS`); a successful sign-in clears it. Keyed by the pair, never by
  the name alone, so typing the admin's name from elsewhere cannot slow the admin down.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import cast

import redis
from flask import Flask, Response, request
from flask_limiter import Limiter, RequestLimit

from app.config import Settings
from app.redis_connection import limiter_storage, parse_redis_target
from app.redis_keys import RedisKeys

#: Failed sign-ins one address may make: a few typos an hour, not a guessing campaign.
MAX_FAILURES_PER_CLIENT = 5
FAILURE_WINDOW_SECONDS = 15 * 60
MAX_FAILURES_PER_CLIENT_PER_DAY = 20
ADDRESS_LIMITS = (f"{MAX_FAILURES_PER_CLIENT} per {FAILURE_WINDOW_SECONDS // 60} minutes",
                  f"{MAX_FAILURES_PER_CLIENT_PER_DAY} per day")
#: Every sign-in POST of one address, counted when it arrives: failures are only known (and counted) after
#: the password check, so without this a burst of parallel guesses would all pass the check before any counted.
MAX_ATTEMPTS_PER_MINUTE = 10
#: The exponential delay per (name, address) stops doubling here.
MAX_DELAY_SECONDS = 15 * 60
#: A pair's failure streak is forgotten after a day without failures.
DELAY_MEMORY_SECONDS = 24 * 3600
SIGN_IN_ENDPOINT = "admin.sign_in"
#: What the limiter calls when an address is over its limit: the sign-in page's 429.
OnBreach = Callable[[RequestLimit], Response | None]
LIMITER_EXTENSION = "admin_sign_in_limiter"


def client_address() -> str:
    """The client's address: ``ProxyFix`` has already replaced the socket peer with the trusted hop's entry."""
    return request.remote_addr or "unknown"


def _not_a_sign_in_attempt() -> bool:
    # The limiter checks every request of the app; only sign-in POSTs count or are refused.
    return request.endpoint != SIGN_IN_ENDPOINT or request.method != "POST"


def _failed(response: Response) -> bool:
    return response.status_code == 401


def init_sign_in_limiter(app: Flask, settings: Settings, keys: RedisKeys,
                         on_breach: OnBreach) -> Limiter:
    """Attach a Flask-Limiter to ``app`` that counts failed sign-ins per client address in Redis."""
    # The same deployment (standalone, TLS, Cluster, Sentinel) as the service's own client.
    storage_uri, options = limiter_storage(parse_redis_target(settings.redis_url, cluster=settings.redis_cluster),
                                           tls_verify=settings.redis_tls_verify, tls_ca=settings.redis_tls_ca)
    limiter = Limiter(
        client_address, app=app, storage_uri=storage_uri, strategy="fixed-window",
        storage_options={**options, "key_prefix": keys.admin_limiter_prefix(), "socket_timeout": 2,
                         "socket_connect_timeout": 2}, default_limits=list(ADDRESS_LIMITS),
        default_limits_exempt_when=_not_a_sign_in_attempt, default_limits_deduct_when=_failed,
        application_limits=[f"{MAX_ATTEMPTS_PER_MINUTE} per minute"],
        application_limits_exempt_when=_not_a_sign_in_attempt,
        on_breach=on_breach, headers_enabled=False,
        # Redis unreachable: sign-in fails closed with the service's usual Redis error, never unthrottled.
        swallow_errors=False)
    app.extensions[LIMITER_EXTENSION] = limiter
    return limiter


def retry_after_seconds(limit: RequestLimit) -> int:
    """Seconds until the breached ``limit``'s window ends (at least 1)."""
    return max(int(limit.reset_at - time.time()), 1)


class SignInDelay:
    """The exponential delay per (name, address), in one Redis hash per pair (digested: no raw names as keys)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis, self._keys = client, keys

    def _key(self, name: str, address: str) -> str:
        digest = hashlib.sha256(f"{name.strip().lower()}\0{address}".encode()).hexdigest()[:32]
        return self._keys.admin_signin_delay(digest)

    def wait_seconds(self, name: str, address: str, now: float | None = None) -> int:
        """Seconds before this pair may try again (0: now)."""
        record = cast(dict[bytes, bytes], self._redis.hgetall(self._key(name, address)))
        if b"failures" not in record or b"last" not in record:
            return 0
        failures, last = int(record[b"failures"]), float(record[b"last"])
        until = last + min(2 ** (failures - 1), MAX_DELAY_SECONDS)
        return max(math.ceil(until - (time.time() if now is None else now)), 0)

    def failed(self, name: str, address: str) -> None:
        """Record one more consecutive failure of this pair."""
        key = self._key(name, address)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "failures", 1)
            pipe.hset(key, "last", repr(time.time()))
            pipe.expire(key, DELAY_MEMORY_SECONDS)
            pipe.execute()

    def succeeded(self, name: str, address: str) -> None:
        """Forget this pair's failures."""
        self._redis.delete(self._key(name, address))
