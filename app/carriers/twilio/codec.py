"""Twilio Media Streams: the codec for Twilio's JSON frames."""
from __future__ import annotations

import base64
import binascii
import json

from app.carriers.contract import (
    CarrierEvent, Connected, Ignored, Malformed, Media, StreamStarted, decode_json_frame, parse_shared_event,
)
from app.carriers.twilio import CARRIER


class TwilioMediaCodec:
    """Parses Twilio's Media Streams frames (``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop``)
    and builds ``media``/``mark``/``clear`` frames back."""

    carrier = CARRIER

    def __init__(self) -> None:
        self.stream_sid: str | None = None
        self._media_prefix = ""  # the outbound media frame up to its payload, built once per stream

    def parse(self, raw: str | bytes) -> CarrierEvent:
        """Turn one Twilio frame into a relay event; never raises."""
        message = decode_json_frame(raw, "Twilio")
        if isinstance(message, Malformed):
            return message
        event = message.get("event")
        if event == "media":
            if self.stream_sid is None:
                return Malformed("media before start", close_code=1008)
            media = message.get("media")
            if not isinstance(media, dict):
                return Malformed("media frame without media", fatal=False)
            if media.get("track", "inbound") != "inbound":
                return Ignored("media:" + str(media.get("track")))
            try:
                return Media(base64.b64decode(media.get("payload", ""), validate=True))
            except (binascii.Error, ValueError, TypeError):
                return Malformed("media payload is not base64", fatal=False)
        if event == "start":
            start = message.get("start")
            if not isinstance(start, dict) or not isinstance(start.get("callSid"), str) \
                    or not isinstance(start.get("streamSid") or message.get("streamSid"), str):
                return Malformed("start without callSid and streamSid", close_code=1008)
            params = start.get("customParameters")
            self.stream_sid = str(start.get("streamSid") or message.get("streamSid"))
            self._media_prefix = ""
            return StreamStarted(call_id=start["callSid"], stream_id=self.stream_sid,
                                 parameters={str(k): str(v) for k, v in params.items()}
                                 if isinstance(params, dict) else {})
        if event == "connected":
            return Connected()
        shared = parse_shared_event(event, message)
        if shared is not None:
            return shared
        return Ignored(str(event))

    def media(self, mulaw: bytes) -> str:
        """Play headerless μ-law 8 kHz to the caller."""
        if not self._media_prefix:
            self._media_prefix = '{"event":"media","streamSid":' + json.dumps(self.stream_sid) + ',"media":{"payload":"'
        return self._media_prefix + binascii.b2a_base64(mulaw, newline=False).decode("ascii") + '"}}'

    def mark(self, name: str) -> str:
        """Ask Twilio to echo ``name`` once playback reaches this point."""
        return json.dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def clear(self) -> str:
        """Drop all audio Twilio still has queued for the caller (barge-in)."""
        return json.dumps({"event": "clear", "streamSid": self.stream_sid})
