"""Telnyx webhooks (Call Control and TeXML) when Redis goes down between two events, when Kallglot and Redis are
both away, and on the events the bridge must leave alone (legs it dialled, an agent-unavailable notice said). In
process (Flask test client), real Redis, the Kallglot emulator and the fake Telnyx API; end states read back."""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.calls.prompts import UNAVAILABLE_MESSAGE
from app.carriers.telnyx.control import GOODBYE_AGENT_UNAVAILABLE, GOODBYE_KEY, TO_KEY, encode_client_state
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.extensions import services
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.redis_server import PersistentRedis
from tests.support.servers import free_port
from tests.support.settings import PUBLIC_URL, bridge_config, telnyx_config
from tests.support.telnyx_requests import FROM, TO, cc, event, post


def texml_body(call_id: str, **extra: str) -> str:
    return urlencode({**TexmlCallSimulator.call_params(call_id, TO, FROM, "ringing"), **extra})


@pytest.fixture
def client(telnyx_app: Flask) -> FlaskClient:
    return telnyx_app.test_client()


@pytest.fixture
def telnyx_app_on_stoppable_redis(stoppable_redis: PersistentRedis, emulator: EmulatorControl, namespace: str,
                                  telnyx_signer: TelnyxSigner, fake_call_control: FakeCallControl) -> Flask:
    app = create_app(telnyx_config(bridge_config(stoppable_redis.url, emulator.api_url, namespace, PUBLIC_URL),
                                   telnyx_signer.public_key, fake_call_control.api_url))
    app.testing = True
    return app


def test_a_hangup_while_redis_is_down_is_503_and_telnyxs_retry_ends_the_session_once(
        telnyx_app_on_stoppable_redis: Flask, stoppable_redis: PersistentRedis, telnyx_signer: TelnyxSigner,
        emulator: EmulatorControl, fake_call_control: FakeCallControl, namespace: str) -> None:
    client = telnyx_app_on_stoppable_redis.test_client()
    call_id = new_call_control_id()
    assert cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming")).status_code == 200
    (session,) = emulator.sessions()
    hangup = event("call.hangup", call_id, hangup_cause="normal_clearing", hangup_source="caller")

    stoppable_redis.stop()
    # The leg's end cannot be recorded: not acknowledged, so Telnyx delivers the event again.
    assert cc(client, telnyx_signer, hangup).status_code == 503
    assert emulator.session(session["id"])["status"] != "ended"

    stoppable_redis.start()
    assert cc(client, telnyx_signer, hangup).json == {"status": "ok"}  # the retry: same data.id, now handled
    assert cc(client, telnyx_signer, hangup).json == {"status": "duplicate"}
    state = BridgeState(redis_lib.Redis.from_url(stoppable_redis.url), namespace)
    assert state.settled_ended(session["id"])
    assert state.call("telnyx", call_id)["end_reason"] == "hangup_normal_clearing"
    assert emulator.session(session["id"])["end_calls"] == 1


def test_a_texml_status_while_redis_is_down_is_503_and_the_retry_ends_the_session_once(
        telnyx_app_on_stoppable_redis: Flask, stoppable_redis: PersistentRedis, telnyx_signer: TelnyxSigner,
        emulator: EmulatorControl, namespace: str) -> None:
    client = telnyx_app_on_stoppable_redis.test_client()
    call_id = new_call_control_id()
    assert post(client, "/telnyx/texml", texml_body(call_id), telnyx_signer).status_code == 200
    (session,) = emulator.sessions()
    stopped = texml_body(call_id, StreamEvent="stream-stopped", StreamSid=str(uuid.uuid4()))
    completed = texml_body(call_id, CallStatus="completed", CallDuration="4")

    stoppable_redis.stop()
    assert post(client, "/telnyx/texml/status", stopped, telnyx_signer).status_code == 503
    assert post(client, "/telnyx/texml/status", completed, telnyx_signer).status_code == 503
    assert emulator.session(session["id"])["status"] != "ended"

    stoppable_redis.start()
    for body in (stopped, completed, completed):
        assert post(client, "/telnyx/texml/status", body, telnyx_signer).status_code == 200
    state = BridgeState(redis_lib.Redis.from_url(stoppable_redis.url), namespace)
    assert state.settled_ended(session["id"])
    assert emulator.session(session["id"])["end_calls"] == 1


