"""The live supervisor console: Server-Sent Events for ``/admin/live`` and a page per live session.

``GET /admin/live/events`` streams, from Redis (so from whichever instance relays the legs):

- without ``?session=``: a ``snapshot`` of the live sessions, then a ``row`` whenever a session appears or
  changes and a ``gone`` when it ends (the list page adds and drops rows without a reload);
- with ``?session=<id>``: that session's transcript lines, leg events and relay health, in order.

Every event carries the Redis Stream entry id as its SSE ``id``, so a reconnecting ``EventSource`` resumes with
``Last-Event-ID`` (or ``?after=`` from the page's first render) and misses nothing still in the capped stream.
A comment every :data:`KEEPALIVE_SECONDS` keeps proxies from closing an idle stream. No thread is held per
client: the response is a generator that blocks in ``XREAD BLOCK`` on a cooperative (gevent) socket, and ends
after :data:`MAX_STREAM_SECONDS` so the browser reconnects and the admin session is checked again.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, abort, current_app, render_template, request, stream_with_context
from flask.typing import ResponseReturnValue

from app.admin.blueprint import bp
from app.admin.presenters import relay_health
from app.calls.events import (
    LEG, RELAY_HEALTH, SESSION, TRANSCRIPT, LiveEvent, SessionEventLog, event_log_for, valid_stream_id,
)
from app.extensions import Services, services

KEEPALIVE_SECONDS = 15.0
#: ``XREAD BLOCK`` per round: below the Redis client's 2 s socket timeout.
BLOCK_MS = 1000
#: A stream ends after this long; ``EventSource`` reconnects (after :data:`RETRY_MS`) and resumes.
MAX_STREAM_SECONDS = 300.0
RETRY_MS = 1000
#: How often the list stream re-reads the live set (sessions the reaper ended leave no leg event).
RECONCILE_SECONDS = 5.0
#: Transcript events rendered into the session page (the JavaScript keeps at most as many rows).
PAGE_EVENTS = 300
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def sse(event: str, data: str, event_id: str | None = None) -> str:
    """One Server-Sent Event (``data`` is one line of JSON)."""
    return (f"id: {event_id}\n" if event_id else "") + f"event: {event}\ndata: {data}\n\n"


def valid_session_id(session_id: str) -> str:
    """``session_id`` when it has the shape of a Kallglot session id (it goes into Redis keys and Kallglot URL
    paths), else a 404."""
    if not SESSION_ID.match(session_id):
        abort(404, description="no such session")
    return session_id


def session_record_or_404(svc: Services, session_id: str) -> dict[str, str]:
    """Our record of the session, or a 404 for a malformed or unknown id (live and after-call pages alike)."""
    record = svc.lifecycle.session_record(valid_session_id(session_id))
    if not record:
        abort(404, description="no such session")
    return record


def _resume_point(default: str) -> str:
    """Where a stream starts: the browser's ``Last-Event-ID``, else ``?after=``, else ``default``."""
    value = request.headers.get("Last-Event-ID") or request.args.get("after") or default
    if not valid_stream_id(value):
        abort(400, description="Last-Event-ID / after must be a stream id like 1700000000000-0")
    return value


def live_row(svc: Services, session_id: str) -> dict[str, Any] | None:
    """What the live list shows of one session (None when it is no longer live)."""
    record = svc.lifecycle.session_record(session_id)
    if not record or record.get("status") == "ended":
        return None
    now, timeout = time.time(), float(svc.settings.heartbeat_timeout_seconds)
    legs = []
    for name, state in sorted(record.items()):
        if name.startswith("leg:"):
            _, carrier, call_id = name.split(":", 2)
            call = svc.lifecycle.call_record(carrier, call_id)
            # The same relay health the server-rendered list shows, so a live update never drops it.
            deadline = svc.lifecycle.relay_deadline(session_id, carrier, call_id) if state == "live" else None
            legs.append({"carrier": carrier, "call_id": call_id, "state": state, "speaker": call.get("speaker", ""),
                         "from": call.get("from", ""),
                         "relay": relay_health(deadline, timeout, now) if state == "live" else ""})
    return {"id": session_id, "status": record.get("status", ""), "carrier": record.get("carrier", ""),
            "mode": record.get("mode", ""), "from": record.get("from", ""), "to": record.get("to", ""),
            "created_at": record.get("created_at", ""), "held_until": record.get("held_until", ""), "legs": legs}


