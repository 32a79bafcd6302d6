"""Twilio webhooks when the parts around them fail or the carrier repeats itself: Redis going down between two
callbacks, Kallglot refusing or forgetting a session, a replayed voice webhook, an outbound leg answered for a
session that is over. In-process (Flask test client), real Redis and the Kallglot emulator; end states read back."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app import create_app
from app.calls.leg_spec import LegSpec
from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.extensions import services
from app.kallglot.client import KallglotClient
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl
from tests.support.redis_server import PersistentRedis
from tests.support.servers import free_port
from tests.support.settings import EMULATOR_API_KEY, PUBLIC_URL, bridge_config
from tests.support.twilio_requests import TO, answer, call_params, new_call_sid, post_signed


def twiml(response) -> ET.Element:
    assert response.status_code == 200 and response.mimetype == "text/xml", response.data
    return ET.fromstring(response.data)


def is_goodbye(root: ET.Element, message: str) -> bool:
    """``<Say>message</Say><Hangup/>`` and no stream: the caller hears why, then the call ends."""
    return [child.tag for child in root] == ["Say", "Hangup"] and root.find("Say").text == message


def fallback_count(reason: str) -> float:
    """Calls answered with the fallback for ``reason``, as this process's metrics count them."""
    return REGISTRY.get_sample_value("kallglot_bridge_fallbacks_total", {"carrier": "twilio", "reason": reason}) or 0.0


@pytest.fixture
def app_on_stoppable_redis(stoppable_redis: PersistentRedis, emulator: EmulatorControl, namespace: str) -> Flask:
    app = create_app(bridge_config(stoppable_redis.url, emulator.api_url, namespace, PUBLIC_URL))
    app.testing = True
    return app


@pytest.fixture
def app_without_redis(emulator: EmulatorControl) -> Flask:
    """The bridge with its Redis unreachable (nothing listens at its URL)."""
    app = create_app(bridge_config(f"redis://127.0.0.1:{free_port()}/0", emulator.api_url, "no-redis", PUBLIC_URL))
    app.testing = True
    return app


def test_a_final_status_while_redis_is_down_is_503_and_twilios_retry_ends_the_session_once(
        app_on_stoppable_redis: Flask, stoppable_redis: PersistentRedis, emulator: EmulatorControl,
        namespace: str) -> None:
    client = app_on_stoppable_redis.test_client()
    call_sid = new_call_sid()
    answer(client, call_sid)
    (session,) = emulator.sessions()
    completed = call_params(call_sid, CallStatus="completed", CallDuration="7", SequenceNumber="3")
    stream_stopped = call_params(call_sid, StreamEvent="stream-stopped", StreamSid="MZ" + "0" * 32)

    stoppable_redis.stop()
    # Not recorded, so not acknowledged: Twilio retries a callback that got a 5xx.
    assert post_signed(client, "/twilio/status", completed).status_code == 503
    assert post_signed(client, "/twilio/stream-status", stream_stopped).status_code == 503
    assert emulator.session(session["id"])["status"] != "ended"

    stoppable_redis.start()
    assert post_signed(client, "/twilio/stream-status", stream_stopped).status_code == 204
    assert post_signed(client, "/twilio/stream-status", stream_stopped).status_code == 204  # a repeat: once
    assert post_signed(client, "/twilio/status", completed).status_code == 204  # Twilio's retry, same bytes
    assert post_signed(client, "/twilio/status", completed).status_code == 204  # and a second one
    state = BridgeState(redis_lib.Redis.from_url(stoppable_redis.url), namespace)
    assert state.settled_ended(session["id"])
    assert state.call("twilio", call_sid)["end_reason"] == "call_completed"
    assert emulator.session(session["id"])["end_calls"] == 1
    with app_on_stoppable_redis.app_context():
        recorded = services().lifecycle.events("twilio", call_sid)
    assert [e.get("event") or e.get("status") for e in recorded] == ["stream-stopped", "completed"]


def test_with_redis_down_every_answering_webhook_falls_back_instead_of_dead_air(
        app_without_redis: Flask, emulator: EmulatorControl) -> None:
    client = app_without_redis.test_client()
    before = fallback_count("redis_unavailable")
    call_sid = new_call_sid()
    # The voice webhook cannot read the number's profile or correlate the call: the built-in apology.
    assert is_goodbye(twiml(post_signed(client, "/twilio/voice", call_params(call_sid))), UNAVAILABLE_MESSAGE)
    assert fallback_count("redis_unavailable") == before + 1
    assert emulator.sessions() == []  # nothing was created that nobody could end
    # A stream to restore, or an outbound leg answered: neither can be looked up, both apologise and hang up.
    for path in ("/twilio/connect-action", "/twilio/outbound-answer"):
        root = twiml(post_signed(client, path, call_params(call_sid, CallStatus="in-progress")))
        assert is_goodbye(root, UNAVAILABLE_MESSAGE), (path, ET.tostring(root))


