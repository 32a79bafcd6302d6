"""A carrier's media stream straight on a session's stream socket — Kallglot's "direct" path (its Twilio and Telnyx
guides point ``<Connect><Stream url>`` / ``start_streaming`` at ``stream.url`` and carry ``stream.token`` as a
custom parameter). What Kallglot then expects is undocumented (:mod:`app.kallglot.telephony`); the emulator
takes what the carriers really send:

- **Twilio** Media Streams frames: ``connected``, ``start`` (``start.customParameters.token``, ``mediaFormat``
  ``audio/x-mulaw`` 8000), ``media``, ``mark``, ``stop``; audio back as ``{"event": "media", "streamSid", ...}``.
- **Telnyx** media-streaming frames: ``connected``, ``start`` (``start.custom_parameters.token`` or the
  ``x-telnyx-streaming-auth-token`` header, ``media_format`` PCMU 8000), ``media``, ``stop``; audio back as
  ``{"event": "media", "media": {"payload"}}`` (RTP mode).

The token is checked at ``start`` exactly as on a Kallglot connect (valid, unexpired, session not ended); audio in
anything but μ-law 8 kHz is refused as ``invalid_audio_format`` (Kallglot takes μ-law 8 kHz only) and the socket
closed with 1003. Kallglot's own messages (transcripts, ``session.ended``) have no carrier form: they are
counted, not sent, and the end of the session closes the socket.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from flask import request
from simple_websocket import ConnectionClosed

from app.kallglot.telephony import DIRECT_SESSION_PARAMETER, DIRECT_TOKEN_PARAMETER

from .artifacts import record_turn
from .state import EmulatorState, StreamConnection
from .stream import RECEIVE_POLL_SECONDS, observed_close_code

#: Header Telnyx sends the ``stream_auth_token`` in (Telnyx media-streaming docs).
TELNYX_AUTH_HEADER = "x-telnyx-streaming-auth-token"
#: How long a carrier may take from connect to its ``start`` frame, and to its first frame of all.
START_TIMEOUT_SECONDS = 10.0
CARRIER_FIRST_FRAME_SECONDS = 2.0
TWILIO, TELNYX = "twilio", "telnyx"


@dataclass
class CarrierStreamConnection(StreamConnection):
    """A stream connection whose peer is a carrier: Kallglot's messages are translated to carrier frames."""

    carrier: str = ""
    stream_sid: str = ""
    suppressed: int = 0  # Kallglot messages the carrier protocol has no frame for

    def send(self, message: dict[str, Any] | str) -> bool:
        """``audio.output`` goes out as the carrier's ``media`` frame; other Kallglot messages are not sent."""
        if isinstance(message, dict) and message.get("type") == "audio.output":
            payload = str((message.get("audio") or {}).get("payload", ""))
            frame: dict[str, Any] = {"event": "media", "media": {"payload": payload}}
            if self.carrier == TWILIO:
                frame["streamSid"] = self.stream_sid
            return super().send(frame)
        self.suppressed += 1
        return self.live


def _start_fields(message: dict[str, Any]) -> tuple[str, str, dict[str, str], tuple[str, int]] | None:
    """(carrier, stream id, custom parameters, (encoding, rate)) of a ``start`` frame, or None if it is not one."""
    start = message.get("start")
    if message.get("event") != "start" or not isinstance(start, dict):
        return None
    if "customParameters" in start or "mediaFormat" in start:  # Twilio's camelCase
        fmt = start.get("mediaFormat") or {}
        encoding = "PCMU" if fmt.get("encoding") == "audio/x-mulaw" else str(fmt.get("encoding"))
        return (TWILIO, str(message.get("streamSid") or start.get("streamSid") or ""),
                dict(start.get("customParameters") or {}), (encoding, int(fmt.get("sampleRate") or 0)))
    fmt = start.get("media_format") or {}
    return (TELNYX, str(message.get("stream_id") or ""), dict(start.get("custom_parameters") or {}),
            (str(fmt.get("encoding")), int(fmt.get("sample_rate") or 0)))


