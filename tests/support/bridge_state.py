"""Read (never write) the bridge's Redis state, to assert on end states instead of sleeping and counting."""
from __future__ import annotations

import time

import redis

from app.redis_keys import RedisKeys


def _text(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class BridgeState:
    """The Redis records of a bridge running under ``namespace`` (see :mod:`app.redis_keys`)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.redis = client
        self.keys = RedisKeys(namespace)

    def session(self, session_id: str) -> dict[str, str]:
        """The session's hash (``status``, ``end_reason``, ``leg:*``…)."""
        return _text(self.redis.hgetall(self.keys.session(session_id)))

    def call(self, carrier: str, call_id: str) -> dict[str, str]:
        """One leg's description and state (``session_id``, ``state``, ``end_reason``, ``clean``…)."""
        record = _text(self.redis.hgetall(self.keys.call(carrier, call_id)))
        if "session_id" in record:
            record.update(_text(self.redis.hgetall(self.keys.leg(record["session_id"], carrier, call_id))))
        return record

    def heartbeat_expiry(self, carrier: str, call_id: str) -> float | None:
        """When the leg's heartbeat runs out (epoch seconds), or None when it has none."""
        session_id = self.call(carrier, call_id).get("session_id")
        if session_id is None:
            return None
        return self.redis.zscore(self.keys.heartbeats(self.keys.shard_of(session_id)), f"{carrier}:{call_id}")

    def has_live_heartbeat(self, carrier: str, call_id: str) -> bool:
        """Whether the leg has a heartbeat that has not run out."""
        expiry = self.heartbeat_expiry(carrier, call_id)
        return expiry is not None and expiry > time.time()

    def deadline(self, session_id: str) -> float | None:
        """When the session is due to be ended (held, or an end to retry), or None when nothing is due."""
        return self.redis.zscore(self.keys.deadlines(self.keys.shard_of(session_id)), session_id)

    def end_claim(self, session_id: str) -> str | None:
        """Who claimed (or recorded) the session's one end."""
        raw = self.redis.get(self.keys.session_end_claim(session_id))
        return raw.decode() if raw is not None else None

    def settled_ended(self, session_id: str) -> bool:
        """The end state of an ended session: status ended, the end recorded for good, nothing left due."""
        claim = self.end_claim(session_id) or ""
        return (self.session(session_id).get("status") == "ended" and claim.startswith("ended:")
                and self.deadline(session_id) is None)

    def flush(self) -> None:
        """Delete every key of this namespace (before a test, so no earlier test's state is reaped into it)."""
        for key in self.redis.scan_iter(match=f"{self.keys.namespace}:*", count=500):
            self.redis.delete(key)
