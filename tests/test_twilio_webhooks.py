"""Twilio webhooks in-process (Flask test client) against the Kallglot emulator and a real Redis."""
from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.calls.events import LEG, SessionEventLog
from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.extensions import services
from app.profiles import NumberProfile
from tests.support.controls import EmulatorControl
from tests.support.settings import PUBLIC_URL, TWILIO_ACCOUNT_SID, twilio_signature
from tests.support.twilio_requests import FROM, TO, answer, call_params, new_call_sid, post_signed


def test_voice_creates_a_session_and_connects_the_stream(client: FlaskClient, app: Flask,
                                                         emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    root = answer(client, call_sid)
    connect = root.find("Connect")
    assert connect is not None and connect.get("action") == PUBLIC_URL + "/twilio/connect-action"
    stream = connect.find("Stream")
    assert stream.get("url") == "wss://bridge.example.com/twilio/media"
    assert "?" not in stream.get("url")  # Twilio drops query strings from stream URLs
    assert stream.get("statusCallback") == PUBLIC_URL + "/twilio/stream-status"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert set(params) == {"session_id", "relay_token"}
    (session,) = emulator.sessions()
    assert session["id"] == params["session_id"]
    assert session["mode"] == "bidirectional_translation"
    assert session["source_language"] == "en" and session["target_language"] == "es"
    assert session["routing"] == {"phone_number": TO}
    assert session["metadata"] == {"twilio_call_sid": call_sid, "from_number": FROM, "to_number": TO}
    assert session["idempotency_key"] == f"twilio-call-{call_sid}"
    with app.app_context():
        svc = services()
        assert svc.lifecycle.session_for_call("twilio", call_sid) == session["id"]
        # The Kallglot stream token travels sealed inside the relay token, never through Redis.
        stored = b" ".join(v for key in svc.redis.keys(svc.keys.namespace + ":*") if svc.redis.type(key) == b"hash"
                           for v in svc.redis.hgetall(key).values())
        assert b"kst_" not in stored
        grant = svc.relay_tokens.open(params["relay_token"], carrier="twilio", call_id=call_sid)
        assert grant.session_id == session["id"] and grant.stream_token.startswith("kst_")


def test_number_profile_chooses_mode_and_languages(client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        services().profiles.set(TO, NumberProfile(mode="assistive_translation", source_language="de",
                                                  target_language="fr"))
    answer(client, new_call_sid())
    (session,) = emulator.sessions()
    assert (session["mode"], session["source_language"], session["target_language"]) == \
        ("assistive_translation", "de", "fr")


def test_retried_webhook_never_creates_a_second_session(client: FlaskClient, emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    first = answer(client, call_sid)
    second = answer(client, call_sid)
    assert len(emulator.sessions()) == 1
    ids = {root.find("Connect/Stream/Parameter[@name='session_id']").get("value") for root in (first, second)}
    assert len(ids) == 1


@pytest.mark.parametrize("case", ["missing", "wrong-token", "request-url", "tampered-param"])
def test_bad_signature_is_refused_and_creates_nothing(client: FlaskClient, emulator: EmulatorControl,
                                                      case: str) -> None:
    params = call_params(new_call_sid())
    if case == "missing":
        response = client.post("/twilio/voice", data=params)
    elif case == "wrong-token":
        response = post_signed(client, "/twilio/voice", params,
                               signature=twilio_signature(PUBLIC_URL + "/twilio/voice", params, token="nope"))
    elif case == "request-url":
        # Signed over the internal URL the proxy forwarded to, not the public one Twilio used.
        response = post_signed(client, "/twilio/voice", params, base="http://localhost")
    else:
        signature = twilio_signature(PUBLIC_URL + "/twilio/voice", params)
        response = post_signed(client, "/twilio/voice", {**params, "To": "+15550000000"}, signature=signature)
    assert response.status_code == 403
    assert emulator.sessions() == []


def test_query_string_is_part_of_the_signed_url(client: FlaskClient, emulator: EmulatorControl) -> None:
    params = call_params(new_call_sid())
    signature = twilio_signature(PUBLIC_URL + "/twilio/voice?tenant=a", params)
    ok = client.post("/twilio/voice?tenant=a", data=params, headers={"X-Twilio-Signature": signature})
    assert ok.status_code == 200
    assert client.post("/twilio/voice?tenant=b", data=params,
                       headers={"X-Twilio-Signature": signature}).status_code == 403


@pytest.mark.parametrize("body", [{"CallSid": ""}, {"CallSid": "nonsense"}, {"From": FROM}])
def test_signed_but_malformed_webhook_is_a_400(client: FlaskClient, emulator: EmulatorControl,
                                               body: dict[str, str]) -> None:
    assert post_signed(client, "/twilio/voice", body).status_code == 400
    assert emulator.sessions() == []


def test_garbage_body_signed_as_twilio_would_reaches_the_parser_and_is_a_400(
        client: FlaskClient, emulator: EmulatorControl) -> None:
    # Twilio signs the URL plus the form parameters; a body that is no form has none, so this signature is
    # valid and the request gets past the signature check to the parser, which must refuse it cleanly.
    response = client.post("/twilio/voice", data=b"\x00\xff{{garbage", content_type="application/octet-stream",
                           headers={"X-Twilio-Signature": twilio_signature(PUBLIC_URL + "/twilio/voice", {})})
    assert response.status_code == 400
    assert emulator.sessions() == []


def test_garbage_body_with_a_bad_signature_is_a_403(client: FlaskClient) -> None:
    response = client.post("/twilio/voice", data=b"\x00\xff{{garbage", content_type="application/octet-stream",
                           headers={"X-Twilio-Signature": "abc"})
    assert response.status_code == 403


@pytest.mark.parametrize("status, code", [(503, "service_unavailable"), (402, "insufficient_api_credits"),
                                          (403, "organization_inactive"), (500, "internal_error")])
def test_kallglot_failure_says_something_and_hangs_up(client: FlaskClient, emulator: EmulatorControl,
                                                      status: int, code: str) -> None:
    emulator.fault(endpoint="create", status=status, code=code, times=5)
    root = answer(client, new_call_sid())
    assert root.find("Connect") is None
    assert [verb.tag for verb in root] == ["Say", "Hangup"] and root.findtext("Say") == UNAVAILABLE_MESSAGE


def test_kallglot_5xx_is_retried_within_the_webhook(client: FlaskClient, emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=1)
    root = answer(client, new_call_sid())
    assert root.find("Connect/Stream") is not None
    assert len(emulator.sessions()) == 1


def test_kallglot_unreachable_is_not_dead_air(redis_url: str, namespace: str) -> None:
    from app import create_app
    from tests.support.settings import bridge_config
    from tests.support.servers import free_port

    app = create_app(bridge_config(redis_url, f"http://127.0.0.1:{free_port()}/v1", namespace, PUBLIC_URL))
    root = answer(app.test_client(), new_call_sid())
    assert [verb.tag for verb in root] == ["Say", "Hangup"] and root.findtext("Say") == UNAVAILABLE_MESSAGE


def complete(client: FlaskClient, call_sid: str, **extra: str):
    return post_signed(client, "/twilio/status", call_params(call_sid, CallStatus="completed", CallDuration="12",
                                                             **extra))


def test_completed_call_ends_the_session_exactly_once(client: FlaskClient, app: Flask,
                                                      emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    # Out of order and repeated: an in-progress callback after completion must not revive anything.
    assert complete(client, call_sid).status_code == 204
    assert complete(client, call_sid).status_code == 204
    assert post_signed(client, "/twilio/status", call_params(call_sid, CallStatus="in-progress")).status_code == 204
    assert post_signed(client, "/twilio/stream-status", {"CallSid": call_sid, "AccountSid": TWILIO_ACCOUNT_SID,
                                                         "StreamSid": "MZ" + "0" * 32,
                                                         "StreamEvent": "stream-stopped"}).status_code == 204
    (session,) = emulator.sessions()
    assert session["status"] == "ended" and session["end_calls"] == 1
    with app.app_context():
        lifecycle = services().lifecycle
        record = lifecycle.session_record(session["id"])
        assert record["status"] == "ended" and record["end_reason"] == "call_completed"
        # The repeated delivery was recognised and recorded once; the late in-progress is recorded, not acted on.
        assert [e["status"] for e in lifecycle.events("twilio", call_sid) if e["source"] == "call-status"] == \
            ["completed", "in-progress"]


def test_failed_end_is_retried_from_the_deadlines(client: FlaskClient, app: Flask,
                                                  emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    session_id = answer(client, call_sid).find("Connect/Stream/Parameter[@name='session_id']").get("value")
    emulator.fault(endpoint="end", status=503, code="service_unavailable", times=3,  # the client's 3 attempts
                   session_id=session_id)
    complete(client, call_sid)
    assert emulator.sessions()[0]["status"] != "ended"
    with app.app_context():
        lifecycle = services().lifecycle
        assert lifecycle.session_record(session_id)["status"] == "end_failed"
        assert lifecycle.end_due_sessions(now=time.time()) == 0  # backoff not over yet
        assert lifecycle.end_due_sessions(now=time.time() + 5) == 1
        assert lifecycle.session_record(session_id)["status"] == "ended"
    assert emulator.sessions()[0]["status"] == "ended"


def restore(client: FlaskClient, call_sid: str) -> ET.Element:
    response = post_signed(client, "/twilio/connect-action", call_params(call_sid, CallStatus="in-progress"))
    assert response.status_code == 200
    return ET.fromstring(response.data)


def test_connect_action_restores_the_stream_then_gives_up(client: FlaskClient, app: Flask,
                                                          emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    session_id = emulator.sessions()[0]["id"]
    for _ in range(3):  # the relay died or the socket dropped: a new stream to the same session
        root = restore(client, call_sid)
        assert root.find("Connect/Stream/Parameter[@name='session_id']").get("value") == session_id
        assert root.find("Say") is None  # no second greeting
    root = restore(client, call_sid)
    assert [verb.tag for verb in root] == ["Say", "Hangup"] and root.findtext("Say") == UNAVAILABLE_MESSAGE
    assert len(emulator.sessions()) == 1


def test_a_stream_replaced_on_purpose_leaves_all_three_restores(client: FlaskClient, app: Flask,
                                                                 emulator: EmulatorControl) -> None:
    """The agent-unavailable redirect re-attaches the customer for a new stream (agent_unavailable.py): that is
    not a lost stream, so a customer whose agent was busy still gets 3 restores when streams are then lost."""
    call_sid = new_call_sid()
    answer(client, call_sid)
    with app.app_context():
        assert services().lifecycle.reattach_leg("twilio", call_sid, restoring_lost_stream=False)
        assert services().lifecycle.call_record("twilio", call_sid).get("stream_restarts", "0") == "0"
    for _ in range(3):
        assert restore(client, call_sid).find("Connect/Stream") is not None
    root = restore(client, call_sid)
    assert root.find("Connect") is None and root.find("Say") is not None
    with app.app_context():
        assert services().lifecycle.call_record("twilio", call_sid)["stream_restarts"] == "3"


def test_connect_action_after_kallglot_ended_says_goodbye(client: FlaskClient, app: Flask,
                                                          emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    with app.app_context():
        services().lifecycle.leg_ended("twilio", call_sid, "relay_kallglot_ended")
    root = restore(client, call_sid)
    assert [verb.tag for verb in root] == ["Say", "Hangup"] and root.findtext("Say") == SESSION_OVER_MESSAGE


def test_connect_action_after_kallglot_failure_uses_the_profile_fallback(client: FlaskClient, app: Flask,
                                                                         emulator: EmulatorControl) -> None:
    with app.app_context():
        services().profiles.set(TO, NumberProfile(fallback_message="Un momento", fallback_language="es-ES",
                                                  fallback_number="+14155550199"))
    call_sid = new_call_sid()
    answer(client, call_sid)
    with app.app_context():
        services().lifecycle.leg_ended("twilio", call_sid, "relay_kallglot_unreachable", clean=False)
    root = restore(client, call_sid)
    assert root.find("Say").text == "Un momento" and root.find("Say").get("language") == "es-ES"
    assert root.find("Dial").text == "+14155550199"
    with app.app_context():  # the supervisor's live view says the fallback was used, and why
        svc = services()
        session_id = svc.lifecycle.call_record("twilio", call_sid)["session_id"]
        (event,) = [e for e in SessionEventLog(svc.redis, svc.keys).latest(session_id, 20) if e.kind == LEG]
    assert (event.data["state"], event.data["detail"], event.data["call_id"]) == \
        ("fallback", "relay_kallglot_unreachable", call_sid)


@pytest.mark.parametrize("order", ["status-first", "action-only"])
def test_connect_action_for_a_completed_call_does_not_revive_its_leg(client: FlaskClient, app: Flask,
                                                                     emulator: EmulatorControl, order: str) -> None:
    """Issue 12 item 11: the session is held (hang-up grace), so a revived leg would keep it open."""
    with app.app_context():
        services().profiles.set(TO, NumberProfile(hangup_grace_seconds=60))
    call_sid = new_call_sid()
    answer(client, call_sid)
    if order == "status-first":
        assert complete(client, call_sid).status_code == 204
    response = post_signed(client, "/twilio/connect-action", call_params(call_sid, CallStatus="completed"))
    assert response.status_code == 200
    root = ET.fromstring(response.data)
    assert root.find("Connect") is None and list(root) == []
    with app.app_context():
        call = services().lifecycle.call_record("twilio", call_sid)
    assert call["state"] == "ended" and call["end_reason"].startswith("call_completed")
    assert int(call.get("stream_restarts") or 0) == 0


def test_status_for_an_unknown_call_is_recorded_quietly(client: FlaskClient, emulator: EmulatorControl) -> None:
    assert complete(client, new_call_sid()).status_code == 204
    assert emulator.stats()["end_calls"] == 0


def test_fallback_answers_without_kallglot(client: FlaskClient, emulator: EmulatorControl) -> None:
    response = post_signed(client, "/twilio/fallback", call_params(new_call_sid(), ErrorCode="11200"))
    assert response.status_code == 200 and b"<Hangup" in response.data
    assert emulator.sessions() == []


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["status"] == "ready"


def test_landing_page_shows_where_to_point_the_number(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert re.search(r"https://bridge\.example\.com/twilio/voice", page)


def test_retried_callbacks_are_handled_once(client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    call_sid = new_call_sid()
    answer(client, call_sid)
    params = call_params(call_sid, CallStatus="ringing", SequenceNumber="1")
    signature = twilio_signature(PUBLIC_URL + "/twilio/status", params)
    headers = {"X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": "token-1"}
    for _ in range(3):
        assert client.post("/twilio/status", data=params, headers=headers).status_code == 204
    # A replay with a new value of the unsigned header is the same signed delivery: still handled once.
    other = {**headers, "I-Twilio-Idempotency-Token": "token-2"}
    assert client.post("/twilio/status", data=params, headers=other).status_code == 204
    with app.app_context():
        assert len(services().lifecycle.events("twilio", call_sid)) == 1
    # The next signed callback (another SequenceNumber) is a new delivery.
    later = call_params(call_sid, CallStatus="in-progress", SequenceNumber="2")
    later_headers = {"X-Twilio-Signature": twilio_signature(PUBLIC_URL + "/twilio/status", later),
                     "I-Twilio-Idempotency-Token": "token-1"}
    assert client.post("/twilio/status", data=later, headers=later_headers).status_code == 204
    with app.app_context():
        assert len(services().lifecycle.events("twilio", call_sid)) == 2


@pytest.mark.parametrize("status", ["no-answer", "busy", "failed", "canceled"])
def test_agent_who_never_answers_does_not_hang_up_the_customer(client: FlaskClient, app: Flask,
                                                               emulator: EmulatorControl, status: str) -> None:
    """Issue 12 item 10 on Twilio: the agent leg's final status is not an agent hang-up."""
    from app.calls.leg_spec import LegSpec

    with app.app_context():
        services().profiles.set(TO, NumberProfile(agent_number="+14155557770", agent_hangup_ends_call=True))
    customer, agent = new_call_sid(), new_call_sid()
    answer(client, customer)
    session_id = emulator.sessions()[0]["id"]
    with app.app_context():
        lifecycle = services().lifecycle
        assert lifecycle.register_leg(LegSpec.joining(lifecycle.session_record(session_id), carrier="twilio",
                                                      call_id=agent, speaker="agent", from_number=TO,
                                                      to_number="+14155557770"), session_id=session_id)
    assert post_signed(client, "/twilio/status", call_params(agent, CallStatus=status)).status_code == 204
    with app.app_context():
        assert services().lifecycle.call_record("twilio", customer).get("state") != "ended"
    assert emulator.sessions()[0]["status"] != "ended"
