"""Golden vectors and contract fixtures: the product against the vendors' own examples, not against itself.

Fakes built with the product's own helpers agree with it by construction. Here the expected values come from
outside the product: Twilio's documented signature example, a Kallglot-Signature computed by hand from the
documented algorithm (kallglot-api.md §6) with ``hmac`` in the test, and raw JSON messages in
``tests/fixtures/`` written from the vendors' documented examples (kallglot-api.md, telephony-protocols.md).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.carriers.contract import Connected, Dtmf, MarkPlayed, Media, Stopped, StreamStarted
from app.carriers.telnyx.media import TelnyxMediaCodec
from app.carriers.twilio.media import TwilioMediaCodec
from app.carriers.twilio.signature import request_is_from_twilio
from app.config import Settings
from app.kallglot import stream_protocol
from app.kallglot.client import KallglotSession
from app.kallglot.signature import verify
from app.kallglot.stream_protocol import (
    AudioOutput, ClearAudio, Informational, SessionEnded, SessionError, Transcript, parse_server_message,
)

from tests.support.controls import EmulatorControl
from tests.support.settings import PUBLIC_URL, bridge_config

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    """One raw JSON fixture, as the vendor sends (or expects) it."""
    return json.loads((FIXTURES / name).read_text())


def raw(name: str) -> str:
    """The fixture's JSON text, re-serialised compactly (as it would arrive on a socket)."""
    return json.dumps(fixture(name))


# -- Twilio's documented signature example -------------------------------------------------------------------
#: Twilio's webhook-security documentation: auth token ``12345``, this URL and these POST parameters.
TWILIO_DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_DOC_TOKEN = "12345"


@pytest.mark.parametrize("caller, expected", [
    ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),  # the webhook-security page's worked example
    ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # the same example as the twilio SDKs' own tests sign it
])
def test_the_product_accepts_twilios_documented_signature_and_nothing_else(caller: str, expected: str) -> None:
    params = {"CallSid": "CA1234567890ABCDE", "Caller": caller, "Digits": "1234", "From": caller,
              "To": "+18005551212"}
    settings = Settings.from_mapping({"twilio_auth_token": TWILIO_DOC_TOKEN, "public_url": "https://mycompany.com"})
    app = Flask(__name__)

    def verdict(signature: str, form: dict[str, str]) -> bool:
        with app.test_request_context("/myapp.php?foo=1&bar=2", method="POST", data=form,
                                      headers={"X-Twilio-Signature": signature}):
            return request_is_from_twilio(settings)

    assert verdict(expected, params)
    assert not verdict(expected, {**params, "Digits": "1235"})  # a changed parameter
    assert not verdict(expected[:-2] + "A=", params)  # a changed signature
    assert not verdict("", params)


# -- Kallglot-Signature, by hand --------------------------------------------------------------------------------
def kallglot_signature_by_hand(secret: str, timestamp: int, body: bytes) -> str:
    """kallglot-api.md §6: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{raw body}" under the secret>``."""
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


def test_a_kallglot_signature_computed_by_hand_is_accepted_and_a_tampered_one_is_not() -> None:
    secret = WEBHOOK_SECRET
    body = (FIXTURES / "kallglot" / "webhook_session_ended.json").read_bytes()
    timestamp = 1774522800  # 2026-03-26T11:00:00Z, the documented envelope's day
    header = kallglot_signature_by_hand(secret, timestamp, body)
    # The value pinned: HMAC-SHA256 over the exact bytes of the fixture file, so the vector is reproducible.
    assert header == f"t={timestamp},v1=" + hmac.new(
        b"whsec_test_golden", b"1774522800." + body, hashlib.sha256).hexdigest()
    assert verify(secret, header, body, now=timestamp + 10)
    assert not verify(secret, header, body + b" ", now=timestamp + 10)  # the raw body is signed, byte for byte
    assert not verify("whsec_other", header, body, now=timestamp + 10)
    assert not verify(secret, header, body, now=timestamp + 301)  # stale: a replay
    # Several v1 values appear while a secret rotates; any one valid is enough.
    assert verify(secret, f"t={timestamp},v1={'0' * 64},{header.split(',')[1]}", body, now=timestamp)


@pytest.fixture
def signed_webhook_app(redis_url: str, emulator: EmulatorControl, namespace: str) -> Flask:
    """The bridge in-process with a Kallglot webhook secret."""
    return create_app({**bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                       "KALLGLOT_WEBHOOK_SECRET": WEBHOOK_SECRET})


WEBHOOK_SECRET = "whsec_test_golden"


@pytest.mark.parametrize("body, status", [
    ((FIXTURES / "kallglot" / "webhook_session_ended.json").read_bytes(), 200),  # the documented envelope
    (b"\xff\xfe{{ not json", 400),  # signed over its real bytes: the parser answers, not the signature check
    (b'{"type": "session.ended"}', 400),  # no event id
    (b"[]", 400),
])
def test_the_webhook_route_verifies_by_hand_signed_bodies_and_parses_them(signed_webhook_app: Flask, body: bytes,
                                                                          status: int) -> None:
    header = kallglot_signature_by_hand(WEBHOOK_SECRET, int(time.time()), body)
    response = signed_webhook_app.test_client().post("/kallglot/webhooks", data=body, headers={
        "Kallglot-Signature": header, "Content-Type": "application/json"})
    assert response.status_code == status
    if status == 200:
        assert response.get_json() == {"status": "ok"}


