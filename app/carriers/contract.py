"""The contract every carrier adapter fulfils, in vendor-free terms.

- :class:`CarrierCodec`: a media socket's frames as events in (:data:`CarrierEvent`) and messages out;
- :class:`CarrierControl`: the call control the lifecycle may ask for (hang up a leg, dial an agent);
- :class:`NumberProvisioner`: list the account's numbers and point one at this service (the admin's "connect");
- :class:`CarrierError`: what adapters raise when the carrier's API fails (they translate their SDK's errors);
- :class:`CarrierAdapter`: one carrier's entry in :mod:`app.carriers.registry`.

Each carrier package (``app.carriers.twilio``, ``app.carriers.telnyx``) implements them; it is the only code that
knows that carrier's wire format.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from flask import Blueprint

    from app.config import Settings


class CarrierError(RuntimeError):
    """A carrier's API failed; the message is one readable line, safe to show an admin (never a credential)."""

    @classmethod
    def of(cls, carrier_label: str, exc: Exception) -> CarrierError:
        """``exc`` (an SDK or transport error) as a CarrierError: ``"<carrier>: <first 300 characters>"``."""
        # Carrier errors can be long HTML pages; keep one readable line (they never echo credentials).
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        error = cls(f"{carrier_label}: {detail}")
        error.__cause__ = exc
        return error


class CarrierNotConfigured(CarrierError):
    """This service lacks a setting the carrier operation needs (local configuration, not the carrier's refusal)."""


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


#: The final ``CallStatus`` values of TwiML-style status callbacks (Twilio's and Telnyx TeXML's alike): the leg is over.
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})

CarrierEvent = Connected | StreamStarted | Media | Dtmf | MarkPlayed | Stopped | Ignored | Malformed


def decode_json_frame(raw: str | bytes, carrier: str) -> dict[str, Any] | Malformed:
    """The JSON object in a carrier's text frame, or why the frame breaks the protocol (both carriers send JSON
    text frames only: a binary frame closes with 1003, anything else unparsable with 1007)."""
    if isinstance(raw, bytes):
        return Malformed(f"binary frame ({carrier} sends JSON text frames only)", close_code=1003)
    try:
        message: Any = orjson.loads(raw)  # ~3× json.loads on a media frame; JSONDecodeError is a ValueError
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


@dataclass(frozen=True)
class CarrierNumber:
    """A number in a carrier account, what it points at now and what connecting would set."""

    carrier: str
    number: str
    label: str
    #: What connecting posts back to :meth:`NumberProvisioner.connect` (None: this number cannot be connected).
    target: str | None
    current: dict[str, str] = field(default_factory=dict)
    wanted: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def points_here(self) -> bool:
        """Whether every wanted setting is already in place."""
        return bool(self.wanted) and all(self.current.get(k, "").lower() == v.lower() for k, v in self.wanted.items())


class NumberProvisioner(Protocol):
    """One carrier account's numbers, and pointing one at this service. Needs an app context (it builds the
    public URLs of this carrier's routes); raises :class:`CarrierError` when the carrier's API fails."""

    #: What the account lacks when :meth:`configured` is False (shown to the admin), e.g. the settings to set.
    missing_settings: str

    def configured(self) -> bool:
        """Whether the account's credentials are set."""

    def numbers(self) -> list[CarrierNumber]:
        """The account's numbers with their current routing."""

    def connect(self, target: str) -> dict[str, str]:
        """Point ``target`` (a :attr:`CarrierNumber.target`) at this service; returns the settings written."""


@dataclass(frozen=True)
class CarrierAdapter:
    """One carrier, as :mod:`app.carriers.registry` lists it."""

    #: The name in URLs, relay tokens, Redis keys, metrics labels and profiles.
    name: str
    #: The name people read ("Twilio").
    label: str
    #: Every HTTP and WebSocket route of the carrier.
    blueprint: Blueprint
    control: Callable[[Settings], CarrierControl]
    numbers: Callable[[Settings], NumberProvisioner]
    codec: Callable[[], CarrierCodec]
