"""Fault 7: signed but malformed bodies — a Call Control event, a TeXML form or a Kallglot webhook whose ``data``,
``data.payload`` or any field we read has the wrong JSON type — get a 4xx and change nothing; never a 5xx."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.carriers.telnyx.events import PAYLOAD_STRING_FIELDS
from app.carriers.telnyx.control import encode_client_state
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.extensions import services
from app.factory import create_app
from app.kallglot.signature import sign
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.settings import PUBLIC_URL, bridge_config, telnyx_config

TO, FROM = "+15005550006", "+15551230000"
KALLGLOT_SECRET = "whsec_malformed_test"
#: Every JSON type but the one expected (strings): null is allowed for optional fields, so it is not here.
WRONG_VALUES: list[Any] = [7, 1.5, True, [], ["x"], {}, {"a": 1}]


@pytest.fixture
def app(redis_url: str, emulator: EmulatorControl, namespace: str, telnyx_signer: TelnyxSigner,
        fake_call_control: FakeCallControl) -> Flask:
    app = create_app({**telnyx_config(bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                                      telnyx_signer.public_key, fake_call_control.api_url),
                      "KALLGLOT_WEBHOOK_SECRET": KALLGLOT_SECRET})
    app.testing = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def call_control(client: FlaskClient, signer: TelnyxSigner, body: str) -> Any:
    return client.post("/telnyx/call-control", data=body.encode(), content_type="application/json",
                       headers=signer.headers(body))


def event(event_type: str, call_id: str, **payload: Any) -> dict[str, Any]:
    return {"data": {"record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()),
                     "occurred_at": "2026-01-01T00:00:00.000000Z",
                     "payload": {"call_control_id": call_id, "call_leg_id": str(uuid.uuid4()),
                                 "call_session_id": str(uuid.uuid4()), "from": FROM, "to": TO, **payload}},
            "meta": {"attempt": 1}}


def nothing_changed(app: Flask, emulator: EmulatorControl, fake: FakeCallControl) -> None:
    assert emulator.sessions() == [] and fake.commands() == []
    with app.app_context():
        svc = services()
        assert svc.redis.keys(svc.keys.namespace + ":*") == []


def malformed_events() -> list[tuple[str, dict[str, Any]]]:
    """(what is wrong, the event) for every handled event type × every field we read × every wrong type."""
    cases: list[tuple[str, dict[str, Any]]] = []
    state = encode_client_state({"s": "sess_X", "p": "customer"})
    bases = {"call.initiated": {"direction": "incoming", "state": "parked"},
             "call.answered": {"state": "answered", "client_state": state},
             "call.speak.ended": {"client_state": encode_client_state({"bye": "unavailable"})},
             "streaming.failed": {"failure_reason": "x"}, "call.hangup": {"hangup_cause": "normal_clearing"}}
    for event_type, fields in bases.items():
        for wrong in WRONG_VALUES:
            for field in PAYLOAD_STRING_FIELDS:
                body = event(event_type, new_call_control_id(), **fields)
                body["data"]["payload"][field] = wrong
                cases.append((f"{event_type} payload.{field}={wrong!r}", body))
            for field in ("id", "event_type", "occurred_at", "record_type", "payload"):
                body = event(event_type, new_call_control_id(), **fields)
                body["data"][field] = wrong
                cases.append((f"{event_type} data.{field}={wrong!r}", body))
            body = event(event_type, new_call_control_id(), **fields)
            body["data"] = wrong
            cases.append((f"{event_type} data={wrong!r}", body))
    return cases


def test_call_control_events_with_wrong_json_types_are_4xx_and_change_nothing(
        app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    answers = {what: call_control(client, telnyx_signer, json.dumps(body)).status_code
               for what, body in malformed_events()}
    assert {what: status for what, status in answers.items() if not 400 <= status < 500} == {}
    nothing_changed(app, emulator, fake_call_control)


@pytest.mark.parametrize("body", [
    "CallSid=v3:abcdefghij&CallSid=v3:klmnopqrst&To=%2B15005550006",  # a field twice: which one is the call?
    urlencode({"CallSid": "not a call id!", "To": TO, "From": FROM}),
    "&".join(f"f{i}=1" for i in range(300)),  # more fields than Telnyx ever sends
    "\u00ff\u00fe",
])
def test_texml_forms_that_telnyx_would_not_send_are_4xx_and_change_nothing(
        app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl, body: str) -> None:
    for path in ("/telnyx/texml", "/telnyx/texml/status"):
        response = client.post(path, data=body.encode(), content_type="application/x-www-form-urlencoded",
                               headers=telnyx_signer.headers(body))
        assert 400 <= response.status_code < 500, (path, response.status_code)
    nothing_changed(app, emulator, fake_call_control)


def test_a_well_formed_texml_call_still_works(client: FlaskClient, telnyx_signer: TelnyxSigner,
                                              emulator: EmulatorControl) -> None:
    body = urlencode(TexmlCallSimulator.call_params(new_call_control_id(), TO, FROM, "ringing"))
    response = client.post("/telnyx/texml", data=body.encode(), content_type="application/x-www-form-urlencoded",
                           headers=telnyx_signer.headers(body))
    assert response.status_code == 200 and len(emulator.sessions()) == 1


def kallglot(client: FlaskClient, event_body: Any) -> Any:
    raw = json.dumps(event_body).encode()
    return client.post("/kallglot/webhooks", data=raw, content_type="application/json",
                       headers={"Kallglot-Signature": sign(KALLGLOT_SECRET, raw, int(time.time()))})


def test_kallglot_webhooks_with_wrong_json_types_are_4xx_and_change_nothing(
        app: Flask, client: FlaskClient, emulator: EmulatorControl, fake_call_control: FakeCallControl) -> None:
    answers = {}
    for wrong in WRONG_VALUES:
        if not isinstance(wrong, dict):  # any object is a well-typed ``data``
                answers[f"data={wrong!r}"] = kallglot(client, {"id": str(uuid.uuid4()), "type": "session.ended",
                                                           "data": wrong}).status_code
        for field in ("session_id", "id", "object", "status", "reason", "channel", "duration"):
            if isinstance(wrong, (int, float)) and not isinstance(wrong, bool):
                continue  # a number is a fine scalar for these
            answers[f"data.{field}={wrong!r}"] = kallglot(client, {
                "id": str(uuid.uuid4()), "type": "session.ended",
                "data": {"session_id": "sess_1", field: wrong}}).status_code
        for field in ("id", "type"):
            answers[f"{field}={wrong!r}"] = kallglot(client, {"id": "evt_1", "type": "session.ended",
                                                              field: wrong, "data": {}}).status_code
    assert {what: status for what, status in answers.items() if not 400 <= status < 500} == {}
    nothing_changed(app, emulator, fake_call_control)
