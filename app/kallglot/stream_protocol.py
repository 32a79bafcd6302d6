"""Kallglot's stream-socket messages, and — in one place — this project's assumptions where the docs are silent.

Documented (Kallglot's stream reference): ``audio.input`` (μ-law 8 kHz only), ``ping``/``pong``, ``session.end``/
``session.ended``, ``session.ready``, ``transcript.partial``/``transcript.final``, ``session.error``.

Assumed where Kallglot's docs are silent (the project's working assumptions, numbered here and cited as
"assumption N" elsewhere); each is a constant or one function here so it changes in one edit:

1. Return audio is ``{"type": "audio.output", "audio": {"encoding", "sample_rate_hz", "payload"}}`` for the
   participant on that connection (:func:`parse_server_message`, :data:`AUDIO_OUTPUT`).
2. Barge-in is ``{"type": "audio.clear"}`` (:data:`AUDIO_CLEAR`).
3. One stream connection per call leg, each naming its ``speaker`` (:data:`SPEAKER_CUSTOMER`, :data:`SPEAKER_AGENT`).
4. Reconnect: a new connection to a session that is not ended is allowed; an expired stream token is
   refreshed with ``GET /v1/sessions/{id}`` (see :mod:`app.kallglot.client`).
5. Unknown message types are counted and logged once per type per call, never fatal (:class:`UnknownMessage`).
6. ``transcript.partial``/``transcript.final`` carry ``speaker``, ``text`` and (newer docs' transcript object)
   ``language``; a final's ``translation`` is ``{"language", "text"}`` as in ``GET /v1/sessions/{id}/transcript``
   (a bare string is accepted too). An ``id`` (legacy field) lets a final replace its partials; without one, a
   speaker's next final replaces that speaker's partial (:func:`parse_server_message`).
7. After-call REST shapes are the newer docs' (transcripts, recordings): transcript ``turns[]`` with ``translation`` objects,
   recordings ``{"object": "list", "data": [...]}``, audio at ``/v1/recordings/{id}/audio`` as ``audio/mpeg``;
   billed time is the end response's ``duration_seconds`` or the ``session.ended`` webhook's ``data.duration``
   (:mod:`app.kallglot.client`, :mod:`app.kallglot.webhooks`).
8. A session that will have an agent declares ``participants: [{"type": "customer", "language": <source>},
   {"type": "agent", "language": <target>}]`` at create (Kallglot's multi-participant example, as issue 19 quotes
   it; not in the team's API notes): :func:`app.kallglot.client.customer_and_agent`. A browser agent's leg is one
   more stream connection with ``speaker: "agent"`` (assumption 3).
9. Kallglot's stream protocol has no client message saying "the caller has now heard all the audio you sent"
   (the documented client messages are ``audio.input``, ``ping`` and ``session.end``; v1 has no control
   messages). The relay knows the moment (the carrier's echo of its last ``mark``) and asks
   :func:`playback_finished` for the message to send: none, until Kallglot documents one.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import orjson

AUDIO_INPUT = "audio.input"
AUDIO_OUTPUT = "audio.output"  # assumption 1
AUDIO_CLEAR = "audio.clear"  # assumption 2
SPEAKER_CUSTOMER = "customer"  # assumption 3
SPEAKER_AGENT = "agent"
#: Kallglot's only accepted input format (stream reference): no transcoding is needed for G.711 μ-law carriers.
INPUT_ENCODING = "mulaw"
INPUT_SAMPLE_RATE_HZ = 8000
#: The docs say "ping occasionally"; 20 s stays below common 30–60 s proxy idle timeouts.
PING_INTERVAL_SECONDS = 20.0
#: No end-of-utterance message is documented; a gap this long in ``audio.output`` ends an utterance
#: (the relay then sends the carrier a ``mark``).
UTTERANCE_GAP_SECONDS = 0.25


@dataclass(frozen=True)
class AudioOutput:
    """Return audio for this leg, still in Kallglot's encoding (see :mod:`app.relay.audio` for transcoding)."""

    payload: bytes
    encoding: str
    sample_rate_hz: int


@dataclass(frozen=True)
class ClearAudio:
    """Barge-in: drop the audio still queued for the caller."""


@dataclass(frozen=True)
class SessionEnded:
    """Kallglot ended the session; the relay closes."""

    reason: str


