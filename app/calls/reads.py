"""Read views of the lifecycle's Redis state (the admin UI, the carrier adapters' look-ups) and the call log.

Nothing here changes a leg's or a session's state; :mod:`app.calls.lifecycle` does that, atomically.
"""
from __future__ import annotations

import heapq
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from app.redis_keys import MAX_EVENTS_PER_CALL, RECORD_TTL_SECONDS, RedisKeys, as_text, as_text_map


class LifecycleReads:
    """Read access to legs and sessions; mixed into :class:`~app.calls.lifecycle.SessionLifecycle`."""

    _redis: redis.Redis
    _keys: RedisKeys

    def held_session_for(self, to_number: str, from_number: str) -> str | None:
        """The held session a new call from ``from_number`` to ``to_number`` may re-attach to."""
        return as_text(self._redis.get(self._keys.held(to_number, from_number)))

    def session_for_call(self, carrier: str, call_id: str) -> str | None:
        """The Kallglot session a carrier call leg belongs to, if any."""
        return as_text(self._redis.hget(self._keys.call(carrier, call_id), "session_id"))

    def session_record(self, session_id: str) -> dict[str, str]:
        """Our stored view of a session (status, legs as ``leg:carrier:id``, end reason…)."""
        return as_text_map(self._redis.hgetall(self._keys.session(session_id)))

    def call_description(self, carrier: str, call_id: str) -> dict[str, str]:
        """A leg's description only (session id, numbers, speaker): the one key found by the call id."""
        return as_text_map(self._redis.hgetall(self._keys.call(carrier, call_id)))

    def call_record(self, carrier: str, call_id: str) -> dict[str, str]:
        """Our stored view of one call leg: its description and, once attached, its state (``state``,
        ``stream``, ``epoch``, ``end_reason``…, kept in its session's shard)."""
        record = self.call_description(carrier, call_id)
        if session_id := record.get("session_id"):
            record.update(as_text_map(self._redis.hgetall(self._keys.leg(session_id, carrier, call_id))))
        return record

    def session_legs(self, session_id: str) -> dict[tuple[str, str], str]:
        """``{(carrier, call_id): state}`` for every leg of a session."""
        legs = {}
        for name, state in self.session_record(session_id).items():
            if name.startswith("leg:"):
                carrier, _, call_id = name[4:].partition(":")
                legs[(carrier, call_id)] = state
        return legs

    def record_event(self, carrier: str, call_id: str, source: str, fields: dict[str, Any]) -> None:
        """Append a carrier callback to the leg's capped event list. ``fields`` must hold no secrets."""
        key = self._keys.call_events(carrier, call_id)
        entry = json.dumps({"at": round(time.time(), 3), "source": source, **fields}, sort_keys=True)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, entry)
            pipe.ltrim(key, -MAX_EVENTS_PER_CALL, -1)
            pipe.expire(key, RECORD_TTL_SECONDS)
            pipe.execute()

    def events(self, carrier: str, call_id: str) -> list[dict[str, Any]]:
        """The recorded callbacks of one leg, oldest first."""
        return [json.loads(e) for e in self._redis.lrange(self._keys.call_events(carrier, call_id), 0, -1)]

    def live_sessions(self, limit: int = 500) -> list[dict[str, str]]:
        """Sessions not yet ended (newest first), each with ``id`` and its stored fields (legs as ``leg:*``)."""
        newest = self._newest_across_shards(self._keys.live_sessions, "+inf", "-inf", limit)
        return [{"id": sid, **self.session_record(sid)} for sid in newest]

    def relay_deadline(self, session_id: str, carrier: str, call_id: str) -> float | None:
        """When a live leg counts as lost unless its relay beats again (None: no heartbeat recorded)."""
        shard = self._keys.shard_of(session_id)
        score = self._redis.zscore(self._keys.heartbeats(shard), f"{carrier}:{call_id}")
        return None if score is None else float(score)

    def live_session_ids(self) -> set[str]:
        """Every session not yet ended, over all shards."""
        with self._redis.pipeline(transaction=False) as pipe:
            for shard in self._keys.shards():
                pipe.zrange(self._keys.live_sessions(shard), 0, -1)
            return {as_text(raw) for members in pipe.execute() for raw in members}

    def live_session_count(self) -> int:
        """How many sessions are not yet ended (fleet-wide): one ZCARD per shard, pipelined."""
        with self._redis.pipeline(transaction=False) as pipe:
            for shard in self._keys.shards():
                pipe.zcard(self._keys.live_sessions(shard))
            return sum(int(count) for count in pipe.execute())

    def _newest_across_shards(self, zset_of: Callable[[int], str], high: float | str, low: float | str,
                              limit: int | None) -> list[str]:
        """Members of a sharded index (``zset_of(shard)``) scored in [low, high], newest first, merged over the
        shards (one pipelined read; a cluster client sends one per node)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for shard in self._keys.shards():
                if limit is None:
                    pipe.zrevrangebyscore(zset_of(shard), high, low, withscores=True)
                else:
                    pipe.zrevrangebyscore(zset_of(shard), high, low, start=0, num=limit, withscores=True)
            replies = pipe.execute()
        merged = heapq.merge(*replies, key=lambda pair: -pair[1])
        return [as_text(member) for member, _ in itertools.islice(merged, limit)]

    def recent_calls(self, limit: int = 100, *, number: str | None = None, since: float | None = None,
                     until: float | None = None) -> list[dict[str, str]]:
        """Recent call legs, newest first, optionally only those to/from ``number`` within [since, until]."""
        members = self._newest_across_shards(self._keys.recent_calls, until if until is not None else "+inf",
                                             since if since is not None else "-inf", None)
        calls: list[dict[str, str]] = []
        for member in members:
            carrier, _, call_id = member.partition(":")
            record = self.call_record(carrier, call_id)
            if not record or (number and number not in (record.get("to"), record.get("from"))):
                continue
            calls.append({"call_id": call_id, **record})
            if len(calls) >= limit:
                break
        return calls
