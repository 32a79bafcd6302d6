"""Per-number transports (relay, direct, sip) in-process: the profile's rules, each carrier's markup or command,
the session Kallglot is asked for, and the lifecycle's single end — against the Kallglot emulator and a real Redis.
Whole calls over real sockets are in ``tests/test_e2e_transports.py``."""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import datetime, timedelta, timezone
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.calls.lifecycle import CARRIER_WATCHED_LEG_SECONDS
from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.carriers.telnyx.control import GREETING_KEY, SIP_FOR_KEY, decode_client_state, encode_client_state
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.extensions import services
from app.kallglot.client import KallglotSession, StreamGrant
from app.kallglot.telephony import grant_fresh
from app.profiles import NumberProfile, ProfileError
from app.profiles.transfer import ProfileImportError, export_profiles, import_profiles
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.settings import PUBLIC_URL
from tests.support.telnyx_requests import FROM as TELNYX_FROM, TO as TELNYX_TO, cc, event, post
from tests.support.twilio_requests import FROM, TO, answer, call_params, new_call_sid, post_signed


def set_transport(app: Flask, number: str, transport: str, **fields: object) -> None:
    with app.app_context():
        services().profiles.set(number, NumberProfile(transport=transport, **fields))  # type: ignore[arg-type]


def sip_domain(emulator: EmulatorControl) -> str:
    return emulator.api_url.split("//", 1)[1].split("/", 1)[0]


def stored_values(app: Flask) -> bytes:
    """Every value the bridge keeps in Redis under its namespace (hashes, strings, lists, sets)."""
    with app.app_context():
        svc = services()
        out = []
        for key in svc.redis.keys(svc.keys.namespace + ":*"):
            kind = svc.redis.type(key)
            if kind == b"hash":
                out += list(svc.redis.hgetall(key).values())
            elif kind == b"string":
                out.append(svc.redis.get(key) or b"")
            elif kind == b"list":
                out += svc.redis.lrange(key, 0, -1)
        return b" ".join(out)


# ----- the profile's rules -----------------------------------------------------------------------------------------
def test_transport_defaults_to_relay_and_round_trips() -> None:
    assert NumberProfile().transport == "relay"
    for transport in ("relay", "direct", "sip"):
        profile = NumberProfile(transport=transport)
        assert profile.problems(("twilio",)) == {}
        assert NumberProfile.from_json(profile.to_json()).transport == transport


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"transport": "carrier-pigeon"}, "transport", "must be one of relay, direct, sip"),
    ({"transport": "direct", "agent_number": "+14155550100"}, "agent_number", "an agent leg needs the relay"),
    ({"transport": "sip", "agent_number": "+14155550100"}, "agent_number", "an agent leg needs the relay"),
    ({"transport": "direct", "browser_agents": True}, "browser_agents", "browser agents need the relay"),
    ({"transport": "direct", "mode": "assistive_translation"}, "mode", "live subtitles"),
    ({"transport": "sip", "mode": "assistive_translation"}, "mode", "live subtitles"),
])
def test_combinations_that_cannot_work_are_refused_with_a_reason(app: Flask, fields: dict, field: str,
                                                                 words: str) -> None:
    with app.app_context():
        with pytest.raises(ProfileError) as refused:
            services().profiles.set(TO, NumberProfile(**fields))
        assert words in refused.value.problems[field]
        assert not services().profiles.for_number(TO).own  # nothing stored
    # The same numbers on the relay are fine.
    relay = {**fields, "transport": "relay"}
    assert NumberProfile(**relay).problems(("twilio",)) == {}


def test_import_carries_transport_and_refuses_a_broken_combination(app: Flask) -> None:
    with app.app_context():
        store = services().profiles
        import_profiles(store, {"profiles": {"+15005550006": {"transport": "sip"},
                                             "+15005550007": {"transport": "direct"}}})
        assert store.for_number("+15005550006").transport == "sip"
        assert store.for_number("+15005550007").transport == "direct"
        exported = export_profiles(store)  # what ``numbers export`` writes carries it too, and imports back as is
        assert {n: p["transport"] for n, p in exported["profiles"].items()} == {"+15005550006": "sip",
                                                                                "+15005550007": "direct"}
        store.set("+15005550006", NumberProfile())
        import_profiles(store, json.loads(json.dumps(exported)))
        assert store.for_number("+15005550006").transport == "sip"
        with pytest.raises(ProfileImportError) as refused:
            import_profiles(store, {"profiles": {"+15005550008": {"transport": "direct",
                                                                  "agent_number": "+14155550100"}}})
        assert "an agent leg needs the relay" in str(refused.value.problems)
        assert not store.for_number("+15005550008").own