def _live_ids(svc: Services) -> set[str]:
    return svc.lifecycle.live_session_ids()


def _list_stream(svc: Services, log: SessionEventLog, after: str) -> Iterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    after = after if after != "0-0" else log.last_change_id()  # before the snapshot: no change slips between
    shown = {sid: row for sid in _live_ids(svc) if (row := live_row(svc, sid)) is not None}
    yield sse("snapshot", json.dumps(list(shown.values())), after)
    started = last_sent = reconciled = time.monotonic()
    while (now := time.monotonic()) - started < MAX_STREAM_SECONDS:
        changes = log.wait(svc.keys.live_changes(), after, block_ms=BLOCK_MS)
        touched = {c.session_id for c in changes}
        after = changes[-1].id if changes else after
        now = time.monotonic()
        if now - reconciled >= RECONCILE_SECONDS:
            reconciled = now
            live = _live_ids(svc)
            touched |= (live - shown.keys()) | (shown.keys() - live)
        for session_id in sorted(touched):
            row = live_row(svc, session_id)
            if row is None and shown.pop(session_id, None) is not None:
                yield sse("gone", json.dumps({"id": session_id}), after)
            elif row is not None and row != shown.get(session_id):
                shown[session_id] = row
                yield sse("row", json.dumps(row), after)
            else:
                continue
            last_sent = now
        if now - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = now


def _session_stream(svc: Services, log: SessionEventLog, session_id: str, after: str) -> Iterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    key = svc.keys.session_live_events(session_id)
    started = last_sent = time.monotonic()
    while time.monotonic() - started < MAX_STREAM_SECONDS:
        events = log.wait(key, after, block_ms=BLOCK_MS, count=500)
        for event in events:
            after = event.id
            yield sse(event.kind, event.to_json(), event.id)
        now = time.monotonic()
        if events:
            last_sent = now
        elif now - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = now


@bp.get("/live/events")
def live_events() -> ResponseReturnValue:
    """Server-Sent Events of the live list, or of one session's transcript and legs (``?session=``)."""
    svc = services()
    log, _ = event_log_for(current_app)
    session_id = request.args.get("session", "")
    if session_id:
        stream = _session_stream(svc, log, valid_session_id(session_id), _resume_point("0-0"))
    else:
        stream = _list_stream(svc, log, _resume_point("0-0"))
    return Response(stream_with_context(stream), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def transcript_lines(events: list[LiveEvent]) -> list[dict[str, Any]]:
    """Transcript rows for the page: finals in order, each speaker's newest partial last (finals replace it)."""
    lines: list[dict[str, Any]] = []
    open_partials: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.kind != TRANSCRIPT:
            continue
        slot = event.data.get("item") or event.data.get("speaker", "")
        if event.data.get("final"):
            open_partials.pop(slot, None)
            lines.append(event.data)
        else:
            open_partials[slot] = event.data
    return lines + list(open_partials.values())


@bp.get("/live/<session_id>")
def live_session(session_id: str) -> ResponseReturnValue:
    """One session as it happens: transcript side by side with its translation, legs, relay health, End."""
    svc = services()
    record = session_record_or_404(svc, session_id)
    log, _ = event_log_for(current_app)
    events = log.latest(session_id, PAGE_EVENTS)
    legs = []
    for (carrier, call_id), state in sorted(svc.lifecycle.session_legs(session_id).items()):
        call = svc.lifecycle.call_record(carrier, call_id)
        legs.append({"carrier": carrier, "call_id": call_id, "state": state, "speaker": call.get("speaker", ""),
                     "restarts": call.get("stream_restarts", "0")})
    health = {}
    for event in events:
        if event.kind == RELAY_HEALTH:
            health[event.data.get("speaker", "")] = event.data
    ended = record.get("status") == "ended" or any(
        e.kind == SESSION and e.data.get("state") == "ended" for e in events)
    return render_template("admin/live_session.html", session_id=session_id, record=record, legs=legs,
                           lines=transcript_lines(events), health=health, ended=ended,
                           leg_events=[e for e in events if e.kind == LEG][-20:],
                           last_id=events[-1].id if events else "0-0", max_lines=PAGE_EVENTS)
