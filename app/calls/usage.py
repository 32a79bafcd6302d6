"""Billed Kallglot minutes: each session's billed duration, and totals per number and per day.

Kallglot bills *session* time (first audio to end), not call time (Kallglot's sessions-vs-calls guide), so the figure comes
from Kallglot — the ``end`` response's ``duration_seconds`` or the ``session.ended`` webhook's
``data.duration`` — and is stored on the session record as ``billed_seconds``. Whichever arrives first wins;
they describe the same session, and a later one only overwrites with the same or a better-known value.
Vendor-free: callers hand in the number.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from app.redis_keys import CALL_LOG_RETENTION_SECONDS, RedisKeys, as_text


def parse_seconds(value: Any) -> float | None:
    """A non-negative finite number of seconds from Kallglot's JSON, or None."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def record_billed_seconds(client: redis.Redis, keys: RedisKeys, session_id: str, seconds: float,
                          ended_at: float | None = None) -> bool:
    """Store ``seconds`` as the session's billed time; False when we hold no record of the session."""
    key = keys.session(session_id)
    if not client.exists(key):
        return False
    ended = ended_at or float(client.hget(key, "ended_at") or time.time())
    billed = keys.billed_sessions(keys.shard_of(session_id))
    with client.pipeline(transaction=True) as pipe:  # one slot: the session's shard
        pipe.hset(key, "billed_seconds", f"{seconds:.1f}")
        pipe.zadd(billed, {session_id: ended})
        pipe.zremrangebyscore(billed, 0, time.time() - CALL_LOG_RETENTION_SECONDS)
        pipe.execute()
    return True


def minutes(seconds: float | str | None) -> str:
    """``12.25`` minutes, two decimals, from seconds (empty when unknown)."""
    value = parse_seconds(seconds)
    return "" if value is None else f"{value / 60:.2f}"


def clock(seconds: float | str | None) -> str:
    """``1:02:03`` / ``4:05`` from seconds, rounded up as a bill would be (empty when unknown)."""
    value = parse_seconds(seconds)
    if value is None:
        return ""
    hours, rest = divmod(math.ceil(value), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class UsageRow:
    """Billed time of the sessions to one number on one UTC day."""

    day: str
    number: str
    sessions: int
    seconds: float

    @property
    def minutes(self) -> str:
        """Billed minutes, two decimals."""
        return f"{self.seconds / 60:.2f}"

    @property
    def clock(self) -> str:
        """Billed time as ``m:ss``."""
        return clock(self.seconds)


def usage(client: redis.Redis, keys: RedisKeys, *, since: float | None = None,
          until: float | None = None) -> list[UsageRow]:
    """Billed time per (UTC day, called number), newest day first, for sessions ended in [since, until]."""
    low, high = since if since is not None else "-inf", until if until is not None else "+inf"
    with client.pipeline(transaction=False) as pipe:  # every shard (a cluster client sends one per node)
        for shard in keys.shards():
            pipe.zrangebyscore(keys.billed_sessions(shard), low, high, withscores=True)
        ids = [pair for shard_ids in pipe.execute() for pair in shard_ids]
    with client.pipeline(transaction=False) as pipe:
        for session_id, _ in ids:
            pipe.hmget(keys.session(as_text(session_id)), "billed_seconds", "to")
        fields = pipe.execute() if ids else []
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for (_, ended), (billed, number) in zip(ids, fields):
        seconds = parse_seconds(as_text(billed) if billed else None)
        if seconds is None:
            continue  # the session record expired
        day = datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%d")
        total = totals[(day, as_text(number) if number else "")]
        total[0] += 1
        total[1] += seconds
    return [UsageRow(day, number, int(count), seconds)
            for (day, number), (count, seconds) in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1]),
                                                          reverse=True)]
