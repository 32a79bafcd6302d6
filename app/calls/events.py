"""Live session events for the supervisor console: a capped Redis Stream per session, plus one global stream.

Vendor-free. Whichever instance holds a leg appends what happens on it — transcript lines (original and
translation, partial or final), the leg's stream starting, being lost, re-attached or ending, relay health —
to ``RedisKeys.session_live_events``; the admin's Server-Sent Events endpoint reads them back on any instance
(``XREAD BLOCK``), so a page served by one instance follows a leg relayed by another.

Both streams are bounded twice: ``XADD MAXLEN ~`` keeps about :data:`MAX_EVENTS_PER_SESSION` entries, and an
``EXPIRE`` lets an abandoned stream vanish (request handlers refresh it with every append; the relay's
forwarder at most once a minute per stream, ``app.calls.forwarder.TTL_REFRESH_SECONDS``). The after-call transcript comes from
Kallglot's REST API, not from here.

The relay must never wait on Redis per frame: it hands events to :class:`~app.calls.forwarder.EventForwarder`
(a bounded deque and one writer greenlet, :mod:`app.calls.forwarder`), whose writer calls
:meth:`SessionEventLog.append_batch` once per batch (one Lua script call; a pipeline on a Redis Cluster). When
Redis is slow or down, events are dropped and counted — never audio. Measured on the load benchmark, the
per-event wake-up and round trip, not the parsing, was most of the forwarding cost (README, Capacity).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.cluster import RedisCluster

from app.calls.forwarder import TRANSCRIPT, EventForwarder
from app.redis_keys import RedisKeys, as_text, as_text_map

log = logging.getLogger(__name__)

#: Entries kept per session stream (approximately: ``MAXLEN ~`` trims whole radix-tree nodes).
MAX_EVENTS_PER_SESSION = 2000
#: Entries kept in the global "live sessions changed" stream.
MAX_LIVE_CHANGES = 1000
#: A session's live events disappear this long after its last event (the post-call view reads Kallglot).
EVENTS_TTL_SECONDS = 6 * 3600

# Event kinds (TRANSCRIPT comes from app.calls.forwarder, which coalesces its partials). ``transcript`` carries speaker/text/language/translation/final; the others describe legs.
LEG = "leg"
RELAY_HEALTH = "relay"
SESSION = "session"

#: Leg states announced on the global stream too (the live list adds or drops the session's row).
LIVE_LIST_CHANGES = frozenset({"started", "ended", "lost", "reattached", "agent_joined", "fallback"})

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

#: The writer's whole batch in one command (standalone Redis and Sentinel). ARGV: the number of session-stream
#: entries n, of global-stream entries m, their two MAXLENs, the TTL, then kind, session id and data per entry
#: (KEYS[i] its stream; the remaining KEYS get the TTL). One command and one reply per batch instead of an XADD
#: (and its reply, parsed in Python) per event: most of the forwarder's CPU per transcript line was redis-py's
#: per-command work; and three arguments per entry, not four (the MAXLEN once), is less to pack per line
#: (issue 16, README Capacity).
_APPEND_BATCH = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 6
for i = 1, n + m do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', i <= n and ARGV[3] or ARGV[4], '*', 'kind', ARGV[a],
             'session_id', ARGV[a + 1], 'data', ARGV[a + 2])
  a = a + 3
end
for i = n + m + 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return n + m
"""
#: Session stream keys the log remembers (building one hashes the session id for its shard): beyond, it forgets.
STREAM_KEY_MEMO_SIZE = 10_000


def valid_stream_id(value: str) -> bool:
    """True for a Redis Stream entry id like ``1700000000000-0`` (what SSE ``Last-Event-ID`` carries)."""
    return bool(_STREAM_ID.match(value))


@dataclass(frozen=True)
class LiveEvent:
    """One entry of a session's (or the global) stream: its Redis id and its decoded fields."""

    id: str
    kind: str
    session_id: str
    data: dict[str, Any]

    def to_json(self) -> str:
        """The event as the SSE ``data:`` line and the page's JavaScript read it."""
        return json.dumps({"id": self.id, "kind": self.kind, "session_id": self.session_id, **self.data},
                          separators=(",", ":"))


