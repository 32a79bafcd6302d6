"""Live session events for the supervisor console: a capped Redis Stream per session, plus one global stream.

Vendor-free. Whichever instance holds a leg appends what happens on it — transcript lines (original and
translation, partial or final), the leg's stream starting, being lost, re-attached or ending, relay health —
to ``RedisKeys.session_live_events``; the admin's Server-Sent Events endpoint reads them back on any instance
(``XREAD BLOCK``), so a page served by one instance follows a leg relayed by another.

Both streams are bounded twice: ``XADD MAXLEN ~`` keeps about :data:`MAX_EVENTS_PER_SESSION` entries, and an
``EXPIRE`` lets an abandoned stream vanish (request handlers refresh it with every append; the relay's
forwarder at most once a minute per stream, :data:`TTL_REFRESH_SECONDS`). The after-call transcript comes from
Kallglot's REST API, not from here.

The relay must never wait on Redis per frame: :class:`EventForwarder` takes events with a non-blocking
``put_nowait`` into a bounded queue, and one background thread (a greenlet under gevent) writes them in
batches (one Lua script call each; a pipeline on a Redis Cluster). When Redis is slow or down the queue fills
and further events are dropped and counted — the call's audio is never held up for a transcript line.

The writer lingers (:data:`DEFAULT_LINGER_SECONDS`, setting ``LIVE_EVENTS_LINGER_MS``) after the first event
of a batch before draining the queue: at 200 calls × 1 line/s that is one pipeline per linger instead of one
per event, and while it sleeps a ``publish`` wakes nobody. Measured on the load benchmark, the per-event
wake-up and round trip, not the parsing, was most of the forwarding cost (README, Capacity). The linger is
far inside the live console's 1 s budget.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.cluster import RedisCluster

from app.background import spawn
from app.redis_keys import RedisKeys, as_text, as_text_map

log = logging.getLogger(__name__)

#: Entries kept per session stream (approximately: ``MAXLEN ~`` trims whole radix-tree nodes).
MAX_EVENTS_PER_SESSION = 2000
#: Entries kept in the global "live sessions changed" stream.
MAX_LIVE_CHANGES = 1000
#: A session's live events disappear this long after its last event (the post-call view reads Kallglot).
EVENTS_TTL_SECONDS = 6 * 3600
#: Events waiting for the writer; beyond this they are dropped (Redis is stalled; audio comes first).
FORWARD_QUEUE_SIZE = 10_000
#: Most events written per pipeline round trip.
FORWARD_BATCH = 1000
#: How long the writer waits after a batch's first event for more to join it (one pipeline carries them all).
DEFAULT_LINGER_SECONDS = 0.04
#: The forwarder refreshes a stream's ``EXPIRE`` at most this often (the TTL is hours; a refresh with every
#: transcript line was a third of the commands it sent).
TTL_REFRESH_SECONDS = 60.0
#: Streams whose last refresh the forwarder remembers before it forgets the stale ones.
TTL_MEMO_SIZE = 10_000

# Event kinds. ``transcript`` carries speaker/text/language/translation/final; the others describe legs.
TRANSCRIPT = "transcript"
LEG = "leg"
RELAY_HEALTH = "relay"
SESSION = "session"

#: Leg states announced on the global stream too (the live list adds or drops the session's row).
LIVE_LIST_CHANGES = frozenset({"started", "ended", "lost", "reattached", "agent_joined", "fallback"})

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

#: The writer's whole batch in one command (standalone Redis and Sentinel): ARGV[1] = entries, then per entry its
#: MAXLEN, kind, session id and data (KEYS[i] its stream), then the TTL for the remaining KEYS. One command and one
#: reply per batch instead of an XADD (and its reply, parsed in Python) per event: most of the forwarder's CPU
#: per transcript line was redis-py's per-command work (issue 16, README Capacity).
_APPEND_BATCH = """
local n = tonumber(ARGV[1])
local a = 2
for i = 1, n do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[a], '*', 'kind', ARGV[a + 1], 'session_id', ARGV[a + 2],
             'data', ARGV[a + 3])
  a = a + 4
