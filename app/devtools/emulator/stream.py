"""The emulated stream WebSocket ``/v1/sessions/<id>/connect?token=…`` (Kallglot's stream reference, plus the
assumptions in :mod:`app.kallglot.stream_protocol`)."""
from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import Any

from flask import request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.connection import ConnectionState

from .artifacts import record_turn
from .state import SPEAKERS, EmulatorState, StreamConnection

RECEIVE_POLL_SECONDS = 1.0  # how soon a handler notices its socket was closed from another greenlet
#: How long a finished handler waits for the client's side of the closing handshake before judging it.
CLOSE_HANDSHAKE_SECONDS = 2.0
ABNORMAL_CLOSURE = 1006


def observed_close_code(conn: StreamConnection) -> int:
    """How the connection closed, as a real server would log it (see ``StreamConnection.close_code``)."""
    ws = conn.ws
    reader = getattr(ws, "thread", None)
    if reader is not None:
        reader.join(timeout=CLOSE_HANDSHAKE_SECONDS)  # ends on the client's close frame or EOF
    if getattr(ws.ws, "state", None) is not ConnectionState.CLOSED:
        return ABNORMAL_CLOSURE  # no close frame came back: the client reset or dropped the connection
    if conn.closed_with is not None:
        return conn.closed_with
    return int(ws.close_reason)


def _audio_problem(message: dict[str, Any]) -> str | None:
    """Why an ``audio.input`` breaks Kallglot's stream rules, or None when it is acceptable."""
    audio = message.get("audio")
    if not isinstance(audio, dict):
        return "audio must be an object"
    if audio.get("encoding") != "mulaw":
        return "audio.encoding must be mulaw"
    if audio.get("sample_rate_hz") != 8000:
        return "audio.sample_rate_hz must be 8000"
    if message.get("speaker") not in SPEAKERS:
        return "speaker must be customer or agent"
    sequence = message.get("sequence")
    if not isinstance(sequence, (int, float)) or isinstance(sequence, bool):
        return "sequence must be a number"
    payload = audio.get("payload")
    try:
        base64.b64decode(payload if isinstance(payload, str) else None, validate=True)
    except (binascii.Error, TypeError, ValueError):
        return "audio.payload must be base64"
    return None