def test_sip_domain_setting_is_validated() -> None:
    from app.config import Settings

    assert Settings().kallglot_sip_domain == "sip.kallglot.com"
    bad = Settings(kallglot_sip_domain="sip.kallglot.com;transport=udp").problems()
    assert any("KALLGLOT_SIP_DOMAIN" in problem for problem in bad)


# ----- Twilio --------------------------------------------------------------------------------------------------------
def test_twilio_direct_answers_with_kallglots_own_stream_and_token(client: FlaskClient, app: Flask,
                                                                     emulator: EmulatorControl) -> None:
    set_transport(app, TO, "direct", greeting="Hello")
    call_sid = new_call_sid()
    root = answer(client, call_sid)
    assert [verb.tag for verb in root] == ["Say", "Connect"]
    connect = root.find("Connect")
    assert connect.get("action") == PUBLIC_URL + "/twilio/connect-action"
    stream = connect.find("Stream")
    (session,) = emulator.sessions()
    assert stream.get("url") == f"ws://{sip_domain(emulator)}/v1/sessions/{session['id']}/connect"
    assert stream.get("track") is None  # Twilio's <Connect><Stream> takes the inbound track only
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert list(params) == ["token", "session_id"]  # Kallglot's example, no relay token
    assert params["token"].startswith("kst_") and params["session_id"] == session["id"]
    assert session["routing"] == {"phone_number": TO}
    assert b"kst_" not in stored_values(app)  # the stream token is handed to Twilio, never kept
    with app.app_context():
        svc = services()
        assert svc.lifecycle.call_record("twilio", call_sid)["transport"] == "direct"
        # No relay will beat this leg's heartbeat: its backstop lies past any call's length.
        shard = svc.keys.shard_of(session["id"])  # a leg beats in its session's shard
        due = svc.redis.zscore(svc.keys.heartbeats(shard), f"twilio:{call_sid}")
        assert due > time.time() + CARRIER_WATCHED_LEG_SECONDS - 60


def test_twilio_sip_dials_the_sessions_sip_uri_and_asks_for_sip_routing(client: FlaskClient, app: Flask,
                                                                          emulator: EmulatorControl) -> None:
    set_transport(app, TO, "sip")
    root = answer(client, new_call_sid())
    (session,) = emulator.sessions()
    dial = root.find("Dial")
    assert [verb.tag for verb in root] == ["Dial"] and dial.get("action") == PUBLIC_URL + "/twilio/dial-action"
    assert dial.findtext("Sip") == f"sip:{session['id']}@{sip_domain(emulator)}"
    assert session["routing"] == {"type": "sip"} and session["provider"] == "sip"


