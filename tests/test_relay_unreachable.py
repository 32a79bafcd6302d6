"""A media socket whose Kallglot stream cannot be opened at all (connection refused, before any WebSocket
handshake), through the product's whole media path in-process (``bridge_leg``: token, lease, connect): the leg's
end is recorded as ``relay_kallglot_unreachable`` *before* the carrier socket closes with 1011, so the carrier's
reaction to that close (Twilio's ``<Connect action>``) finds the reason already there.

The e2e tests cannot reach this path: the emulator refuses a stream after the handshake (``session.error`` and a
close), which is the reopen path."""
from __future__ import annotations

import json
import socket
import uuid

from flask import Flask

from app.calls.leg_spec import LegSpec
from app.carriers.twilio.codec import TwilioMediaCodec
from app.extensions import services
from app.kallglot.client import StreamGrant
from app.relay.bridge import KALLGLOT_UNREACHABLE, bridge_leg
from app.relay.tokens import RELAY_TOKEN_PARAMETER
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.scripted_carrier import STREAM_SID, ScriptedCarrier


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LegWatchingCarrier(ScriptedCarrier):
    """A scripted carrier socket that reads the leg's record from Redis at the moment it is closed."""

    def __init__(self, read_leg) -> None:
        super().__init__()
        self.read_leg = read_leg
        self.leg_when_closed: dict[str, str] | None = None

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.leg_when_closed = self.read_leg()
        super().close(reason, message)


def test_a_kallglot_stream_that_cannot_be_opened_records_the_legs_end_before_the_carrier_socket_closes(
        app: Flask, emulator: EmulatorControl) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    numbers = new_numbers()
    with app.app_context():
        svc = services()
        session = svc.lifecycle.create_session(carrier="twilio", call_id=call_sid, idempotency_key=f"k-{call_sid}",
                                               mode="bidirectional_translation")
        assert svc.lifecycle.register_leg(LegSpec(
            carrier="twilio", call_id=call_sid, speaker="customer", from_number=numbers.from_,
            to_number=numbers.to, mode="bidirectional_translation", reconnect_window_seconds=60),
            session_id=session.id)
        # A relay token whose stream nothing answers: the connect is refused before any handshake.
        unreachable = StreamGrant(url=f"ws://127.0.0.1:{closed_port()}/v1/sessions/{session.id}/connect",
                                  token="kst_unreachable", expires_at=None)
        token = svc.relay_tokens.seal_stream(unreachable, session_id=session.id, carrier="twilio", call_id=call_sid,
                                             speaker="customer")
        carrier = LegWatchingCarrier(lambda: svc.lifecycle.call_record("twilio", call_sid))
        carrier.inbox.put(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID, "start": {
            "streamSid": STREAM_SID, "accountSid": "AC" + "0" * 32, "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": {RELAY_TOKEN_PARAMETER: token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))

        assert bridge_leg(carrier, TwilioMediaCodec(), svc, start_timeout=5.0) is None
        leg_now = svc.lifecycle.call_record("twilio", call_sid)
    assert carrier.close_code == 1011
    assert carrier.leg_when_closed is not None
    assert carrier.leg_when_closed.get("state") == "ended"  # recorded first, then the socket closed
    assert carrier.leg_when_closed.get("end_reason") == KALLGLOT_UNREACHABLE
    assert leg_now.get("end_reason") == KALLGLOT_UNREACHABLE
