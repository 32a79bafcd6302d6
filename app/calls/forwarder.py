"""The relay's side of the live console: :class:`EventForwarder` takes events without ever waiting, and one
writer (a greenlet under gevent) sends them to Redis in batches through :class:`~app.calls.events.SessionEventLog`.

Issue 16: forwarding must never block or slow the media path. So the media greenlet's part per event is an append
to a bounded :class:`collections.deque` and, only when the writer is idle, setting one :class:`threading.Event`
(no lock, no condition variable, no per-event ``task_done``: a :class:`queue.Queue` did both per event, about as
much as the rest of the put). When Redis is slow or down the deque fills and further events are dropped and
counted — the call's audio is never held up for a transcript line.

The writer lingers (``linger_seconds``, setting ``LIVE_EVENTS_LINGER_MS``) after waking, so one round trip
carries every event that arrived meanwhile (≈ 16 at 200 calls with a line per second per call). Within a batch a
partial transcript line that a later line of the same batch replaces on the page (the same Kallglot utterance id;
without an id, the same speaker) is not written at all: the page would replace it before anyone saw it, and real
Kallglot sends several partials per utterance (:func:`coalesce_partials`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis

from app.background import spawn

log = logging.getLogger(__name__)

#: The event kind of a transcript line (``app.calls.events`` re-exports it).
TRANSCRIPT = "transcript"
#: Events waiting for the writer; beyond this they are dropped (Redis is stalled; audio comes first).
FORWARD_QUEUE_SIZE = 10_000
#: Most events written per round trip.
FORWARD_BATCH = 1000
#: How long the writer waits after waking for more events to join the batch (one round trip carries them all).
DEFAULT_LINGER_SECONDS = 0.04
#: The forwarder refreshes a stream's ``EXPIRE`` at most this often (the TTL is hours; a refresh with every
#: transcript line was a third of the commands it sent).
TTL_REFRESH_SECONDS = 60.0
#: Streams whose last refresh the forwarder remembers before it forgets the stale ones.
TTL_MEMO_SIZE = 10_000

Event = tuple[str, str, Mapping[str, Any]]  # (session id, kind, data)


class EventSink(Protocol):
    """Where the writer sends a batch (:class:`~app.calls.events.SessionEventLog`)."""

    def append_batch(self, batch: list[Event], *, ttl_due: Callable[[str], bool] | None = None) -> None:
        """Write the events now (one round trip); raise :class:`redis.RedisError` when Redis fails."""


def coalesce_partials(events: list[Event]) -> list[Event]:
    """``events`` without the partial transcript lines that a later line of the same list replaces on the live
    page (``app/admin/static/live.js``: a line with an utterance id replaces that id's row; a line without one
    replaces its speaker's partial row). Finals and other kinds are always kept; the order is unchanged."""
    if sum(1 for _, kind, _ in events if kind == TRANSCRIPT) < 2:
        return events
    later: set[tuple[str, str, str]] = set()
    kept: list[Event] = []
    for event in reversed(events):
        session_id, kind, data = event
        if kind == TRANSCRIPT:
            item = data.get("item") or ""
            slot = (session_id, "item", item) if item else (session_id, "speaker", data.get("speaker") or "")
            if data.get("final") is False and slot in later:  # a line that says neither is kept
                continue  # replaced before anyone could see it
            later.add(slot)
        kept.append(event)
    kept.reverse()
    return kept


class EventForwarder:
    """Non-blocking front of the live-event log for the media relay: a bounded deque and one writer."""

    def __init__(self, events: EventSink, *, queue_size: int = FORWARD_QUEUE_SIZE,
                 linger_seconds: float = DEFAULT_LINGER_SECONDS, batch_size: int = FORWARD_BATCH) -> None:
        self._events = events
        self._linger = max(0.0, linger_seconds)
        self._batch_size = max(1, batch_size)
        # + 1: a queue.Queue writer held its batch's first event while it lingered, outside the bound; the deque
        # holds it too, so the same burst fits (queue_size events waiting besides the one that woke the writer).
        self._capacity = max(1, queue_size) + 1
        # (session id, kind, data or what ``build`` makes it from, build or None): see publish_built.
        self._pending: deque[tuple[str, str, Any, Callable[[Any], Mapping[str, Any]] | None]] = deque()
        self._wake = threading.Event()  # set by a publish while the writer may be waiting for work
        self._state = threading.Condition()  # guards _busy; flush waits on it
        self._busy = False  # the writer holds a batch it has not finished
        self._started = threading.Lock()
        self._writer: threading.Thread | None = None
        self.dropped = 0
        #: Events handled by the writer: sent to Redis, or left out as replaced (:attr:`coalesced`).
        self.written = 0
        #: Partial transcript lines left out because a later line of the same batch replaces them.
        self.coalesced = 0
        #: Round trips sent (each carries one batch): with the linger, far fewer than events.
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

    def publish(self, session_id: str, kind: str, data: Mapping[str, Any]) -> bool:
        """Hand one event to the writer without waiting; False (and counted) when the queue is full."""
        return self.publish_built(session_id, kind, None, data)

    def publish_built(self, session_id: str, kind: str, build: Callable[[Any], Mapping[str, Any]] | None,
                      source: Any) -> bool:
        """Like :meth:`publish`, but the writer makes the event's data with ``build(source)``: the relay's media
        greenlet does an append and nothing else per transcript line. ``build`` must not block; if it raises,
        the batch is dropped and counted."""
        if self._writer is None:
            self._start()
        pending = self._pending
        if len(pending) >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("live events: queue full, %d dropped so far (Redis slow?)", self.dropped)
            return False
        pending.append((session_id, kind, source, build))
        if not self._wake.is_set():  # set once per batch: while the writer lingers, the next appends skip this
            self._wake.set()
        return True

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything published so far is written (tests, shutdown); True when it was."""
        # Woken by the writer at the end of each batch, not a poll: a waiting caller costs no wake-ups (the
        # forward-cost benchmark waits here once per simulated second).
        with self._state:
            return bool(self._state.wait_for(lambda: not self._pending and not self._busy, timeout))

    def _start(self) -> None:
        with self._started:
            if self._writer is None:
                self._writer = spawn(self._run, name="live-events-writer")

    def _take(self) -> list[tuple[str, str, Any, Callable[[Any], Mapping[str, Any]] | None]]:
        """Up to a batch of the waiting events, oldest first (the writer marked busy first: see :meth:`flush`)."""
        pending, batch = self._pending, []
        with self._state:
            self._busy = True
        while pending and len(batch) < self._batch_size:
            batch.append(pending.popleft())
        if pending:  # more than a batch waited: go round again at once
            self._wake.set()
        return batch

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._linger:  # let the other calls' lines join this round trip (gevent: a cooperative sleep)
                time.sleep(self._linger)
            self._wake.clear()  # before taking: an event appended after the take sets it again
            batch = self._take()
            try:
                if batch:
                    self._write(batch)
            finally:
                with self._state:
                    self._busy = False
                    self._state.notify_all()

    def _write(self, batch: list[tuple[str, str, Any, Callable[[Any], Mapping[str, Any]] | None]]) -> None:
        try:
            events = coalesce_partials([(session_id, kind, data if build is None else build(data))
                                        for session_id, kind, data, build in batch])
            self._events.append_batch(events, ttl_due=self._ttl_due)
            self.written += len(batch)
            self.coalesced += len(batch) - len(events)
        except redis.RedisError as exc:  # the events are lost; the calls go on
            self._ttl_refreshed.clear()  # an XADD may have landed without its EXPIRE: send it next time
            self.dropped += len(batch)
            log.warning("live events: %d not written: %s", len(batch), exc)
        except Exception:  # a bug in a build: lose the batch, keep the writer (else every later event is lost)
            self.dropped += len(batch)
            log.exception("live events: %d not written", len(batch))
        finally:
            self.batches += 1
