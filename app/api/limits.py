"""Guards of ``POST /api/calls`` against toll fraud and a leaked token: per-token rate and concurrency limits
in Redis (shared by every worker and instance), and the idempotency record that ties a key to one body."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis

from app.redis_keys import RedisKeys, as_text

#: A retried request is recognised for a day, like Kallglot's own idempotency keys.
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
RATE_WINDOW_SECONDS = 60


def digest(*parts: str) -> str:
    """A short, stable hash of ``parts``: the form in which client-chosen strings reach Redis keys, Kallglot
    idempotency keys and logs (never the raw value, which could be huge or carry anything)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def body_fingerprint(body: dict[str, Any]) -> str:
    """The hash of a request body, independent of key order and whitespace."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotency_conflict(client: redis.Redis, keys: RedisKeys, key_digest: str, fingerprint: str) -> bool:
    """Bind ``key_digest`` to ``fingerprint`` on first use; True when the key was used before with another body."""
    marker = keys.api_idempotency_body(key_digest)
    if client.set(marker, fingerprint, nx=True, ex=IDEMPOTENCY_TTL_SECONDS):
        return False
    stored = client.get(marker)
    return stored is not None and as_text(stored) != fingerprint


def rate_limited(client: redis.Redis, keys: RedisKeys, token_digest: str, per_minute: int,
                 now: float | None = None) -> bool:
    """Count one request for ``token_digest`` in the current minute; True when it goes over ``per_minute``."""
    window = int((time.time() if now is None else now) // RATE_WINDOW_SECONDS)
    key = keys.api_rate(token_digest, window)
    with client.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, RATE_WINDOW_SECONDS * 2)
        count, _ = pipe.execute()
    return int(count) > per_minute


def live_api_calls(client: redis.Redis, keys: RedisKeys, token_digest: str) -> int:
    """How many sessions started with ``token_digest`` are still live (ended ones are pruned on the way)."""
    tracked = keys.api_live_calls(token_digest)
    members = [as_text(m) for m in client.zrange(tracked, 0, -1)]
    if not members:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for session_id in members:
            pipe.zscore(keys.live_sessions(keys.shard_of(session_id)), session_id)
        scores = pipe.execute()
    ended = [m for m, score in zip(members, scores) if score is None]
    if ended:
        client.zrem(tracked, *ended)
    return len(members) - len(ended)


def track_api_call(client: redis.Redis, keys: RedisKeys, token_digest: str, session_id: str) -> None:
    """Count ``session_id`` against ``token_digest``'s concurrency limit until the session ends."""
    tracked = keys.api_live_calls(token_digest)
    with client.pipeline(transaction=True) as pipe:
        pipe.zadd(tracked, {session_id: time.time()})
        pipe.expire(tracked, IDEMPOTENCY_TTL_SECONDS)
        pipe.execute()