@dataclass(frozen=True)
class SessionError:
    """Kallglot reported an error on the stream (e.g. ``invalid_audio_format``)."""

    code: str
    message: str


@dataclass(slots=True)
class Transcript:
    """``transcript.partial`` or ``transcript.final`` (assumption 6); the relay forwards it to the live console.

    Not frozen, unlike the other messages: a frozen dataclass sets each of its seven fields through
    ``object.__setattr__``, which made building one cost more than decoding the JSON (issue 16 counts every
    line's parse). Nothing changes one after parsing.
    """

    final: bool
    speaker: str
    text: str
    language: str = ""
    translation: str = ""
    translation_language: str = ""
    item_id: str = ""


@dataclass(frozen=True)
class Informational:
    """``session.ready`` and ``pong``: nothing to do but note them."""

    type: str


@dataclass(frozen=True)
class UnknownMessage:
    """Anything else, including unparsable frames; counted, never fatal."""

    type: str


ServerMessage = AudioOutput | ClearAudio | SessionEnded | SessionError | Transcript | Informational | UnknownMessage


def audio_input(payload_b64: str, *, sequence: int, timestamp_ms: int, speaker: str) -> str:
    """Serialize one ``audio.input`` message; ``payload_b64`` is base64 of raw μ-law 8 kHz mono bytes.

    Built as a string (the hot path's one message, ten a second per leg): the same bytes ``json.dumps`` with
    compact separators gives; base64 needs no escaping.
    """
    return (f'{{"type":"{AUDIO_INPUT}","sequence":{int(sequence)},"timestamp_ms":{int(timestamp_ms)},'
            f'"speaker":{json.dumps(speaker)},"audio":{{"encoding":"{INPUT_ENCODING}",'
            f'"sample_rate_hz":{INPUT_SAMPLE_RATE_HZ},"payload":"{payload_b64}"}}}}')


PING = json.dumps({"type": "ping"})


def playback_finished(mark: str) -> str | None:
    """The message telling Kallglot the caller has heard all its audio (up to ``mark``), or None: none exists.

    Assumption 9: the stream reference documents no such client message, and inventing one would earn a
    ``session.error`` (``unknown_message_type``) at best. Return the serialized message here once it exists.
    """
    return None


def _text(value: Any) -> str:
    """A field as text: a string as it is (the usual case, no copy), missing or empty as "", anything else str()."""
    return value if type(value) is str else str(value) if value else ""


def parse_server_message(raw: str | bytes) -> ServerMessage:
    """Turn one frame from Kallglot into a typed message; never raises."""
    if isinstance(raw, bytes):
        return UnknownMessage("binary-frame")
    try:
        message: Any = orjson.loads(raw)
    except ValueError:
        return UnknownMessage("invalid-json")
    if not isinstance(message, dict):
        return UnknownMessage("non-object")
    kind = str(message.get("type", ""))
    if kind == AUDIO_OUTPUT:
        audio = message.get("audio") if isinstance(message.get("audio"), dict) else message
        try:
            payload = base64.b64decode(str(audio.get("payload", "")), validate=True)
            rate = int(audio.get("sample_rate_hz") or INPUT_SAMPLE_RATE_HZ)
        except (binascii.Error, ValueError, TypeError):
            return UnknownMessage("audio.output-invalid")
        return AudioOutput(payload=payload, encoding=str(audio.get("encoding") or INPUT_ENCODING).lower(),
                           sample_rate_hz=rate)
    if kind == AUDIO_CLEAR:
        return ClearAudio()
    if kind == "session.ended":
        return SessionEnded(reason=str(message.get("reason", "")))
    if kind == "session.error":
        error = message.get("error") if isinstance(message.get("error"), dict) else message
        return SessionError(code=str(error.get("code", "")), message=str(error.get("message", "")))
    if kind == "transcript.final" or kind == "transcript.partial":
        get = message.get
        translation = get("translation")
        if type(translation) is dict:
            translated, translated_language = _text(translation.get("text")), _text(translation.get("language"))
        else:
            translated, translated_language = _text(translation), ""
        # Positional, in field order: final, speaker, text, language, translation, its language, item id.
        return Transcript(kind == "transcript.final", _text(get("speaker")), _text(get("text")), _text(get("language")),
                          translated, translated_language, _text(get("id")))
    if kind in ("session.ready", "pong"):
        return Informational(kind)
    return UnknownMessage(kind or "untyped")