def _decode(entry_id: Any, fields: Mapping[Any, Any]) -> LiveEvent:
    text = as_text_map(fields)
    try:
        data = json.loads(text.get("data", "{}"))
    except ValueError:
        data = {}
    return LiveEvent(id=as_text(entry_id) if isinstance(entry_id, bytes) else str(entry_id),
                     kind=text.get("kind", ""), session_id=text.get("session_id", ""),
                     data=data if isinstance(data, dict) else {})


class SessionEventLog:
    """Appends to and reads the per-session and global live-event streams."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, max_events: int = MAX_EVENTS_PER_SESSION,
                 ttl_seconds: int = EVENTS_TTL_SECONDS) -> None:
        self._redis = client
        self._keys = keys
        self.max_events = max_events
        self.ttl_seconds = ttl_seconds
        # A cluster spreads the sessions' streams over slots, which one script call cannot span: pipelines there.
        self._append_script = None if isinstance(client, RedisCluster) else client.register_script(_APPEND_BATCH)
        self._stream_keys: dict[str, str] = {}  # session id -> its stream key (see _stream_key)

    def append_to(self, pipe: Any, session_id: str, kind: str, data: Mapping[str, Any]) -> None:
        """Queue one event on ``pipe`` (a Redis pipeline); leg changes are announced globally as well."""
        self.append_batch_to(pipe, [(session_id, kind, data)])

    def _stream_key(self, session_id: str) -> str:
        """The session's stream key, remembered (the writer sends a line per call every second or so)."""
        key = self._stream_keys.get(session_id)
        if key is None:
            if len(self._stream_keys) >= STREAM_KEY_MEMO_SIZE:  # ended sessions: start over
                self._stream_keys.clear()
            key = self._stream_keys[session_id] = self._keys.session_live_events(session_id)
        return key

    def _entries(self, batch: list[tuple[str, str, Mapping[str, Any]]]
                 ) -> tuple[list[tuple[str, str, str, bytes]], list[tuple[str, str, str, bytes]]]:
        """``(stream key, kind, session id, data JSON)`` per entry to add: the events on their sessions' streams,
        and for each live-list change its announcement on the global stream."""
        events: list[tuple[str, str, str, bytes]] = []
        changes: list[tuple[str, str, str, bytes]] = []
        stream_key = self._stream_key
        for session_id, kind, data in batch:
            # orjson: ~5x json.dumps on a transcript line, and the same JSON text (UTF-8, not \u-escaped).
            events.append((stream_key(session_id), kind, session_id,
                           orjson.dumps(data if isinstance(data, dict) else dict(data))))
            if kind == SESSION or (kind == LEG and data.get("state") in LIVE_LIST_CHANGES):
                changes.append((self._keys.live_changes(), kind, session_id,
                                orjson.dumps({"state": data.get("state", "")})))
        return events, changes

    def append_batch_to(self, pipe: Any, batch: list[tuple[str, str, Mapping[str, Any]]], *,
                        ttl_due: Callable[[str], bool] | None = None) -> None:
        """Queue ``(session_id, kind, data)`` events on ``pipe``: one ``XADD`` each, then one ``EXPIRE`` per
        stream written (not per event) — only for the streams ``ttl_due`` says need it, when given."""
        events, changes = self._entries(batch)
        for entries, maxlen in ((events, self.max_events), (changes, MAX_LIVE_CHANGES)):
            for key, kind, session_id, data in entries:
                pipe.xadd(key, {"kind": kind, "session_id": session_id, "data": data}, maxlen=maxlen,
                          approximate=True)
        for key in {entry[0] for entry in events + changes}:
            if ttl_due is None or ttl_due(key):
                pipe.expire(key, self.ttl_seconds)

    def append_batch(self, batch: list[tuple[str, str, Mapping[str, Any]]], *,
                     ttl_due: Callable[[str], bool] | None = None) -> None:
        """Write ``(session_id, kind, data)`` events now, as :meth:`append_batch_to` would: one script call on a
        standalone or Sentinel Redis, a pipeline on a cluster."""
        if self._append_script is None:
            with self.pipeline() as pipe:
                self.append_batch_to(pipe, batch, ttl_due=ttl_due)
                pipe.execute()
            return
        events, changes = self._entries(batch)
        entries = events + changes
        keys: list[str] = [entry[0] for entry in entries]
        args: list[Any] = [len(events), len(changes), self.max_events, MAX_LIVE_CHANGES, self.ttl_seconds]
        for _, kind, session_id, data in entries:
            args += (kind, session_id, data)
        keys += [key for key in dict.fromkeys(keys) if ttl_due is None or ttl_due(key)]
        self._append_script(keys=keys, args=args)

    def pipeline(self) -> Any:
        """A non-transactional pipeline on the event log's Redis (batch several :meth:`append_to`)."""
        return self._redis.pipeline(transaction=False)

    def append(self, session_id: str, kind: str, data: Mapping[str, Any]) -> None:
        """Append one event now (request handlers; the relay goes through :class:`EventForwarder`)."""
        with self.pipeline() as pipe:
            self.append_to(pipe, session_id, kind, data)
            pipe.execute()

    def latest(self, session_id: str, count: int) -> list[LiveEvent]:
        """The last ``count`` events of a session, oldest first (the page's first render)."""
        entries = self._redis.xrevrange(self._keys.session_live_events(session_id), count=count)
        return [_decode(i, f) for i, f in reversed(entries)]

    def length(self, session_id: str) -> int:
        """How many events the session's stream holds now."""
        return int(self._redis.xlen(self._keys.session_live_events(session_id)))

    def last_change_id(self) -> str:
        """Id of the newest entry of the global stream (``0-0`` when empty): read changes after it."""
        entries = self._redis.xrevrange(self._keys.live_changes(), count=1)
        return as_text(entries[0][0]) if entries else "0-0"

    def wait(self, key: str, after: str, *, block_ms: int, count: int = 100) -> list[LiveEvent]:
        """Events of stream ``key`` after id ``after``, waiting up to ``block_ms`` for the first one."""
        reply = self._redis.xread({key: after}, count=count, block=block_ms)
        return [_decode(i, f) for _, entries in reply or [] for i, f in entries]


