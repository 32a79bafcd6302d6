"""Emulator state (long: one object behind one lock keeps every control-API view consistent; it grew with it).

In-memory state of the Kallglot emulator: sessions, stream tokens, connections, idempotency, faults.

Everything lives on one ``EmulatorState`` object (kept in ``app.extensions["kallglot_emulator"]``) and is
guarded by one lock, so REST handlers, stream handlers and the control API may run in any greenlet or thread.
Network sends never happen while that lock is held: a slow socket must not stall the whole emulator.
"""
from __future__ import annotations

import base64
import json
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from simple_websocket import ConnectionClosed

MODES = frozenset({"bidirectional_translation", "assistive_translation", "ai_agent", "help_chat_voice"})
# The docs promise "25+ languages" with ISO-639-1 examples; the full list was never captured.
LANGUAGES = frozenset(
    "en es de fr it pt nl pl ru uk tr ar he hi bn ur zh ja ko vi th id ms sv da no fi el cs ro hu".split()
)
SPEAKERS = frozenset({"customer", "agent"})
#: ``echo_no_transcripts``: echo, without the transcript lines (the load benchmark's transcript-cost toggle).
BEHAVIOURS = frozenset({"echo", "echo_no_transcripts", "silent"})
FAULT_ENDPOINTS = frozenset({"create", "get", "end", "connect"})
BYTES_PER_SECOND = 8000  # mu-law at 8 kHz mono is one byte per sample
_ID_ALPHABET = string.ascii_uppercase + string.digits


def random_id(prefix: str, length: int, alphabet: str = _ID_ALPHABET) -> str:
    """Return ``prefix`` followed by ``length`` random characters from ``alphabet``."""
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def iso_utc(timestamp: float | None) -> str | None:
    """Format an epoch timestamp the way the Kallglot docs show it (``2026-03-26T11:00:00Z``)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_lock() -> threading.Lock:
    # Looked up at call time so gevent's monkey-patched Lock is used even if this module was imported first.
    return threading.Lock()


@dataclass
class StreamConnection:
    """One accepted stream WebSocket (one call leg). Its sends are serialised by ``send_lock``."""

    ws: Any
    session_id: str
    live: bool = True
    send_lock: threading.Lock = field(default_factory=_new_lock)
    last_sequence: float | None = None
    sequences_increasing: bool = True
    audio_bytes: int = 0
    outputs_sent: int = 0
    pings_received: int = 0
    closed_with: int | None = None  # our close code, when the emulator closed first
    close_code: int | None = None  # how it ended as seen here (stream.observed_close_code)

    def send(self, message: dict[str, Any] | str) -> bool:
        """Send one text frame (a dict is JSON-encoded); return False if the socket is gone."""
        text = message if isinstance(message, str) else json.dumps(message)
        with self.send_lock:
            if not self.live:
                return False
            try:
                self.ws.send(text)
                return True
            except (ConnectionClosed, OSError):
                self.live = False
                return False

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket with a close frame carrying ``code``."""
        with self.send_lock:
            self.live = False
            if self.closed_with is None and getattr(self.ws, "connected", False):
                self.closed_with = code
            try:
                self.ws.close(reason=code, message=reason)
            except (ConnectionClosed, OSError):
                pass

    def drop(self) -> None:
        """Cut the TCP connection without a close frame, as a network failure would."""
        with self.send_lock:
            self.live = False
            try:
                self.ws.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class Session:
    """A Kallglot session plus everything the tests want to inspect about it."""

    mode: str
    source_language: str | None = None
    target_language: str | None = None
    routing: dict[str, Any] | None = None
    provider: str | None = None
    phone_number: str | None = None
    metadata: dict[str, Any] | None = None
    participants: list[dict[str, str]] | None = None
    idempotency_key: str | None = None
    id: str = field(default_factory=lambda: random_id("sess_", 26))
    status: str = "created"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    end_calls: int = 0
    tokens: dict[str, float] = field(default_factory=dict)  # stream token -> expiry (epoch seconds)
    connections: list[StreamConnection] = field(default_factory=list)
    audio: dict[str, bytearray] = field(default_factory=dict)
    audio_sequences: dict[str, list[float]] = field(default_factory=dict)
    audio_messages: dict[str, int] = field(default_factory=dict)
    errors_sent: list[str] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)  # transcript turns said on the stream
    webhooks_sent: bool = False  # the after-call webhooks went out (artifacts.notify_ended)
    sip_legs: list[dict[str, Any]] = field(default_factory=list)  # SIP calls to the session (emulator/sip.py)

    @property
    def duration_seconds(self) -> float | None:
        """Seconds from start (or creation, if never started) to end; None while running."""
        if self.ended_at is None:
            return None
        return round(self.ended_at - (self.started_at or self.created_at), 1)

    def live_connections(self) -> list[StreamConnection]:
        """Connections whose socket is still open."""
        return [conn for conn in self.connections if conn.live]

    def public_view(self, *, stream: dict[str, Any] | None = None, with_times: bool = True) -> dict[str, Any]:
        """The REST shape of create or, with ``with_times``, of retrieve; ``stream`` only if given."""
        view: dict[str, Any] = {
            "id": self.id, "object": "session", "status": self.status, "mode": self.mode,
            "provider": self.provider, "phone_number": self.phone_number,
            "source_language": self.source_language, "target_language": self.target_language,
        }
        if stream is not None:
            view["stream"] = stream
        view.update(recording={"enabled": False}, metadata=self.metadata, call=None,
                    created_at=iso_utc(self.created_at))
        if with_times:
            view.update(started_at=iso_utc(self.started_at), ended_at=iso_utc(self.ended_at))
        return view

    def end_summary(self) -> dict[str, Any]:
        """The body ``POST /v1/sessions/{id}/end`` answers with."""
        return {"id": self.id, "object": "session", "status": "ended",
                "duration_seconds": self.duration_seconds, "ended_at": iso_utc(self.ended_at)}

    def control_view(self) -> dict[str, Any]:
        """Everything the control API exposes about this session (caller holds the state lock)."""
        view = self.public_view()
        view.update(
            routing=self.routing, participants=self.participants, idempotency_key=self.idempotency_key, end_reason=self.end_reason,
            duration_seconds=self.duration_seconds, end_calls=self.end_calls,
            connections_live=len(self.live_connections()), connections_total=len(self.connections),
            audio_input_messages=dict(self.audio_messages),
            audio_received={speaker: base64.b64encode(data).decode() for speaker, data in self.audio.items()},
            audio_sequences={speaker: list(seqs) for speaker, seqs in self.audio_sequences.items()},
            sequences_increasing=all(conn.sequences_increasing for conn in self.connections),
            connections=[{"live": conn.live, "sequences_increasing": conn.sequences_increasing,
                          "audio_bytes": conn.audio_bytes, "outputs_sent": conn.outputs_sent,
                          "close_code": conn.close_code, "pings_received": conn.pings_received,
                          "carrier": getattr(conn, "carrier", "")}
                         for conn in self.connections],
            errors_sent=list(self.errors_sent), sip_legs=[dict(leg) for leg in self.sip_legs],
        )
        return view


