"""Item 12: the fakes are held to the vendors' own definitions — the telnyx SDK's request and event types, Telnyx's
media-streaming AsyncAPI page, the twilio library's Calls resource — and a fake that accepts (or sends) what the
vendor's definition does not have fails here. Item 13: every assumption is recorded once and listed in README."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app.carriers.telnyx.assumptions import ASSUMPTIONS as TELNYX_ASSUMPTIONS
from app.carriers.twilio.assumptions import ASSUMPTIONS as TWILIO_ASSUMPTIONS
from app.devtools.simulator.telnyx import TelnyxSigner
from app.devtools.simulator.telnyx_api import FakeCall, FakeTelnyx, create_fake_call_control_app
from app.devtools.simulator.telnyx_contract import (
    EVENT_TYPES, command_body_errors, media_frame_errors, webhook_errors,
)
from app.devtools.simulator.twilio_contract import create_call_parameters, update_call_parameters
from app.devtools.simulator.twilio_rest import create_fake_twilio_rest

CALL_ID = "v3:abcdefghijklmnop"


@pytest.fixture
def fake_api() -> FlaskClient:
    return create_fake_call_control_app({"FAKE_TELNYX_WEBHOOK_URL": "http://127.0.0.1:9/unused",
                                         "FAKE_TELNYX_API_KEY": ""}).test_client()


@pytest.mark.parametrize("action, body", [
    ("answer", {"stream_auth_token": "t"}),  # only start_streaming and dial define it
    ("answer", {"custom_parameters": [{"name": "a", "value": "b"}]}),
    ("streaming_start", {"stream_url": "wss://x", "stream_token": "t"}),  # a misspelling
    ("speak", {"payload": "hi"}),  # voice is required
    ("transfer", {"from": "+1555"}),  # to is required
    ("hangup", {"cause": "x"}),
])
def test_fake_call_control_refuses_what_the_sdk_types_do_not_define(fake_api: FlaskClient, action: str,
                                                                     body: dict[str, Any]) -> None:
    response = fake_api.post(f"/v2/calls/{CALL_ID}/actions/{action}", json=body)
    assert response.status_code == 422, response.json
    assert command_body_errors(action, body)


@pytest.mark.parametrize("action, body", [
    ("answer", {"client_state": "e30=", "command_id": "c1", "stream_url": "wss://x", "stream_codec": "PCMU"}),
    ("streaming_start", {"stream_url": "wss://x", "stream_auth_token": "t", "stream_codec": "PCMU",
                         "custom_parameters": [{"name": "a", "value": "b"}], "stream_bidirectional_mode": "rtp"}),
    ("speak", {"payload": "hi", "voice": "female", "language": "es-ES"}),
    ("transfer", {"to": "+14155550199", "from": "+15005550006"}),
    ("hangup", {"command_id": "c2"}),
])
def test_fake_call_control_accepts_what_the_sdk_types_define(fake_api: FlaskClient, action: str,
                                                             body: dict[str, Any]) -> None:
    assert fake_api.post(f"/v2/calls/{CALL_ID}/actions/{action}", json=body).status_code == 200


def test_fake_dial_needs_the_sdks_required_fields(fake_api: FlaskClient) -> None:
    assert fake_api.post("/v2/calls", json={"to": "+1", "from": "+2"}).status_code == 422  # no connection_id
    assert fake_api.post("/v2/calls", json={"to": "+1", "from": "+2", "connection_id": "1",
                                            "stream_url": "wss://x"}).status_code == 200


class RecordingFake(FakeTelnyx):
    """The fake Telnyx, its webhooks captured instead of delivered."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9/unused", TelnyxSigner(), "")
        self.sent: list[dict[str, Any]] = []

    def _deliver(self, call: FakeCall, event_type: str, body: str) -> None:
        self.sent.append(json.loads(body))


def test_every_webhook_the_fake_sends_is_an_sdk_event_with_only_its_fields() -> None:
    fake = RecordingFake()
    call = FakeCall(call_control_id=CALL_ID, to="+15005550006", from_="+15551230000", scenario={})
    fake.place(call)
    fake.command(call, "answer", {"client_state": "e30="})
    fake.command(call, "speak", {"payload": "hi", "voice": "female", "client_state": "e30="})
    fake.webhook(call, "streaming.started", client_state=None, stream_url="wss://x")
    fake.webhook(call, "streaming.stopped", client_state=None, stream_url="wss://x")
    fake.webhook(call, "streaming.failed", client_state=None, failure_reason="x", stream_id="s",
                 stream_type="websocket", stream_params={"stream_url": "wss://x", "track": "inbound_track"})
    fake.hang_up(call, "normal_clearing", source="caller")
    sent_types = {body["data"]["event_type"] for body in fake.sent}
    assert sent_types == {"call.initiated", "call.answered", "call.speak.started", "call.speak.ended",
                          "streaming.started", "streaming.stopped", "streaming.failed", "call.hangup"}
    for body in fake.sent:
        assert webhook_errors(body) == [], body
        EVENT_TYPES[body["data"]["event_type"]].model_validate(body["data"])  # and the SDK's field types
    answered = next(b for b in fake.sent if b["data"]["event_type"] == "call.answered")
    assert "direction" not in answered["data"]["payload"]