def transcript_event(*, speaker: str, text: str, final: bool, language: str = "", translation: str = "",
                     translation_language: str = "", item_id: str = "", at: float | None = None) -> dict[str, Any]:
    """The ``data`` of a transcript event (what was said, and its translation when Kallglot sent one); ``at``:
    when the relay received it (default now)."""
    data: dict[str, Any] = {"speaker": speaker, "text": text, "final": final,
                            "at": round(time.time() if at is None else at, 3)}
    if language:
        data["language"] = language
    if translation:
        data["translation"] = translation
        data["translation_language"] = translation_language
    if item_id:
        data["item"] = item_id
    return data


def leg_event(*, carrier: str, call_id: str, speaker: str, state: str, detail: str = "") -> dict[str, Any]:
    """The ``data`` of a leg event: ``state`` is started, lost, reattached, ended, agent_joined or fallback."""
    data: dict[str, Any] = {"carrier": carrier, "call_id": call_id, "speaker": speaker, "state": state,
                            "at": round(time.time(), 3)}
    if detail:
        data["detail"] = detail
    return data


EXTENSION_KEY = "live_events"


def event_log_for(app: Any) -> tuple[SessionEventLog, EventForwarder]:
    """The app's event log and its relay-side forwarder, built on first use and kept on ``app.extensions``."""
    found = app.extensions.get(EXTENSION_KEY)
    if found is None:
        svc = app.extensions["kallglot_bridge"]
        events = SessionEventLog(svc.redis, svc.keys)
        linger = svc.settings.live_events_linger_ms / 1000
        found = app.extensions.setdefault(EXTENSION_KEY, (events, EventForwarder(events, linger_seconds=linger)))
    return found


def announce_fallback(client: redis.Redis, keys: RedisKeys, session_id: str, *, carrier: str, call_id: str,
                      speaker: str, why: str) -> None:
    """Put a "fallback used" leg event on the session's live stream (and the live list): the caller got the
    profile's fallback (message, forward or hang-up) instead of translation, or no browser agent took the call.
    Written at once (request handlers and the reaper, never the media path); a Redis failure only costs the line."""
    if not session_id:
        return
    try:
        SessionEventLog(client, keys).append(session_id, LEG, leg_event(
            carrier=carrier, call_id=call_id, speaker=speaker, state="fallback", detail=why))
    except redis.RedisError as exc:
        log.warning("session=%s fallback event not written: %s", session_id, exc)
