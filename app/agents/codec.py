"""The agent page's media-socket frames (JSON text, like the carriers'), as vendor-free relay events.

Page → service: ``{"event": "start", "leg": <leg id>, "token": <relay token>}`` first, then
``{"event": "media", "payload": <base64 of 160 μ-law bytes>}`` every 20 ms, ``{"event": "mark", "name": …}`` when
playback reached a mark, ``{"event": "hangup"}`` from the Hang up button. Service → page: ``media``, ``mark`` and
``clear`` (drop everything queued for playback at once).
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets

from app.calls.agent_queue import BROWSER_LEG
from app.carriers.contract import (
    CarrierEvent, Ignored, Malformed, MarkPlayed, Media, Stopped, StreamStarted, decode_json_frame,
)
from app.relay.tokens import RELAY_TOKEN_PARAMETER

#: One 20 ms frame of 8 kHz μ-law: what the page's worklet sends.
FRAME_BYTES = 160
#: A page may batch a few frames when its tab was busy; more than this in one message is a broken page.
MAX_FRAME_BYTES = FRAME_BYTES * 10
MAX_ID_LENGTH = 4096


class BrowserAgentCodec:
    """Parses the agent page's frames for the leg ``leg_id`` (the one the page was given) and builds frames back."""

    carrier = BROWSER_LEG

    def __init__(self, leg_id: str) -> None:
        self.leg_id = leg_id
        self.started = False

    def parse(self, raw: str | bytes) -> CarrierEvent:
        """Turn one frame into a relay event; never raises."""
        message = decode_json_frame(raw, "The agent page")
        if isinstance(message, Malformed):
            return message
        event = message.get("event")
        if event == "media":
            if not self.started:
                return Malformed("media before start", close_code=1008)
            payload = message.get("payload")
            try:
                audio = base64.b64decode(payload if isinstance(payload, str) else "", validate=True)
            except (binascii.Error, ValueError):
                return Malformed("media payload is not base64", fatal=False)
            if not audio or len(audio) > MAX_FRAME_BYTES or len(audio) % FRAME_BYTES:
                return Malformed(f"media must be whole 20 ms frames ({FRAME_BYTES} bytes)", fatal=False)
            return Media(audio)
        if event == "start":
            leg, token = message.get("leg"), message.get("token")
            if not isinstance(leg, str) or not isinstance(token, str) or len(token) > MAX_ID_LENGTH:
                return Malformed("start without leg and token", close_code=1008)
            if leg != self.leg_id:
                return Malformed("start for another leg", close_code=1008)
            self.started = True
            return StreamStarted(call_id=leg, stream_id=f"brw-{secrets.token_hex(8)}",
                                 parameters={RELAY_TOKEN_PARAMETER: token})
        if event == "mark":
            name = message.get("name")
            return MarkPlayed(name) if isinstance(name, str) else Ignored("mark")
        if event == "hangup":
            return Stopped()
        return Ignored(str(event)[:40])

    def media(self, mulaw: bytes) -> str:
        """Play ``mulaw`` (8 kHz) in the page."""
        return json.dumps({"event": "media", "payload": base64.b64encode(mulaw).decode("ascii")})

    def mark(self, name: str) -> str:
        """Ask the page to say when its playback reaches this point."""
        return json.dumps({"event": "mark", "name": name})

    def clear(self) -> str:
        """Stop playback at once and drop what is queued (barge-in)."""
        return json.dumps({"event": "clear"})