def test_a_replayed_voice_webhook_of_an_ended_call_is_refused(client: FlaskClient, app: Flask,
                                                               emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    assert post_signed(client, "/twilio/status", call_params(call_sid, CallStatus="completed")).status_code == 204
    replay = post_signed(client, "/twilio/voice", call_params(call_sid))
    assert replay.status_code == 409
    assert len(emulator.sessions()) == 1 and emulator.sessions()[0]["status"] == "ended"
    with app.app_context():
        assert services().lifecycle.call_record("twilio", call_sid)["state"] == "ended"


def test_connect_action_for_a_call_the_bridge_never_answered_says_goodbye(client: FlaskClient,
                                                                           emulator: EmulatorControl) -> None:
    root = twiml(post_signed(client, "/twilio/connect-action", call_params(new_call_sid(), CallStatus="in-progress")))
    assert is_goodbye(root, SESSION_OVER_MESSAGE)
    assert emulator.sessions() == []


def test_connect_action_after_kallglot_forgot_the_session_says_goodbye_and_ends_the_leg(
        client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    (session,) = emulator.sessions()
    # Ended at Kallglot behind the bridge's back (its console, a timeout): no stream to restore into.
    KallglotClient(emulator.api_url, EMULATOR_API_KEY).end_session(session["id"])
    root = twiml(post_signed(client, "/twilio/connect-action", call_params(call_sid, CallStatus="in-progress")))
    assert is_goodbye(root, SESSION_OVER_MESSAGE)
    with app.app_context():
        call = services().lifecycle.call_record("twilio", call_sid)
    assert call["state"] == "ended" and call["end_reason"] == "stream_closed"
    assert int(call.get("stream_restarts") or 0) == 0


def test_connect_action_while_kallglot_fails_falls_back(client: FlaskClient, app: Flask,
                                                        emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    (session,) = emulator.sessions()
    emulator.fault(endpoint="get", status=500, code="internal_error", times=10, session_id=session["id"])
    root = twiml(post_signed(client, "/twilio/connect-action", call_params(call_sid, CallStatus="in-progress")))
    assert is_goodbye(root, UNAVAILABLE_MESSAGE)


def register_agent_leg(app: Flask, session_id: str, agent_sid: str) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        assert lifecycle.register_leg(LegSpec.joining(lifecycle.session_record(session_id), carrier="twilio",
                                                      call_id=agent_sid, speaker="agent", from_number=TO,
                                                      to_number="+14155557770"), session_id=session_id)


def test_an_answered_agent_leg_is_streamed_into_its_session_as_the_agent(client: FlaskClient, app: Flask,
                                                                           emulator: EmulatorControl) -> None:
    customer, agent = new_call_sid(), new_call_sid()
    answer(client, customer)
    (session,) = emulator.sessions()
    register_agent_leg(app, session["id"], agent)
    root = twiml(post_signed(client, "/twilio/outbound-answer", call_params(agent, Direction="outbound-api",
                                                                            CallStatus="in-progress")))
    params = {p.get("name"): p.get("value") for p in root.findall("Connect/Stream/Parameter")}
    assert params["session_id"] == session["id"]
    with app.app_context():
        grant = services().relay_tokens.open(params["relay_token"], carrier="twilio", call_id=agent)
    assert grant.speaker == "agent" and root.find("Say") is None  # the agent is not greeted


def test_an_agent_answering_after_kallglot_ended_the_session_hears_goodbye_and_its_leg_ends(
        client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    customer, agent = new_call_sid(), new_call_sid()
    answer(client, customer)
    (session,) = emulator.sessions()
    register_agent_leg(app, session["id"], agent)
    KallglotClient(emulator.api_url, EMULATOR_API_KEY).end_session(session["id"])
    root = twiml(post_signed(client, "/twilio/outbound-answer", call_params(agent, CallStatus="in-progress")))
    assert is_goodbye(root, SESSION_OVER_MESSAGE)
    with app.app_context():
        call = services().lifecycle.call_record("twilio", agent)
    assert call["state"] == "ended" and call["end_reason"] == "session_gone"


def test_an_outbound_leg_nobody_registered_hears_goodbye(client: FlaskClient, emulator: EmulatorControl) -> None:
    # Twilio may ask for the answer URL a moment before dial() registered the leg; this one never is.
    root = twiml(post_signed(client, "/twilio/outbound-answer", call_params(new_call_sid(), CallStatus="in-progress")))
    assert is_goodbye(root, SESSION_OVER_MESSAGE)