# -- Kallglot stream messages ------------------------------------------------------------------------------------
def test_audio_input_matches_the_documented_message_field_by_field() -> None:
    expected = fixture("kallglot/stream_audio_input.json")
    built = json.loads(stream_protocol.audio_input(expected["audio"]["payload"], sequence=expected["sequence"],
                                                   timestamp_ms=expected["timestamp_ms"],
                                                   speaker=expected["speaker"]))
    assert built.keys() == expected.keys() and built["audio"].keys() == expected["audio"].keys()
    for key in ("type", "sequence", "timestamp_ms", "speaker"):
        assert built[key] == expected[key], key
    for key in ("encoding", "sample_rate_hz", "payload"):
        assert built["audio"][key] == expected["audio"][key], key


def test_ping_matches_the_documented_message() -> None:
    assert json.loads(stream_protocol.PING) == fixture("kallglot/stream_ping.json")


@pytest.mark.parametrize("name, expected", [
    ("stream_session_ready", Informational("session.ready")),
    ("stream_pong", Informational("pong")),
    ("stream_session_ended", SessionEnded(reason="explicit_end")),
    ("stream_session_error", SessionError(code="invalid_audio_format", message="audio.encoding must be mulaw")),
    ("stream_transcript_partial", Transcript(final=False, speaker="customer", text="hello th")),
    ("stream_transcript_final", Transcript(final=True, speaker="agent", text="hola", language="es",
                                           translation="hello", translation_language="en")),
    ("stream_audio_clear", ClearAudio()),
])
def test_kallglot_stream_messages_parse_to_what_they_say(name: str, expected: object) -> None:
    assert parse_server_message(raw(f"kallglot/{name}.json")) == expected


@pytest.mark.parametrize("name", ["stream_audio_output_mulaw", "stream_audio_output_pcm16"])
def test_return_audio_parses_field_by_field(name: str) -> None:
    message = fixture(f"kallglot/{name}.json")
    parsed = parse_server_message(raw(f"kallglot/{name}.json"))
    assert isinstance(parsed, AudioOutput)
    assert parsed.payload == base64.b64decode(message["audio"]["payload"])
    assert parsed.encoding == message["audio"]["encoding"]
    assert parsed.sample_rate_hz == message["audio"]["sample_rate_hz"]


def test_the_documented_session_object_parses_field_by_field() -> None:
    body = fixture("kallglot/rest_session_created.json")
    session = KallglotSession.from_json(body)
    assert session.id == body["id"] and session.status == body["status"]
    assert session.stream is not None
    assert session.stream.url == body["stream"]["url"] and session.stream.token == body["stream"]["token"]
    assert session.stream.expires_at == datetime(2026, 3, 26, 12, 0, tzinfo=timezone.utc)
    assert "kst_live" not in repr(session)  # the token never reaches a log line


# -- carrier media frames ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec_factory, carrier", [(TwilioMediaCodec, "twilio"), (TelnyxMediaCodec, "telnyx")])
def test_carrier_frames_parse_field_by_field(codec_factory: type, carrier: str) -> None:
    codec = codec_factory()
    start = fixture(f"{carrier}/start.json")
    assert codec.parse(raw(f"{carrier}/connected.json")) == Connected()
    started = codec.parse(raw(f"{carrier}/start.json"))
    if carrier == "twilio":
        expected_start = StreamStarted(call_id=start["start"]["callSid"], stream_id=start["streamSid"],
                                       parameters=start["start"]["customParameters"])
    else:
        expected_start = StreamStarted(call_id=start["start"]["call_control_id"], stream_id=start["stream_id"],
                                       parameters=start["start"]["custom_parameters"])
    assert started == expected_start
    media = fixture(f"{carrier}/media.json")
    assert codec.parse(raw(f"{carrier}/media.json")) == Media(base64.b64decode(media["media"]["payload"]))
    assert codec.parse(raw(f"{carrier}/dtmf.json")) == Dtmf(fixture(f"{carrier}/dtmf.json")["dtmf"]["digit"])
    assert codec.parse(raw(f"{carrier}/mark.json")) == MarkPlayed(fixture(f"{carrier}/mark.json")["mark"]["name"])
    assert codec.parse(raw(f"{carrier}/stop.json")) == Stopped()


@pytest.mark.parametrize("codec_factory, carrier", [(TwilioMediaCodec, "twilio"), (TelnyxMediaCodec, "telnyx")])
def test_frames_to_the_carrier_match_its_documented_shape(codec_factory: type, carrier: str) -> None:
    codec = codec_factory()
    codec.parse(raw(f"{carrier}/start.json"))  # the stream id the frames must carry (Twilio)
    payload = base64.b64decode(fixture(f"{carrier}/out_media.json")["media"]["payload"])
    assert json.loads(codec.media(payload)) == fixture(f"{carrier}/out_media.json")
    assert json.loads(codec.mark("utt-17")) == fixture(f"{carrier}/out_mark.json")
    assert json.loads(codec.clear()) == fixture(f"{carrier}/out_clear.json")
