"""Twilio Media Streams frames → relay events, and frames back."""
from __future__ import annotations

import base64
import json

from app.carriers.contract import Connected, Dtmf, Ignored, Malformed, MarkPlayed, Media, Stopped, StreamStarted
from app.carriers.twilio.codec import TwilioMediaCodec


def started_codec() -> TwilioMediaCodec:
    codec = TwilioMediaCodec()
    event = codec.parse(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
        "callSid": "CA1", "streamSid": "MZ1", "customParameters": {"relay_token": "t"}}}))
    assert event == StreamStarted(call_id="CA1", stream_id="MZ1", parameters={"relay_token": "t"})
    return codec


def test_events() -> None:
    codec = started_codec()
    payload = bytes(range(160))
    assert codec.parse(json.dumps({"event": "connected", "protocol": "Call"})) == Connected()
    assert codec.parse(json.dumps({"event": "media", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "5", "payload": base64.b64encode(payload).decode()}})) \
        == Media(payload)
    assert codec.parse(json.dumps({"event": "dtmf", "dtmf": {"digit": "5"}})) == Dtmf("5")
    assert codec.parse(json.dumps({"event": "mark", "mark": {"name": "utt-1"}})) == MarkPlayed("utt-1")
    assert codec.parse(json.dumps({"event": "stop", "stop": {}})) == Stopped()
    assert codec.parse(json.dumps({"event": "future-thing"})) == Ignored("future-thing")


def test_malformed_input() -> None:
    fresh = TwilioMediaCodec()
    media = json.dumps({"event": "media", "media": {"payload": "AAAA"}})
    before_start = fresh.parse(media)
    assert isinstance(before_start, Malformed) and before_start.close_code == 1008
    codec = started_codec()
    assert isinstance(codec.parse(b"\x00\x01"), Malformed) and codec.parse(b"\x00").close_code == 1003
    assert codec.parse("{nope").fatal and codec.parse("[1]").fatal
    bad_b64 = codec.parse(json.dumps({"event": "media", "media": {"payload": "!!!"}}))
    assert isinstance(bad_b64, Malformed) and not bad_b64.fatal
    no_sid = TwilioMediaCodec().parse(json.dumps({"event": "start", "start": {}}))
    assert isinstance(no_sid, Malformed) and no_sid.close_code == 1008


def test_outgoing_frames_carry_the_stream_sid() -> None:
    codec = started_codec()
    assert json.loads(codec.media(b"\xff\x7f")) == {"event": "media", "streamSid": "MZ1",
                                                    "media": {"payload": base64.b64encode(b"\xff\x7f").decode()}}
    assert json.loads(codec.mark("utt-2")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "utt-2"}}
    assert json.loads(codec.clear()) == {"event": "clear", "streamSid": "MZ1"}