class StreamHandler:
    """Serves one stream connection from accept to close."""

    def __init__(self, state: EmulatorState, conn: StreamConnection,
                 on_ended: Callable[[str], None] | None = None) -> None:
        self.state, self.conn, self.session_id = state, conn, conn.session_id
        self.on_ended = on_ended  # sends the after-call webhooks (artifacts.notify_ended)

    def send_error(self, code: str, message: str) -> None:
        """Send ``session.error`` and remember its code on the session."""
        self.state.record_error(self.session_id, code)
        self.conn.send({"type": "session.error", "code": code, "message": message})

    def reject(self, code: str, message: str, close_code: int) -> None:
        """Refuse the connection: ``session.error`` then a close frame."""
        self.send_error(code, message)
        self.conn.close(close_code, code)

    def serve(self, token: str) -> None:
        """Validate the connect, then answer client messages until the socket closes."""
        fault = self.state.take_fault("connect", self.session_id)
        if fault is not None:
            time.sleep(fault["delay_seconds"])
            if fault["status"] is not None:
                self.reject(fault["code"], fault["message"], 1011)
                return
        refusal = self.state.attach(self.session_id, token, self.conn)
        if refusal is not None:
            self.reject(refusal, {"invalid_token": "Stream token is invalid or expired.",
                                  "session_not_found": "No such session.",
                                  "session_ended": "The session has ended."}[refusal], 1008)
            return
        self.conn.send({"type": "session.ready", "session_id": self.session_id})
        try:
            # Drain until the socket reports closed: frames a client sent just before closing (its last
            # audio chunk) are still processed, as a real server would, even after a send to it failed.
            while True:
                try:
                    frame = self.conn.ws.receive(timeout=RECEIVE_POLL_SECONDS)
                except ConnectionClosed:
                    break
                if frame is not None:
                    self.handle(frame)
                elif not self.conn.live and not self.conn.ws.connected:
                    break
        finally:
            self.state.detach(self.conn, observed_close_code(self.conn))

    def handle(self, frame: str | bytes) -> None:
        """Dispatch one client frame."""
        if isinstance(frame, bytes):
            self.send_error("invalid_message", "Binary frames are not supported; send JSON text frames.")
            return
        try:
            message = json.loads(frame)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.send_error("invalid_message", "Frames must be JSON objects.")
            return
        kind = message.get("type")
        if kind == "audio.input":
            self.handle_audio(message)
        elif kind == "ping":
            self.conn.pings_received += 1
            self.conn.send({"type": "pong", "session_id": self.session_id})
        elif kind == "session.end":
            self.end_session()
        else:
            self.send_error("unknown_message_type", f"Unknown message type {kind!r}.")

    def handle_audio(self, message: dict[str, Any]) -> None:
        """Record a valid ``audio.input``, echo it (unless silent) and emit a transcript per full second."""
        problem = _audio_problem(message)
        if problem is not None:
            self.send_error("invalid_audio_format", problem)
            return
        payload, speaker = message["audio"]["payload"], message["speaker"]
        seconds = self.state.record_audio(self.conn, speaker, message["sequence"], base64.b64decode(payload))
        with self.state.lock:
            behaviour = self.state.behaviour
            session = self.state.sessions.get(self.session_id)
        if behaviour in ("echo", "echo_no_transcripts"):
            self.conn.outputs_sent += 1
            self.conn.send({"type": "audio.output", "sequence": self.conn.outputs_sent,
                            "audio": {"encoding": "mulaw", "sample_rate_hz": 8000, "payload": payload}})
        source = (session.source_language if session else None) or "en"
        target = (session.target_language if session else None) or "es"
        for number in seconds if behaviour != "echo_no_transcripts" else ():
            # Each second's final replaces its partial (same id); the next second's partial opens at once.
            final = {"type": "transcript.final", "id": f"utt_{speaker}_{number}", "speaker": speaker,
                     "language": source, "text": f"(emulated utterance {number})",
                     "translation": {"language": target, "text": f"(traducción {number})"}}
            self.conn.send(final)
            record_turn(self.state, self.session_id, final)
            self.conn.send({"type": "transcript.partial", "id": f"utt_{speaker}_{number + 1}", "speaker": speaker,
                            "language": source, "text": f"(emulated utter… {number + 1}"})

    def end_session(self) -> None:
        """Client ``session.end``: end the session and close every leg with ``explicit_end``."""
        outcome = self.state.end(self.session_id, "explicit_end")
        if self.on_ended is not None:
            self.on_ended(self.session_id)
        connections = outcome[1] if outcome else []
        for conn in connections if self.conn in connections else [*connections, self.conn]:
            conn.send({"type": "session.ended", "session_id": self.session_id, "reason": "explicit_end"})
            conn.close(1000, "session ended")


def register_stream_route(sock: Sock, state: EmulatorState, on_ended: Callable[[str], None] | None = None,
                          direct: Callable[[Any, str], None] | None = None) -> None:
    """Attach the stream WebSocket route to the app behind ``sock``; a connect without ``?token=`` is a carrier's
    direct stream and goes to ``direct`` (:mod:`.carrier_stream`)."""

    @sock.route("/v1/sessions/<session_id>/connect")
    def stream(ws: Any, session_id: str) -> None:
        if direct is not None and "token" not in request.args:  # a carrier streaming here, token in its start
            direct(ws, session_id)
            return
        StreamHandler(state, StreamConnection(ws=ws, session_id=session_id), on_ended).serve(
            request.args.get("token", ""))