end
for i = n + 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[a])
end
return n
"""


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

    def append_to(self, pipe: Any, session_id: str, kind: str, data: Mapping[str, Any]) -> None:
        """Queue one event on ``pipe`` (a Redis pipeline); leg changes are announced globally as well."""
        self.append_batch_to(pipe, [(session_id, kind, data)])

    def _entries(self, batch: list[tuple[str, str, Mapping[str, Any]]]
                 ) -> tuple[list[tuple[str, int, str, str, bytes]], set[str]]:
        """``(stream key, MAXLEN, kind, session id, data JSON)`` per entry to add — an event, and for a live-list
        change its announcement on the global stream — and the set of streams written."""
        entries: list[tuple[str, int, str, str, bytes]] = []
        changes_key = self._keys.live_changes()
        stream_key = self._keys.session_live_events
        for session_id, kind, data in batch:
            # orjson: ~5x json.dumps on a transcript line, and the same JSON text (UTF-8, not \u-escaped).
            entries.append((stream_key(session_id), self.max_events, kind, session_id,
                            orjson.dumps(data if isinstance(data, dict) else dict(data))))
            if kind == SESSION or (kind == LEG and data.get("state") in LIVE_LIST_CHANGES):
                entries.append((changes_key, MAX_LIVE_CHANGES, kind, session_id,
                                orjson.dumps({"state": data.get("state", "")})))
        return entries, {entry[0] for entry in entries}

    def append_batch_to(self, pipe: Any, batch: list[tuple[str, str, Mapping[str, Any]]], *,
                        ttl_due: Callable[[str], bool] | None = None) -> None:
        """Queue ``(session_id, kind, data)`` events on ``pipe``: one ``XADD`` each, then one ``EXPIRE`` per
        stream written (not per event) — only for the streams ``ttl_due`` says need it, when given."""
        entries, touched = self._entries(batch)
        for key, maxlen, kind, session_id, data in entries:
            pipe.xadd(key, {"kind": kind, "session_id": session_id, "data": data}, maxlen=maxlen, approximate=True)
        for key in touched:
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
        entries, touched = self._entries(batch)
        keys: list[str] = [entry[0] for entry in entries]
        args: list[Any] = [len(entries)]
        for _, maxlen, kind, session_id, data in entries:
            args += (maxlen, kind, session_id, data)
        keys += [key for key in touched if ttl_due is None or ttl_due(key)]
        args.append(self.ttl_seconds)
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


class EventForwarder:
    """Non-blocking front of :class:`SessionEventLog` for the media relay: a bounded queue and one writer."""

    def __init__(self, events: SessionEventLog, *, queue_size: int = FORWARD_QUEUE_SIZE,
                 linger_seconds: float = DEFAULT_LINGER_SECONDS, batch_size: int = FORWARD_BATCH) -> None:
        self._events = events
        self._linger = max(0.0, linger_seconds)
        self._batch_size = max(1, batch_size)
        # (session id, kind, data or what ``build`` makes it from, build or None): see publish_built.
        self._queue: queue.Queue[tuple[str, str, Any, Callable[[Any], dict[str, Any]] | None]] = \
            queue.Queue(maxsize=queue_size)
        self._started = threading.Lock()
        self._writer: threading.Thread | None = None
        self.dropped = 0
        self.written = 0
        #: Pipelines sent (each carries one batch): with the linger, far fewer than events.
        self.batches = 0
        self._ttl_refreshed: dict[str, float] = {}  # stream key -> monotonic time its EXPIRE was last sent

    def _ttl_due(self, key: str) -> bool:
        """True (and remembered) when ``key``'s EXPIRE was not sent within :data:`TTL_REFRESH_SECONDS`."""
        now = time.monotonic()
        last = self._ttl_refreshed.get(key)
        if last is not None and now - last < TTL_REFRESH_SECONDS:
            return False
        if len(self._ttl_refreshed) >= TTL_MEMO_SIZE:  # ended sessions' streams: forget what no longer matters
            self._ttl_refreshed = {k: t for k, t in self._ttl_refreshed.items() if now - t < TTL_REFRESH_SECONDS}
            if len(self._ttl_refreshed) >= TTL_MEMO_SIZE:  # that many live streams: refresh more often instead
                self._ttl_refreshed.clear()
        self._ttl_refreshed[key] = now
        return True

    def publish(self, session_id: str, kind: str, data: dict[str, Any]) -> bool:
        """Hand one event to the writer without waiting; False (and counted) when the queue is full."""
        return self.publish_built(session_id, kind, None, data)

    def publish_built(self, session_id: str, kind: str, build: Callable[[Any], dict[str, Any]] | None,
                      source: Any) -> bool:
        """Like :meth:`publish`, but the writer makes the event's data with ``build(source)``: the relay's media
        greenlet does a queue put and nothing else per transcript line. ``build`` must not block; if it raises,
        the event is dropped and counted."""
        if self._writer is None:
            self._start()
        try:
            self._queue.put_nowait((session_id, kind, source, build))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("live events: queue full, %d dropped so far (Redis slow?)", self.dropped)
            return False
        return True

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything published so far is written (tests, shutdown); True when it was."""
        # Woken by the writer's last task_done, not a poll: a waiting caller costs no wake-ups (the forward-cost
        # benchmark waits here once per simulated second).
        done = getattr(self._queue, "all_tasks_done", None)
        if done is None:  # gevent's queue (the process is monkey-patched): its join takes a timeout
            return bool(self._queue.join(timeout))  # type: ignore[call-arg]
        with done:
            return bool(done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout))

    def _start(self) -> None:
        with self._started:
            if self._writer is None:
                self._writer = spawn(self._run, name="live-events-writer")

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            if self._linger:  # let the other calls' lines join this pipeline (gevent: a cooperative sleep)
                time.sleep(self._linger)
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                events = [(session_id, kind, data if build is None else build(data))
                          for session_id, kind, data, build in batch]
                self._events.append_batch(events, ttl_due=self._ttl_due)
                self.written += len(batch)
            except redis.RedisError as exc:  # the events are lost; the calls go on
                self._ttl_refreshed.clear()  # an XADD may have landed without its EXPIRE: send it next time
                self.dropped += len(batch)
                log.warning("live events: %d not written: %s", len(batch), exc)
            except Exception:  # a bug in a build: lose the batch, keep the writer (else every later event is lost)
                self.dropped += len(batch)
                log.exception("live events: %d not written", len(batch))
            finally:
                self.batches += 1
                for _ in batch:
                    self._queue.task_done()


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