def test_retried_voice_webhook_of_a_direct_call_reuses_its_session(
        client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    set_transport(app, TO, "direct")
    call_sid = new_call_sid()
    first, second = answer(client, call_sid), answer(client, call_sid)
    assert len(emulator.sessions()) == 1
    ids = {root.find("Connect/Stream/Parameter[@name='session_id']").get("value") for root in (first, second)}
    assert len(ids) == 1


def test_a_direct_answer_never_hands_the_carrier_a_token_about_to_expire(client: FlaskClient, app: Flask,
                                                                         emulator: EmulatorControl,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The 5-minute stream token is checked when the carrier connects: a create that answers with a token near its
    expiry (a replayed create, for a retried voice webhook) is followed by a ``GET`` whose fresh token is handed out."""
    set_transport(app, TO, "direct")
    with app.app_context():
        kallglot = services().kallglot
    real_create, stale_tokens = kallglot.create_session, []

    def create_answering_a_stale_token(**kwargs: object) -> KallglotSession:
        session = real_create(**kwargs)  # type: ignore[arg-type]
        assert session.stream is not None
        stale = dataclasses.replace(session.stream, expires_at=datetime.now(timezone.utc) + timedelta(seconds=10))
        stale_tokens.append(stale.token)
        return dataclasses.replace(session, stream=stale)

    monkeypatch.setattr(kallglot, "create_session", create_answering_a_stale_token)
    token = answer(client, new_call_sid()).find("Connect/Stream/Parameter[@name='token']").get("value")
    assert len(stale_tokens) == 1 and token.startswith("kst_") and token != stale_tokens[0]
    assert len(emulator.sessions()) == 1


def test_token_freshness_keeps_a_safety_margin() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    grant = StreamGrant(url="wss://x/v1/sessions/s/connect", token="kst_x", expires_at=now + timedelta(minutes=5))
    assert grant_fresh(grant, now)
    assert not grant_fresh(dataclasses.replace(grant, expires_at=now + timedelta(seconds=29)), now)
    assert grant_fresh(dataclasses.replace(grant, expires_at=None), now)  # no expiry given: trusted
    assert not grant_fresh(None, now)


@pytest.mark.parametrize(("dial_status", "hears"), [("completed", None), ("failed", "fallback"),
                                                    ("busy", "fallback"), ("no-answer", "fallback")])
def test_twilio_sip_dial_action_ends_the_session_once(client: FlaskClient, app: Flask, emulator: EmulatorControl,
                                                      dial_status: str, hears: str | None) -> None:
    set_transport(app, TO, "sip", fallback_message="Sorry, translation is down.")
    call_sid = new_call_sid()
    answer(client, call_sid)
    action = call_params(call_sid, CallStatus="in-progress", DialCallStatus=dial_status, DialCallSid=new_call_sid(),
                         DialSipResponseCode="200" if dial_status == "completed" else "503")
    response = post_signed(client, "/twilio/dial-action", action)
    assert response.status_code == 200
    root = ET.fromstring(response.data)
    if hears is None:
        assert [verb.tag for verb in root] == ["Hangup"]
    else:
        assert root.findtext("Say") == "Sorry, translation is down."  # never silence
    # Twilio's final status callback (twice) after the dial's end changes nothing more.
    for _ in range(2):
        post_signed(client, "/twilio/status", call_params(call_sid, CallStatus="completed", CallDuration="7"))
    (session,) = emulator.sessions()
    assert session["status"] == "ended" and session["end_calls"] == 1
    with app.app_context():
        call = services().lifecycle.call_record("twilio", call_sid)
    assert call["state"] == "ended" and call["end_reason"] == f"dial_{dial_status}"


def test_twilio_direct_ends_once_from_the_status_callback(client: FlaskClient, app: Flask,
                                                          emulator: EmulatorControl) -> None:
    set_transport(app, TO, "direct")
    call_sid = new_call_sid()
    answer(client, call_sid)
    for status in ("completed", "completed"):
        post_signed(client, "/twilio/status", call_params(call_sid, CallStatus=status, CallDuration="5",
                                                          SequenceNumber=str(uuid.uuid4())))
    (session,) = emulator.sessions()
    assert session["status"] == "ended" and session["end_calls"] == 1


def test_twilio_direct_stream_restored_with_a_fresh_token_then_session_over(
        client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    """``<Connect action>`` of a direct stream: restored straight to Kallglot with a new token while the session
    runs; once Kallglot has ended it, the caller is told and hung up (no dead air), and nothing ends it twice."""
    set_transport(app, TO, "direct")
    call_sid = new_call_sid()
    first = answer(client, call_sid).find("Connect/Stream/Parameter[@name='token']").get("value")
    restored = ET.fromstring(post_signed(client, "/twilio/connect-action",
                                         call_params(call_sid, CallStatus="in-progress")).data)
    token = restored.find("Connect/Stream/Parameter[@name='token']").get("value")
    assert token.startswith("kst_") and token != first
    (session,) = emulator.sessions()
    assert restored.find("Connect/Stream").get("url").endswith(f"/v1/sessions/{session['id']}/connect")
    with app.app_context():
        services().kallglot.end_session(session["id"])  # Kallglot's side ends it (as its dashboard would)
    over = ET.fromstring(post_signed(client, "/twilio/connect-action",
                                     call_params(call_sid, CallStatus="in-progress")).data)
    assert [verb.tag for verb in over] == ["Say", "Hangup"] and over.findtext("Say") == SESSION_OVER_MESSAGE
    assert emulator.session(session["id"])["end_calls"] == 1  # only the test's own end


def test_twilio_returning_direct_caller_gets_a_fresh_token_for_the_held_session(
        client: FlaskClient, app: Flask, emulator: EmulatorControl) -> None:
    set_transport(app, TO, "direct", hangup_grace_seconds=60)
    first_sid, second_sid = new_call_sid(), new_call_sid()
    first = answer(client, first_sid).find("Connect/Stream/Parameter[@name='token']").get("value")
    post_signed(client, "/twilio/status", call_params(first_sid, CallStatus="completed", CallDuration="3"))
    (session,) = emulator.sessions()
    assert session["status"] != "ended"  # held for the returning caller
    again = answer(client, second_sid).find("Connect/Stream")
    params = {p.get("name"): p.get("value") for p in again.findall("Parameter")}
    assert params["session_id"] == session["id"] and params["token"] != first
    assert len(emulator.sessions()) == 1


# ----- Telnyx TeXML --------------------------------------------------------------------------------------------------
@pytest.fixture
def telnyx_client(telnyx_app: Flask) -> FlaskClient:
    return telnyx_app.test_client()


def texml_body(call_id: str, **extra: str) -> str:
    return urlencode({**TexmlCallSimulator.call_params(call_id, TELNYX_TO, TELNYX_FROM, "ringing"), **extra})


def test_texml_direct_streams_to_kallglot_with_its_parameters(telnyx_client: FlaskClient, telnyx_app: Flask,
                                                               telnyx_signer: TelnyxSigner,
                                                               emulator: EmulatorControl) -> None:
    set_transport(telnyx_app, TELNYX_TO, "direct", carrier="telnyx")
    call_id = new_call_control_id()
    root = ET.fromstring(post(telnyx_client, "/telnyx/texml", texml_body(call_id), telnyx_signer).data)
    (session,) = emulator.sessions()
    stream = root.find("Connect/Stream")
    assert stream.get("url") == f"ws://{sip_domain(emulator)}/v1/sessions/{session['id']}/connect"
    assert (stream.get("bidirectionalMode"), stream.get("codec"), stream.get("track")) == \
        ("rtp", "PCMU", "inbound_track")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert list(params) == ["token", "session_id"] and params["token"].startswith("kst_")
    # A stream that ends with the caller still on goes to the restore, as on the relay: never silence
    assert [verb.tag for verb in root][-1] == "Redirect" and root[-1].text == PUBLIC_URL + "/telnyx/texml/stream-ended"


def test_texml_direct_stream_restored_with_a_fresh_token_then_session_over(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl) -> None:
    """The ``<Redirect>`` after a direct stream: restored straight to Kallglot with a new token while the session runs
    (a dropped stream does not end the call); once Kallglot has ended it, the caller is told and hung up, and nothing
    ends it twice."""
    set_transport(telnyx_app, TELNYX_TO, "direct", carrier="telnyx")
    call_id = new_call_control_id()
    root = ET.fromstring(post(telnyx_client, "/telnyx/texml", texml_body(call_id), telnyx_signer).data)
    first = root.find("Connect/Stream/Parameter[@name='token']").get("value")
    still_on = texml_body(call_id, CallStatus="in-progress")
    restored = ET.fromstring(post(telnyx_client, "/telnyx/texml/stream-ended", still_on, telnyx_signer).data)
    (session,) = emulator.sessions()
    stream = restored.find("Connect/Stream")
    assert stream.get("url").endswith(f"/v1/sessions/{session['id']}/connect")  # Kallglot's, not the relay's
    token = stream.find("Parameter[@name='token']").get("value")
    assert token.startswith("kst_") and token != first and restored[-1].tag == "Redirect"
    assert emulator.session(session["id"])["status"] != "ended"
    with telnyx_app.app_context():
        services().kallglot.end_session(session["id"])  # Kallglot's side ends it (as its dashboard would)
    over = ET.fromstring(post(telnyx_client, "/telnyx/texml/stream-ended", still_on, telnyx_signer).data)
    assert [verb.tag for verb in over] == ["Say", "Hangup"] and over.findtext("Say") == SESSION_OVER_MESSAGE
    completed = texml_body(call_id, CallStatus="completed", HangupCause="normal_clearing")
    assert post(telnyx_client, "/telnyx/texml/status", completed, telnyx_signer).status_code == 200
    assert emulator.session(session["id"])["end_calls"] == 1  # only the test's own end


@pytest.mark.parametrize(("dial_status", "ends_with"), [("completed", "Hangup"), ("failed", "Hangup")])
def test_texml_sip_dials_and_its_dial_action_ends_the_session_once(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        dial_status: str, ends_with: str) -> None:
    set_transport(telnyx_app, TELNYX_TO, "sip", carrier="telnyx")
    call_id = new_call_control_id()
    root = ET.fromstring(post(telnyx_client, "/telnyx/texml", texml_body(call_id), telnyx_signer).data)
    (session,) = emulator.sessions()
    assert session["routing"] == {"type": "sip"}
    dial = root.find("Dial")
    assert dial.get("action") == PUBLIC_URL + "/telnyx/texml/dial-action"
    assert dial.findtext("Sip") == f"sip:{session['id']}@{sip_domain(emulator)}"
    action = texml_body(call_id, CallStatus="in-progress", DialCallStatus=dial_status)
    answered = ET.fromstring(post(telnyx_client, "/telnyx/texml/dial-action", action, telnyx_signer).data)
    if dial_status == "completed":
        assert [verb.tag for verb in answered] == ["Hangup"]
    else:  # Kallglot never took it: the fallback, not silence
        assert [verb.tag for verb in answered] == ["Say", "Hangup"] and answered[0].text == UNAVAILABLE_MESSAGE
    completed = texml_body(call_id, CallStatus="completed", HangupCause="normal_clearing")
    assert post(telnyx_client, "/telnyx/texml/status", completed, telnyx_signer).status_code == 200
    assert emulator.session(session["id"])["status"] == "ended"
    assert emulator.session(session["id"])["end_calls"] == 1


def on_session(root: ET.Element, session_id: str) -> bool:
    """Whether a TeXML answer puts the call on ``session_id`` (a relay or direct stream's parameter, or the SIP URI)."""
    values = [p.get("value") for p in root.iter("Parameter")] + [sip.text for sip in root.iter("Sip")]
    return any(value and session_id in value for value in values)


@pytest.mark.parametrize("transport", ["relay", "direct", "sip"])
def test_texml_returning_caller_rejoins_the_held_session_without_a_second_greeting(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        transport: str) -> None:
    set_transport(telnyx_app, TELNYX_TO, transport, carrier="telnyx", greeting="Welcome", hangup_grace_seconds=60)
    call_id = new_call_control_id()
    first = ET.fromstring(post(telnyx_client, "/telnyx/texml", texml_body(call_id), telnyx_signer).data)
    assert first[0].tag == "Say" and first[0].text == "Welcome"
    completed = texml_body(call_id, CallStatus="completed", HangupCause="normal_clearing")
    assert post(telnyx_client, "/telnyx/texml/status", completed, telnyx_signer).status_code == 200
    (session,) = emulator.sessions()
    assert session["status"] != "ended"  # held for the returning caller (hang-up grace)
    again = ET.fromstring(post(telnyx_client, "/telnyx/texml", texml_body(new_call_control_id()),
                               telnyx_signer).data)
    assert len(emulator.sessions()) == 1 and on_session(first, session["id"])
    assert on_session(again, session["id"])  # re-attached to the held session
    assert "Welcome" not in [say.text for say in again.iter("Say")]  # and not greeted twice


# ----- Telnyx Call Control -------------------------------------------------------------------------------------------
def initiated_and_answered(client: FlaskClient, signer: TelnyxSigner, fake: FakeCallControl, call_id: str) -> dict:
    cc(client, signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    (answer_command,) = fake.commands("answer")
    state = answer_command["body"]["client_state"]
    cc(client, signer, event("call.answered", call_id, state="answered", client_state=state))
    return decode_client_state(state)


def test_call_control_direct_starts_streaming_to_kallglot_with_the_token(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    set_transport(telnyx_app, TELNYX_TO, "direct", carrier="telnyx")
    call_id = new_call_control_id()
    initiated_and_answered(telnyx_client, telnyx_signer, fake_call_control, call_id)
    (session,) = emulator.sessions()
    (start,) = fake_call_control.commands("streaming_start")
    sent = start["body"]
    assert sent["stream_url"] == f"ws://{sip_domain(emulator)}/v1/sessions/{session['id']}/connect"
    parameters = {p["name"]: p["value"] for p in sent["custom_parameters"]}
    assert list(parameters) == ["token", "session_id"] and parameters["session_id"] == session["id"]
    assert sent["stream_auth_token"] == parameters["token"] and parameters["token"].startswith("kst_")
    assert (sent["stream_codec"], sent["stream_bidirectional_mode"]) == ("PCMU", "rtp")
    assert b"kst_" not in stored_values(telnyx_app)


def test_call_control_sip_transfers_to_the_sip_uri_and_a_refused_transfer_is_not_silence(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    set_transport(telnyx_app, TELNYX_TO, "sip", carrier="telnyx")
    call_id = new_call_control_id()
    initiated_and_answered(telnyx_client, telnyx_signer, fake_call_control, call_id)
    (session,) = emulator.sessions()
    assert session["routing"] == {"type": "sip"}
    (transfer,) = fake_call_control.commands("transfer")
    assert transfer["body"]["to"] == f"sip:{session['id']}@{sip_domain(emulator)}"
    assert decode_client_state(transfer["body"]["target_leg_client_state"]) == {SIP_FOR_KEY: call_id}
    # The SIP leg hangs up unanswered (Kallglot refused): the caller hears the fallback, the session ends once.
    refused = event("call.hangup", new_call_control_id(), hangup_cause="call_rejected", hangup_source="callee",
                    client_state=encode_client_state({SIP_FOR_KEY: call_id}))
    assert cc(telnyx_client, telnyx_signer, refused).json == {"status": "ok"}
    assert [c["call_control_id"] for c in fake_call_control.commands("speak")] == [call_id]
    cc(telnyx_client, telnyx_signer, event("call.hangup", call_id, hangup_cause="normal_clearing"))
    assert emulator.session(session["id"])["status"] == "ended"
    assert emulator.session(session["id"])["end_calls"] == 1


@pytest.mark.parametrize("transport", ["relay", "direct", "sip"])
def test_call_control_returning_caller_rejoins_the_held_session_without_a_second_greeting(
        telnyx_client: FlaskClient, telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl, transport: str) -> None:
    set_transport(telnyx_app, TELNYX_TO, transport, carrier="telnyx", greeting="Welcome", hangup_grace_seconds=60)
    first_call, second_call = new_call_control_id(), new_call_control_id()
    cc(telnyx_client, telnyx_signer, event("call.initiated", first_call, direction="incoming", state="parked"))
    cc(telnyx_client, telnyx_signer, event("call.hangup", first_call, hangup_cause="normal_clearing"))
    (session,) = emulator.sessions()
    assert session["status"] != "ended"  # held for the returning caller (hang-up grace)
    cc(telnyx_client, telnyx_signer, event("call.initiated", second_call, direction="incoming", state="parked"))
    first, again = (decode_client_state(c["body"]["client_state"]) for c in fake_call_control.commands("answer"))
    assert first[GREETING_KEY] == "1" and first["s"] == session["id"]
    assert again["s"] == session["id"] and GREETING_KEY not in again  # re-attached, and not greeted twice
    assert len(emulator.sessions()) == 1


@pytest.mark.parametrize("transport", ["direct", "sip"])
def test_kallglot_ending_a_direct_or_sip_session_hangs_up_the_call_and_nobody_ends_it_again(
        redis_url: str, emulator: EmulatorControl, namespace: str, telnyx_signer: TelnyxSigner,
        fake_call_control: FakeCallControl, transport: str) -> None:
    """Kallglot's ``session.ended`` webhook is the one end the bridge hears about a call whose audio it never carries
    (Kallglot ended it: its dashboard, its 30-minute idle rule): the caller is hung up, and neither that nor the
    carrier's ``call.hangup`` that follows makes the bridge call ``end``."""
    from app import create_app
    from app.kallglot.signature import sign
    from tests.support.settings import bridge_config, telnyx_config

    secret = "whsec_transports"
    app = create_app({**telnyx_config(bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                                      telnyx_signer.public_key, fake_call_control.api_url),
                      "KALLGLOT_WEBHOOK_SECRET": secret})
    client = app.test_client()
    set_transport(app, TELNYX_TO, transport, carrier="telnyx")
    call_id = new_call_control_id()
    initiated_and_answered(client, telnyx_signer, fake_call_control, call_id)
    (session,) = emulator.sessions()
    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "session.ended", "api_version": "v1",
                       "created_at": "2026-11-29T10:00:00Z",
                       "data": {"id": session["id"], "object": "session", "status": "ended", "duration": 4.2}}).encode()
    response = client.post("/kallglot/webhooks", data=body, content_type="application/json",
                           headers={"Kallglot-Signature": sign(secret, body, int(time.time()))})
    assert response.status_code == 200, response.data
    assert [c["call_control_id"] for c in fake_call_control.commands("hangup")] == [call_id]
    cc(client, telnyx_signer, event("call.hangup", call_id, hangup_cause="normal_clearing"))
    with app.app_context():
        assert services().lifecycle.call_record("telnyx", call_id)["state"] == "ended"
    assert emulator.session(session["id"])["end_calls"] == 0  # Kallglot ended it; the bridge did not end it again


# ----- admin form and CLI --------------------------------------------------------------------------------------------
def admin_profile_form(**overrides: object) -> dict[str, object]:
    return {"number": TO, "carrier": "twilio", "transport": "relay", "mode": "bidirectional_translation",
            "source_language": "en", "target_language": "es", "greeting_language": "en-US",
            "fallback_language": "en-US", "hangup_grace_seconds": "0", **overrides}


def test_admin_switches_a_number_between_transports_and_refuses_an_agent_leg_on_direct(
        admin_client: FlaskClient, admin_app: Flask) -> None:
    from tests.support.admin import admin_post

    form = admin_client.get("/admin/numbers/new").get_data(as_text=True)
    assert 'name="transport"' in form and "no bridge CPU per call" in form  # each choice's trade-off is shown
    refused = admin_post(admin_client, "/admin/numbers/new",
                         admin_profile_form(transport="direct", agent_number="+14155550110"))
    assert refused.status_code == 422
    assert "an agent leg needs the relay" in refused.get_data(as_text=True)
    for transport in ("sip", "direct", "relay"):
        path = "/admin/numbers/new" if transport == "sip" else f"/admin/numbers/{TO}"
        assert admin_post(admin_client, path, admin_profile_form(transport=transport)).status_code == 302
        with admin_app.app_context():
            assert services().profiles.for_number(TO).transport == transport
        if transport == "sip":
            assert "<td>sip</td>" in admin_client.get("/admin/numbers").get_data(as_text=True)


def test_cli_sets_the_transport_and_refuses_a_broken_combination(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["numbers", "set", TO, "--transport", "sip"])
    assert result.exit_code == 0 and "transport=sip" in result.output, result.output
    assert "transport=sip" in runner.invoke(args=["numbers", "show", TO]).output
    assert "direct:" in runner.invoke(args=["numbers", "set", "--help"]).output
    with app.app_context():
        services().profiles.set(TO, NumberProfile(agent_number="+14155550110"))
    refused = runner.invoke(args=["numbers", "set", TO, "--transport", "direct"])
    assert refused.exit_code != 0 and "an agent leg needs the relay" in refused.output
    with app.app_context():
        assert services().profiles.for_number(TO).transport == "relay"
    bad = runner.invoke(args=["numbers", "set", TO, "--transport", "pigeon"])
    assert bad.exit_code != 0 and "relay" in bad.output


def test_calls_the_bridge_places_stream_through_the_relay_whatever_the_numbers_transport(
        redis_url: str, emulator: EmulatorControl, namespace: str) -> None:
    """``POST /api/calls`` from a ``direct`` number: the dialled leg is a relay leg (its relay beats its heartbeat),
    so a transport meant for the number's inbound calls never strands an outbound one without a heartbeat."""
    from app import create_app
    from app.devtools.localstack import run_gunicorn
    from tests.support.settings import TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config

    fake_env = {"TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
                "FAKE_TWILIO_BRIDGE_URL": "http://127.0.0.1:9", "FAKE_TWILIO_MAX_CALL_SECONDS": "1"}
    with run_gunicorn("app.devtools.simulator.twilio_rest:create_fake_twilio_rest()", fake_env) as fake_twilio:
        app = create_app({**bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                          "API_TOKEN": "api-token", "TWILIO_API_URL": fake_twilio.url})
        set_transport(app, "+15005550006", "direct")
        response = app.test_client().post("/api/calls", json={"to": "+14155550100", "from": "+15005550006"},
                                          headers={"Authorization": "Bearer api-token"})
    assert response.status_code in (200, 201), response.json
    with app.app_context():
        call = services().lifecycle.call_record("twilio", response.json["call_id"])
    assert call["transport"] == "relay" and call["session_id"] == response.json["session_id"]