def test_texml_with_kallglot_and_redis_both_down_still_answers_with_the_builtin_apology(
        emulator: EmulatorControl, telnyx_signer: TelnyxSigner, fake_call_control: FakeCallControl) -> None:
    app = create_app(telnyx_config(bridge_config(f"redis://127.0.0.1:{free_port()}/0", emulator.api_url, "no-redis",
                                                 PUBLIC_URL), telnyx_signer.public_key, fake_call_control.api_url))
    response = post(app.test_client(), "/telnyx/texml", texml_body(new_call_control_id()), telnyx_signer)
    assert response.status_code == 200
    root = ET.fromstring(response.data)
    assert [child.tag for child in root] == ["Say", "Hangup"] and root.find("Say").text == UNAVAILABLE_MESSAGE


@pytest.mark.parametrize("stream_event", ["stream-error", "stream-failed", "stream-stopped"])
@pytest.mark.parametrize("cause, clean", [("normal_clearing", True), ("destination_out_of_order", False)])
def test_a_texml_stream_ending_is_recorded_and_the_calls_end_ends_the_leg_lost_or_clean(
        client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        stream_event: str, cause: str, clean: bool) -> None:
    """A stream's status callback ends nothing (the <Redirect> after <Connect> restores a stream lost with the
    caller still on: texml_restore.py); the call's own final status ends the leg, lost or clean by its cause."""
    call_id = new_call_control_id()
    post(client, "/telnyx/texml", texml_body(call_id), telnyx_signer)
    (session,) = emulator.sessions()
    body = texml_body(call_id, StreamEvent=stream_event, StreamSid=str(uuid.uuid4()), StreamError="media lost")
    assert post(client, "/telnyx/texml/status", body, telnyx_signer).status_code == 200
    with telnyx_app.app_context():
        svc = services()
        assert svc.lifecycle.call_record("telnyx", call_id)["state"] == "live"
        assert [e.get("event") for e in svc.lifecycle.events("telnyx", call_id)] == [stream_event]
    completed = texml_body(call_id, CallStatus="completed", HangupCause=cause)
    assert post(client, "/telnyx/texml/status", completed, telnyx_signer).status_code == 200
    with telnyx_app.app_context():
        svc = services()
        call = svc.lifecycle.call_record("telnyx", call_id)
        record = svc.lifecycle.session_record(session["id"])
    assert call["state"] == "ended" and call["end_reason"] == f"call_completed_{cause}"
    assert call["clean"] == ("1" if clean else "0")
    # A lost call holds the session for a reconnect; an ordinary hang-up ends it at once.
    assert record["status"] == ("ended" if clean else "held")
    assert (emulator.session(session["id"])["status"] == "ended") is clean


def test_a_call_initiated_for_a_leg_the_bridge_dialled_is_left_to_its_answer(
        client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    call_id = new_call_control_id()
    assert cc(client, telnyx_signer, event("call.initiated", call_id, direction="outgoing",
                                           state="bridging")).json == {"status": "ok"}
    assert fake_call_control.commands() == [] and emulator.sessions() == []


def test_the_agent_unavailable_notice_said_without_a_fallback_number_leaves_the_customer_on(
        client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming"))
    (session,) = emulator.sessions()
    said = encode_client_state({GOODBYE_KEY: GOODBYE_AGENT_UNAVAILABLE, TO_KEY: TO})
    assert cc(client, telnyx_signer, event("call.speak.ended", call_id, status="completed",
                                           client_state=said)).status_code == 200
    # No transfer (no fallback number) and no hang-up: the customer stays with the session.
    assert [c["action"] for c in fake_call_control.commands()] == ["answer"]
    assert emulator.session(session["id"])["status"] != "ended"
    with telnyx_app.app_context():
        assert services().lifecycle.call_record("telnyx", call_id)["state"] == "live"