class CarrierStreamHandler:
    """Serves one carrier's direct stream connection from its ``start`` to its ``stop``."""

    def __init__(self, state: EmulatorState, conn: CarrierStreamConnection, *, header_token: str = "") -> None:
        self.state, self.conn, self.session_id = state, conn, conn.session_id
        self.header_token = header_token
        self.media_frames = 0

    def serve(self) -> None:
        """Wait for ``start``, check its token and format, then record media until ``stop`` or close."""
        attached = False
        try:
            start = self._wait_for_start()
            if start is None:
                self.conn.close(1008, "invalid_token")
                return
            carrier, stream_sid, parameters, media_format = start
            self.conn.carrier, self.conn.stream_sid = carrier, stream_sid
            token = str(parameters.get(DIRECT_TOKEN_PARAMETER) or self.header_token)
            named = parameters.get(DIRECT_SESSION_PARAMETER)
            refusal = "session_mismatch" if named and named != self.session_id else \
                self.state.attach(self.session_id, token, self.conn)
            if refusal is not None:
                self.state.record_error(self.session_id, refusal)
                self.conn.close(1008, refusal)
                return
            attached = True
            if media_format != ("PCMU", 8000):
                self.state.record_error(self.session_id, "invalid_audio_format")
                self.conn.close(1003, "invalid_audio_format")
                return
            self._serve_media()
        finally:
            if attached:
                self.state.detach(self.conn, observed_close_code(self.conn))

    def _receive(self, timeout: float) -> dict[str, Any] | None | bool:
        """The next JSON frame; None on a quiet poll; False once the socket is closed."""
        try:
            frame = self.conn.ws.receive(timeout=timeout)
        except ConnectionClosed:
            return False
        if frame is None:
            return None if self.conn.ws.connected else False
        try:
            message = json.loads(frame)
        except (TypeError, ValueError):
            return None
        return message if isinstance(message, dict) else None

    def _wait_for_start(self) -> tuple[str, str, dict[str, str], tuple[str, int]] | None:
        """The carrier's ``start``; None (the connect refused) when the peer is not a carrier after all.

        A carrier speaks first (``connected`` right after the handshake); a Kallglot client waits for
        ``session.ready``. So a connect without ``?token=`` whose peer says nothing carrier-like within
        :data:`CARRIER_FIRST_FRAME_SECONDS` is refused as Kallglot refuses a connect without a token.
        """
        first = self._receive(CARRIER_FIRST_FRAME_SECONDS)
        if not isinstance(first, dict) or "event" not in first:
            if first is not False:
                self.state.record_error(self.session_id, "invalid_token")
                StreamConnection.send(self.conn, {"type": "session.error", "code": "invalid_token",
                                                  "message": "Stream token is invalid or expired."})
            return None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        message: dict[str, Any] | None | bool = first
        while time.monotonic() < deadline:
            if message is False:
                return None
            if isinstance(message, dict) and (start := _start_fields(message)) is not None:
                return start
            message = self._receive(RECEIVE_POLL_SECONDS)
        return None

    def _serve_media(self) -> None:
        while True:
            message = self._receive(RECEIVE_POLL_SECONDS)
            if message is False:
                break
            if message is None:
                if not self.conn.live and not self.conn.ws.connected:
                    break
                continue
            event = message.get("event")
            if event == "media":
                self._media(message)
            elif event == "stop":
                self.conn.close(1000, "carrier stop")
                break

    def _media(self, message: dict[str, Any]) -> None:
        media = message.get("media") if isinstance(message.get("media"), dict) else {}
        if media.get("track") not in (None, "inbound", "inbound_track"):
            return  # only the caller is translated
        try:
            audio = base64.b64decode(str(media.get("payload", "")), validate=True)
        except (binascii.Error, ValueError):
            self.state.record_error(self.session_id, "invalid_audio_format")
            return
        self.media_frames += 1
        sequence = message.get("sequenceNumber", message.get("sequence_number", self.media_frames))
        try:
            number = float(sequence)
        except (TypeError, ValueError):
            number = float(self.media_frames)
        seconds = self.state.record_audio(self.conn, "customer", number, audio)
        with self.state.lock:
            echo = self.state.behaviour == "echo"
        if echo:
            self.conn.outputs_sent += 1
            self.conn.send({"type": "audio.output", "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                                              "payload": base64.b64encode(audio).decode()}})
        for second in seconds:  # the after-call transcript has a turn per second, as on a Kallglot connect
            record_turn(self.state, self.session_id, {
                "speaker": "customer", "language": "en", "text": f"(emulated utterance {second})",
                "translation": {"language": "es", "text": f"(traducción {second})"}})


def serve_direct(state: EmulatorState, ws: Any, session_id: str) -> None:
    """Serve a carrier's direct stream on the stream route (the request is the WebSocket upgrade). A carrier's
    ``stop`` ends its stream, not the session: the bridge's lifecycle ends that."""
    CarrierStreamHandler(state, CarrierStreamConnection(ws=ws, session_id=session_id),
                         header_token=request.headers.get(TELNYX_AUTH_HEADER, "")).serve()