def test_the_fakes_new_behaviours_send_only_sdk_events() -> None:
    """A dialled number that never answers, and webhooks delivered out of order, are still SDK events."""
    fake = RecordingFake()
    fake.unanswered["+14155557770"] = "no_answer"
    dialled = FakeCall(call_control_id=CALL_ID, to="+14155557770", from_="+15005550006", scenario={})
    fake.answer_dialled(dialled, "e30=")
    assert [b["data"]["event_type"] for b in fake.sent] == ["call.initiated", "call.hangup"]
    assert fake.sent[-1]["data"]["payload"]["hangup_cause"] == "no_answer"
    for body in fake.sent:
        assert webhook_errors(body) == [], body
        EVENT_TYPES[body["data"]["event_type"]].model_validate(body["data"])


def test_the_fake_cannot_send_a_field_telnyx_does_not_define() -> None:
    fake = RecordingFake()
    call = FakeCall(call_control_id=CALL_ID, to="+1", from_="+2", scenario={})
    with pytest.raises(ValueError, match="direction"):
        fake.webhook(call, "call.answered", direction="incoming", state="answered")
    assert fake.sent == []


def test_media_frames_are_checked_against_the_asyncapi_page() -> None:
    assert media_frame_errors({"event": "connected", "version": "1.0.0"}) == []
    assert media_frame_errors({"event": "connected", "version": "1.0.0", "x-telnyx-streaming-auth-token": "t"})
    assert media_frame_errors({"event": "media", "sequence_number": "2", "stream_id": "s",
                               "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": ""}}) == []
    assert media_frame_errors({"event": "media", "stream_id": "s", "media": {"playload": ""}})
    assert media_frame_errors({"event": "start", "stream_id": "s", "start": {"callSid": "x"}})


def test_fake_twilio_rest_accepts_exactly_the_twilio_librarys_parameters() -> None:
    assert {"To", "From", "Url", "StatusCallback", "StatusCallbackEvent", "Twiml"} <= create_call_parameters()
    assert "Status" in update_call_parameters() and "Status" not in create_call_parameters()
    client = create_fake_twilio_rest({"TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "t"}).test_client()
    refused = client.post("/2010-04-01/Accounts/AC1/Calls.json", auth=("AC1", "t"),
                          data={"To": "+1", "From": "+2", "Url": "https://x", "StatusCallbackEvents": "answered"})
    assert refused.status_code == 400 and "StatusCallbackEvents" in refused.json["message"]
    # update(twiml=…) sends ``Twiml``; a spelling the library never sends is refused like any unknown parameter.
    assert "Twiml" in update_call_parameters()
    misspelt = client.post("/2010-04-01/Accounts/AC1/Calls/CA" + "0" * 32 + ".json", auth=("AC1", "t"),
                           data={"TwiML": "<Response/>"})
    assert misspelt.status_code == 400 and "TwiML" in misspelt.json["message"]


def test_the_texml_simulator_refuses_verbs_telnyx_does_not_document() -> None:
    from app.devtools.simulator.telnyx import TexmlCallResult, TexmlCallSimulator, _TexmlRun

    simulator = TexmlCallSimulator("http://127.0.0.1:9", TelnyxSigner())
    result = TexmlCallResult(call_sid=CALL_ID)
    run = _TexmlRun(result, "+1", "+2", b"", b"", "PCMU", 8000, 0.0, False, False, False, 0.0)
    simulator._run_texml(run, "<Response><Say>hi</Say><Client>x</Client><Hangup/></Response>", depth=0)
    assert result.said == ["hi"] and result.hung_up
    assert result.errors == ["<Client> is not a TeXML verb Telnyx documents"]


@pytest.mark.parametrize("assumptions", [TELNYX_ASSUMPTIONS, TWILIO_ASSUMPTIONS])
def test_every_assumption_says_its_source_and_is_listed_in_the_readme(assumptions: tuple[Any, ...]) -> None:
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    for item in assumptions:
        assert item.topic and item.assumption and item.source and item.handling
        assert re.search(re.escape(item.topic), readme, re.IGNORECASE), f"README does not list {item.topic!r}"