@dataclass
class IdempotencyRecord:
    """What one ``Idempotency-Key`` produced; ``response`` is None while the first request still runs."""

    fingerprint: str
    response: tuple[int, bytes] | None = None


class EmulatorState:
    """All mutable emulator state behind one lock."""

    def __init__(self, api_key: str, token_ttl_seconds: float, public_url: str | None = None) -> None:
        #: How an injected fault's ``delay_seconds`` is waited out (looked up per call, so gevent's patched
        #: ``time.sleep`` is used under gunicorn); a test may record the delays instead of waiting them.
        self.pause: Callable[[float], None] = lambda seconds: time.sleep(seconds)
        self.api_key = api_key
        self.token_ttl_seconds = token_ttl_seconds
        self.public_url = public_url.rstrip("/") if public_url else None
        self.lock = threading.RLock()
        self.sessions: dict[str, Session] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        self.faults: list[dict[str, Any]] = []
        self.analyses: dict[str, dict[str, Any]] = {}
        self.behaviour = "echo"
        #: Counts resets: a request that waited out an injected delay across a reset must not change the new
        #: state (a test's slow create would otherwise land in the next test as a stray session).
        self.generation = 0

    # --- sessions and tokens -------------------------------------------------------------------
    def add_session(self, session: Session) -> Session:
        """Store a newly created session."""
        with self.lock:
            self.sessions[session.id] = session
        return session

    def add_analysis(self, session: Session, kind: str) -> dict[str, Any]:
        """Record an analysis request of ``session`` (complete once the session has ended)."""
        analysis = {"id": random_id("anl_", 26), "session_id": session.id, "type": kind, "created_at": time.time()}
        with self.lock:
            self.analyses[analysis["id"]] = analysis
        return analysis

    def get_session(self, session_id: str) -> Session | None:
        """The session with that id, or None."""
        with self.lock:
            return self.sessions.get(session_id)

    def mint_token(self, session: Session) -> tuple[str, float]:
        """Issue a new stream token for ``session``; older tokens stay valid until their own expiry."""
        token = "kst_test_" + secrets.token_hex(12)
        expires_at = time.time() + self.token_ttl_seconds
        with self.lock:
            session.tokens[token] = expires_at
        return token, expires_at

    def attach(self, session_id: str, token: str, conn: StreamConnection) -> str | None:
        """Validate a connect and register ``conn``; return an error code instead when it must be refused."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return "session_not_found"
            if session.status == "ended":
                return "session_ended"
            # The token is checked only here, at connect; an open socket outlives its expiry (stream reference).
            expires_at = session.tokens.get(token)
            if expires_at is None or time.time() >= expires_at:
                return "invalid_token"
            if session.started_at is None:
                session.started_at = time.time()
            session.status = "active"
            session.connections.append(conn)
            return None

    def detach(self, conn: StreamConnection, close_code: int | None = None) -> None:
        """Mark a connection closed once its handler has finished, with how it closed."""
        with self.lock:
            conn.live = False
            conn.close_code = close_code

    def count_end_call(self, session_id: str) -> None:
        """Count one REST end call for the session (so tests can spot double ends)."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None:
                session.end_calls += 1

    def end(self, session_id: str, reason: str) -> tuple[dict[str, Any], list[StreamConnection]] | None:
        """End a session (idempotently). Return its summary and the live connections to notify and close."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return None
            if session.status == "ended":
                return session.end_summary(), []
            session.status, session.ended_at, session.end_reason = "ended", time.time(), reason
            return session.end_summary(), session.live_connections()

    def record_error(self, session_id: str, code: str) -> None:
        """Remember that a ``session.error`` with ``code`` was sent on this session's stream."""
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None:
                session.errors_sent.append(code)

    def record_audio(self, conn: StreamConnection, speaker: str, sequence: float, data: bytes) -> list[int]:
        """Store one valid ``audio.input``; return the numbers of the full seconds it completed on ``conn``."""
        with self.lock:
            session = self.sessions.get(conn.session_id)
            if session is None:  # forgotten by a reset while this leg was still talking
                return []
            session.audio.setdefault(speaker, bytearray()).extend(data)
            session.audio_sequences.setdefault(speaker, []).append(sequence)
            session.audio_messages[speaker] = session.audio_messages.get(speaker, 0) + 1
            if conn.last_sequence is not None and sequence <= conn.last_sequence:
                conn.sequences_increasing = False
            conn.last_sequence = sequence
            seconds_before = conn.audio_bytes // BYTES_PER_SECOND
            conn.audio_bytes += len(data)
            return list(range(seconds_before + 1, conn.audio_bytes // BYTES_PER_SECOND + 1))

    # --- idempotency (Idempotency-Key) ----------------------------------------------------------------------
    def idempotency_begin(self, scope: tuple[str, str], fingerprint: str) -> str | tuple[int, bytes]:
        """Claim an idempotency key: ``"new"``, ``"mismatch"``, ``"conflict"`` or the stored (status, body)."""
        with self.lock:
            record = self.idempotency.get(scope)
            if record is None:
                self.idempotency[scope] = IdempotencyRecord(fingerprint)
                return "new"
            if record.fingerprint != fingerprint:
                return "mismatch"
            return record.response if record.response is not None else "conflict"

    def idempotency_finish(self, scope: tuple[str, str], response: tuple[int, bytes] | None) -> None:
        """Store the response for replay, or (``None``) release the key so a retry runs afresh."""
        with self.lock:
            if response is None:
                self.idempotency.pop(scope, None)
            elif scope in self.idempotency:
                self.idempotency[scope].response = response

    # --- faults, behaviour, reset, stats -----------------------------------------------------------
    def add_faults(self, faults: list[dict[str, Any]]) -> None:
        """Queue normalised faults (see ``rest.normalise_fault``)."""
        with self.lock:
            self.faults.extend(faults)

    def take_fault(self, endpoint: str, session_id: str | None = None, *,
                   outage_only: bool = False) -> dict[str, Any] | None:
        """Consume one use of the first queued fault for ``endpoint`` (and ``session_id``, if the fault names one);
        with ``outage_only``, of the first outage fault (answered before the idempotency check)."""
        with self.lock:
            for fault in self.faults:
                if (fault["endpoint"] == endpoint and fault.get("session_id") in (None, session_id)
                        and (fault.get("outage") or not outage_only)):
                    fault["times"] -= 1
                    if fault["times"] <= 0:
                        self.faults.remove(fault)
                    return dict(fault)
        return None

    def reset(self) -> list[StreamConnection]:
        """Forget everything; return the connections that were still live so the caller can close them."""
        with self.lock:
            live = [conn for session in self.sessions.values() for conn in session.live_connections()]
            self.sessions.clear()
            self.idempotency.clear()
            self.faults.clear()
            self.behaviour = "echo"
            self.generation += 1
            return live

    def stats(self) -> dict[str, int]:
        """Counters over all sessions."""
        with self.lock:
            sessions = list(self.sessions.values())
            return {
                "created": len(sessions),
                "ended": sum(s.status == "ended" for s in sessions),
                "active": sum(s.status == "active" for s in sessions),
                "end_calls": sum(s.end_calls for s in sessions),
                # Every REST end call beyond the first one per session.
                "double_end_calls": sum(max(0, s.end_calls - 1) for s in sessions),
                "connections_live": sum(len(s.live_connections()) for s in sessions),
            }
