"""The contract every carrier adapter fulfils, in vendor-free terms.

- :class:`CarrierCodec`: a media socket's frames as events in (:data:`CarrierEvent`) and messages out;
- :class:`CarrierControl`: the call control the lifecycle may ask for (hang up a leg, dial an agent).

Each carrier package (``app.carriers.twilio``, ``app.carriers.telnyx``) implements them; it is the only code that
knows that carrier's wire format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Connected:
    """The carrier's hello (``connected``)."""


@dataclass(frozen=True)
class StreamStarted:
    """The stream began: which call, which stream, and the custom parameters from our TwiML/TeXML."""

    call_id: str
    stream_id: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    """One frame of the caller's audio as raw μ-law 8 kHz bytes (adapters transcode other codecs)."""

    payload: bytes


@dataclass(frozen=True)
class Dtmf:
    """A key pressed by the caller."""

    digit: str


@dataclass(frozen=True)
class MarkPlayed:
    """The carrier finished playing everything sent before the mark called ``name``."""

    name: str


@dataclass(frozen=True)
class Stopped:
    """The carrier ended the stream cleanly (call over or stream stopped)."""


@dataclass(frozen=True)
class Ignored:
    """A well-formed event the relay does not act on."""

    event: str


@dataclass(frozen=True)
class Malformed:
    """A frame that breaks the protocol; ``fatal`` ones close the socket with ``close_code``."""

    reason: str
    fatal: bool = True
    close_code: int = 1007


CarrierEvent = Connected | StreamStarted | Media | Dtmf | MarkPlayed | Stopped | Ignored | Malformed


def decode_json_frame(raw: str | bytes, carrier: str) -> dict[str, Any] | Malformed:
    """The JSON object in a carrier's text frame, or why the frame breaks the protocol (both carriers send JSON
    text frames only: a binary frame closes with 1003, anything else unparsable with 1007)."""
    if isinstance(raw, bytes):
        return Malformed(f"binary frame ({carrier} sends JSON text frames only)", close_code=1003)
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return Malformed("frame is not JSON")
    if not isinstance(message, dict):
        return Malformed("frame is not a JSON object")
    return message


class CarrierCodec(Protocol):
    """Parses a carrier's media-socket frames and builds the frames the relay sends back."""

    carrier: str

    def parse(self, raw: str | bytes) -> CarrierEvent:
        """Turn one frame into an event; never raises."""

    def media(self, mulaw: bytes) -> str:
        """A frame that plays ``mulaw`` (μ-law 8 kHz) to the caller."""

    def mark(self, name: str) -> str:
        """A frame asking the carrier to report when playback reaches this point."""

    def clear(self) -> str:
        """A frame that drops all audio queued for the caller (barge-in)."""


def parse_shared_event(event: object, message: dict[str, Any]) -> CarrierEvent | None:
    """``stop``, ``dtmf`` and ``mark``, which Twilio and Telnyx frame alike; None for any other event."""
    if event == "stop":
        return Stopped()
    if event in ("dtmf", "mark"):
        body = message.get(event)
        if not isinstance(body, dict):
            return Ignored(str(event))
        return Dtmf(str(body.get("digit", ""))) if event == "dtmf" else MarkPlayed(str(body.get("name", "")))
    return None

class CarrierControl(Protocol):
    """Call control one carrier offers the lifecycle (hang up a leg, dial an agent)."""

    carrier: str

    def hang_up(self, call_id: str) -> None:
        """End a live call leg at the carrier; a leg that already ended is not an error."""

    def dial(self, *, to: str, from_: str, session_id: str, speaker: str) -> str:
        """Place an outbound leg that will stream into ``session_id`` as ``speaker``; returns its call ID."""


@dataclass(frozen=True)
class Assumption:
    """One point a carrier adapter depends on where the vendor's definitions are silent (see each carrier's
    ``assumptions.py``): what it assumes, where that comes from, and how sure it is."""

    topic: str
    assumption: str
    source: str
    documented: bool
    handling: str
