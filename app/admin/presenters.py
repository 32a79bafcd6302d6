"""Turn the lifecycle's Redis records into rows for the live-calls and call-log pages."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.calls.lifecycle import SessionLifecycle
from app.extensions import Services


@dataclass(frozen=True)
class LegRow:
    """One carrier call leg."""

    carrier: str
    call_id: str
    state: str
    record: dict[str, str]
    relay: str = ""


@dataclass(frozen=True)
class SessionRow:
    """One live session and its legs."""

    id: str
    record: dict[str, str]
    legs: list[LegRow]
    duration: str


@dataclass(frozen=True)
class CallRow:
    """One call-log entry: a leg, its session, outcome and recorded events."""

    call_id: str
    record: dict[str, str]
    session: dict[str, str]
    outcome: str
    duration: str
    started: str
    events: list[dict[str, Any]] = field(default_factory=list)


def when(epoch: str | float | None) -> str:
    """``2025-01-31 14:05:09 UTC`` for an epoch timestamp (empty when unknown)."""
    try:
        return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def duration(start: str | None, end: str | None = None) -> str:
    """``1:02:03`` / ``2:03`` between two epoch timestamps (``end`` defaults to now)."""
    try:
        seconds = max(0, int((float(end) if end else time.time()) - float(start)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def relay_health(deadline: float | None, timeout: float, now: float) -> str:
    """How a leg's relay is doing, from its heartbeat deadline (the time it will count as lost)."""
    if deadline is None:
        return "no relay"
    left = deadline - now
    if left < 0:
        return "relay silent"  # overdue: the reaper is about to treat the leg as lost
    if left > timeout:
        return "stream starting"  # registered with the longer start grace, no beat yet
    return f"relay ok (beat {timeout - left:.0f}s ago)"


def live_sessions(svc: Services) -> list[SessionRow]:
    """Every session not yet ended, with its legs' records and relay health."""
    now, timeout = time.time(), float(svc.settings.heartbeat_timeout_seconds)
    rows = []
    for session in svc.lifecycle.live_sessions():
        legs = []
        for name, state in sorted(session.items()):
            if name.startswith("leg:"):
                _, carrier, call_id = name.split(":", 2)
                deadline = svc.lifecycle.relay_deadline(session["id"], carrier, call_id)
                legs.append(LegRow(carrier, call_id, state, svc.lifecycle.call_record(carrier, call_id),
                                   relay_health(deadline, timeout, now) if state == "live" else ""))
        rows.append(SessionRow(session["id"], session, legs, duration(session.get("created_at"))))
    return rows


def outcome(call: dict[str, str], session: dict[str, str], events: list[dict[str, Any]]) -> str:
    """A one-phrase outcome: in progress, error, fallback used, reconnected, ended cleanly, or dropped."""
    reasons = " ".join([call.get("end_reason", ""), session.get("end_reason", "")]
                       + [str(e.get("source", "")) for e in events]).lower()
    if call.get("state") == "live":
        return "in progress"
    if session.get("status") == "end_failed" or session.get("last_error") or "error" in reasons:
        return "error"
    if "fallback" in reasons:
        return "fallback used"
    if call.get("stream_restarts", "0") not in ("", "0") or "reconnect" in reasons or "reattach" in reasons:
        return "reconnected"
    return "ended abnormally" if call.get("clean") in ("0", "false") else "ended cleanly"


def call_log(lifecycle: SessionLifecycle, *, number: str | None, since: float | None, until: float | None,
             limit: int = 100) -> list[CallRow]:
    """Recent call legs (newest first) filtered by number and time, with session, outcome and events."""
    rows = []
    for call in lifecycle.recent_calls(limit, number=number or None, since=since, until=until):
        session = lifecycle.session_record(call["session_id"]) if call.get("session_id") else {}
        events = lifecycle.events(call.get("carrier", ""), call["call_id"])
        rows.append(CallRow(call["call_id"], call, session, outcome(call, session, events),
                            duration(call.get("created_at"), call.get("ended_at")), when(call.get("created_at")),
                            events))
    return rows
