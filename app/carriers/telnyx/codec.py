"""Telnyx media streaming: the codec for Telnyx's JSON frames (Telnyx's media streaming docs).

The caller's leg arrives in the call's codec (``start.media_format``): PCMU, PCMA (common on European and
Indian legs) or L16 (big-endian, 16 kHz). The codec decodes everything to μ-law 8 kHz inside :meth:`parse`,
so the vendor-free relay only ever sees μ-law. Return audio goes out as PCMU, which our answer asked for
(``stream_bidirectional_codec`` / ``bidirectionalCodec``), in whole 20 ms frames (:meth:`TelnyxMediaCodec.media`);
:class:`FramedSocket` sends the several messages one relay call may produce.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from app.relay.audio import UnsupportedAudio, UplinkDecoder
from app.relay.tokens import RELAY_TOKEN_PARAMETER
from app.carriers.contract import (
    CarrierEvent, Connected, Ignored, Malformed, Media, StreamStarted, decode_json_frame, parse_shared_event,
)
from app.carriers.telnyx import CARRIER
from app.relay.core import CarrierSocket

log = logging.getLogger(__name__)

#: Return audio goes out in whole 20 ms frames (160 μ-law bytes): the AsyncAPI page allows 20 ms to 30 s per
#: message, so a remainder is carried into the next chunk rather than padded (padding mid-speech is a gap).
FRAME_BYTES = 160
#: At most 30 s of μ-law 8 kHz per message (the AsyncAPI page's upper bound).
MAX_OUTBOUND_BYTES = 30 * 8000
MULAW_SILENCE = b"\xff"
#: The codec may build several Telnyx messages for one relay call (a split 30 s chunk, the carry flushed before
#: a mark); they travel to :class:`FramedSocket` joined by this separator, which JSON never contains unescaped.
FRAME_SEPARATOR = "\n"
#: Frames held while waiting for a missing earlier one (5 × 20 ms): past that the missing frame counts as lost.
REORDER_WINDOW_FRAMES = 5
#: Our TeXML marks its streams with this parameter: a TeXML document says goodbye itself after ``<Connect>``,
#: a Call Control call needs a ``speak`` command.
FLOW_PARAMETER = "telnyx_flow"
FLOW_TEXML = "texml"
#: Telnyx's streaming WebSocket header carrying ``stream_auth_token``.
STREAM_AUTH_HEADER = "x-telnyx-streaming-auth-token"


def _counter(value: Any) -> int | None:
    """Telnyx counters are strings; None when absent or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def custom_parameters(value: Any) -> dict[str, str]:
    """``start.custom_parameters`` as a dict, whichever shape arrives: an object ``{name: value}`` (the AsyncAPI
    example) or a list of ``{"name", "value"}`` (the shape ``start_streaming`` takes); anything else is ``{}``."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items() if isinstance(v, (str, int, float))}
    if isinstance(value, list):
        return {str(p["name"]): str(p["value"]) for p in value
                if isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("value"), str)}
    return {}


class TelnyxMediaCodec:
    """Parses Telnyx's media-streaming frames and builds ``media``/``mark``/``clear`` frames back."""

    carrier = CARRIER

    def __init__(self, auth_token: str | None = None) -> None:
        # ``stream_auth_token`` from the upgrade request's header (or, failing that, the ``connected`` frame).
        self.auth_token = auth_token or None
        self.stream_id: str | None = None
        self.call_id: str | None = None
        self.parameters: dict[str, str] = {}
        self._decoder: UplinkDecoder | None = None
        self._next_chunk: int | None = None
        self._held: dict[int, bytes] = {}
        self._carry = b""  # return audio short of a whole 20 ms frame, waiting for the next chunk
        self.refused_encoding = ""  # the caller's codec, when we could not decode it

    def parse(self, raw: str | bytes) -> CarrierEvent:
        """Turn one Telnyx frame into a relay event; never raises."""
        message = decode_json_frame(raw, "Telnyx")
        if isinstance(message, Malformed):
            return message
        event = message.get("event")
        if event == "media":
            return self._media(message)
        if event == "start":
            return self._start(message)
        if event == "connected":
            token = message.get(STREAM_AUTH_HEADER)
            if isinstance(token, str) and token and not self.auth_token:
                self.auth_token = token
            return Connected()
        shared = parse_shared_event(event, message)
        if shared is not None:
            return shared
        if event == "error":
            # Telnyx reports our mistakes here (100003 malformed frame, 100005 rate limit…); layout unverified.
            log.warning("telnyx stream=%s error frame: %.200s", self.stream_id, json.dumps(message.get("payload")
                        or message.get("error") or {k: v for k, v in message.items() if k != "event"}))
        return Ignored(str(event))

    def _start(self, message: dict[str, Any]) -> CarrierEvent:
        start = message.get("start")
        stream_id = message.get("stream_id") or (start.get("stream_id") if isinstance(start, dict) else None)
        if not isinstance(start, dict) or not isinstance(start.get("call_control_id"), str) \
                or not isinstance(stream_id, str):
            return Malformed("start without call_control_id and stream_id", close_code=1008)
        self.parameters = custom_parameters(start.get("custom_parameters"))
        for where in (start, message):  # the auth token echoed in the frame itself (see assumptions.py)
            token = where.get(STREAM_AUTH_HEADER)
            if isinstance(token, str) and token and not self.auth_token:
                self.auth_token = token
        if RELAY_TOKEN_PARAMETER not in self.parameters and self.auth_token:
            self.parameters[RELAY_TOKEN_PARAMETER] = self.auth_token
        self.stream_id, self.call_id = stream_id, start["call_control_id"]
        media_format = start.get("media_format") if isinstance(start.get("media_format"), dict) else {}
        encoding = str(media_format.get("encoding") or "PCMU")
        rate = _counter(media_format.get("sample_rate")) or 8000
        try:
            self._decoder = UplinkDecoder.for_format(encoding, rate)
        except UnsupportedAudio as exc:
            # G722, OPUS, AMR-WB: Telnyx transcodes PCMU<->PCMA only. The route gives the caller the fallback.
            self.refused_encoding = f"{encoding[:20]}/{rate}"
            return Malformed(f"unsupported inbound codec {exc}", close_code=1003)
        return StreamStarted(call_id=self.call_id, stream_id=stream_id, parameters=dict(self.parameters))

    def _media(self, message: dict[str, Any]) -> CarrierEvent:
        if self._decoder is None:
            return Malformed("media before start", close_code=1008)
        media = message.get("media")
        if not isinstance(media, dict):
            return Malformed("media frame without media", fatal=False)
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return Ignored("media:" + str(media.get("track")))
        try:
            frame = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            return Malformed("media payload is not base64", fatal=False)
        ordered = self._in_order(_counter(media.get("chunk")), frame)
        if ordered is None:
            return Malformed("media frame arrived too late to reorder", fatal=False)
        if not ordered:
            return Ignored("media held for reordering")
        return Media(self._decoder.to_mulaw_8k(ordered))

    def _in_order(self, chunk: int | None, frame: bytes) -> bytes | None:
        """Frames released in ``chunk`` order (b"" while one is held), or None for a frame already passed.

        Telnyx does not guarantee order; ``media.chunk`` counts media frames from 1. A gap waits for at most
        :data:`REORDER_WINDOW_FRAMES` later frames, then the missing frame is given up as lost.
        """
        if chunk is None:
            return frame  # no counter: arrival order is all we have
        if self._next_chunk is None:
            self._next_chunk = 1 if chunk <= REORDER_WINDOW_FRAMES else chunk
        if chunk < self._next_chunk:
            return None
        self._held[chunk] = frame
        if len(self._held) > REORDER_WINDOW_FRAMES:
            self._next_chunk = min(self._held)
        released = bytearray()
        while self._next_chunk in self._held:
            released += self._held.pop(self._next_chunk)
            self._next_chunk += 1
        return bytes(released)

    def media(self, mulaw: bytes) -> str:
        """Play μ-law 8 kHz (PCMU, our bidirectional codec): whole 20 ms frames now, the remainder carried.

        Returns ``""`` when less than 20 ms is available yet (nothing to send), and several messages joined by
        :data:`FRAME_SEPARATOR` for more than 30 s; send through :class:`FramedSocket`.
        """
        audio = self._carry + mulaw
        whole = len(audio) - len(audio) % FRAME_BYTES
        self._carry = audio[whole:]
        return FRAME_SEPARATOR.join(_media_message(audio[i:min(i + MAX_OUTBOUND_BYTES, whole)])
                                    for i in range(0, whole, MAX_OUTBOUND_BYTES))

    def mark(self, name: str) -> str:
        """The utterance ended: the carried remainder, padded to 20 ms, then ask Telnyx to echo ``name``."""
        mark = json.dumps({"event": "mark", "mark": {"name": name}})
        if not self._carry:
            return mark
        tail, self._carry = self._carry + MULAW_SILENCE * (FRAME_BYTES - len(self._carry)), b""
        return _media_message(tail) + FRAME_SEPARATOR + mark

    def clear(self) -> str:
        """Drop all audio Telnyx still has queued for the caller (barge-in), and our carried remainder."""
        self._carry = b""
        return json.dumps({"event": "clear"})


def _media_message(mulaw: bytes) -> str:
    return '{"event":"media","media":{"payload":"' + binascii.b2a_base64(mulaw, newline=False).decode("ascii") + '"}}'


class FramedSocket:
    """The media socket as the relay sees it: sends each message of a :data:`FRAME_SEPARATOR`-joined string
    as its own text frame, and nothing for ``""`` (the codec carrying less than 20 ms)."""

    def __init__(self, ws: CarrierSocket) -> None:
        self.ws = ws

    @property
    def connected(self) -> bool:
        """Whether the underlying WebSocket is still open."""
        return bool(self.ws.connected)

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next frame from Telnyx (None on timeout)."""
        return self.ws.receive(timeout=timeout)

    def send(self, data: str | bytes) -> None:
        """Send each message in ``data`` as one frame."""
        if isinstance(data, bytes):
            self.ws.send(data)
            return
        for message in data.split(FRAME_SEPARATOR):
            if message:
                self.ws.send(message)

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        """Close the underlying WebSocket."""
        self.ws.close(reason=reason, message=message)
