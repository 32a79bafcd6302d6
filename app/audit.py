"""Audit trail of configuration changes (who, when, what): a capped JSON list in Redis, newest first.

Written by the admin UI (profile edits, imports, number connections, ended sessions) and the ``flask numbers``
CLI, so every change to how calls are handled can be traced. Entries hold no secrets.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from app.redis_keys import RedisKeys

#: Entries kept; older ones fall off the end.
MAX_AUDIT_ENTRIES = 1000


@dataclass(frozen=True)
class AuditEntry:
    """One change: ``who`` did ``action`` to ``target`` at ``at`` (epoch seconds); ``changes`` say what."""

    at: float
    who: str
    action: str
    target: str
    changes: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Appends and reads audit entries. Stateless apart from Redis: build one wherever needed."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._key = keys.admin_audit()

    def record(self, who: str, action: str, target: str, changes: dict[str, Any] | None = None) -> AuditEntry:
        """Append an entry (and drop the oldest beyond :data:`MAX_AUDIT_ENTRIES`)."""
        entry = AuditEntry(at=round(time.time(), 3), who=who, action=action, target=target, changes=changes or {})
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self._key, json.dumps(asdict(entry), sort_keys=True))
            pipe.ltrim(self._key, 0, MAX_AUDIT_ENTRIES - 1)
            pipe.execute()
        return entry

    def entries(self, limit: int = 200) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        return [AuditEntry(**json.loads(raw)) for raw in self._redis.lrange(self._key, 0, limit - 1)]


def diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, list[Any]]:
    """``field → [old, new]`` for every field whose value differs (a missing side counts as None)."""
    before, after = before or {}, after or {}
    return {name: [before.get(name), after.get(name)]
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)}
