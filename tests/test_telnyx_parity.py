"""Telnyx as Twilio, in-process (Flask test client → the fake Call Control API, which checks every command body
against the telnyx SDK's types): the profile's fallback and greeting, Redis down, restoring a lost stream."""
from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app.carriers.telnyx.control import decode_client_state, encode_client_state
from app.carriers.telnyx.streams import MAX_STREAM_RESTARTS
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.extensions import services
from app.factory import create_app
from app.profiles import NumberProfile
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.settings import PUBLIC_URL, bridge_config, telnyx_config

TO, FROM = "+15005550006", "+15551230000"
SPANISH = NumberProfile(fallback_message="Lo sentimos, no hay traducción ahora.", fallback_language="es-ES",
                        fallback_number="+14155550199", greeting="Hola, un momento.", greeting_language="es-ES")


@pytest.fixture
def client(telnyx_app: Flask) -> FlaskClient:
    return telnyx_app.test_client()


def event(event_type: str, call_id: str, **payload: Any) -> str:
    return json.dumps({"data": {"record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()),
                                "occurred_at": "2026-01-01T00:00:00.000000Z",
                                "payload": {"call_control_id": call_id, "from": FROM, "to": TO, **payload}},
                       "meta": {"attempt": 1}})


def cc(client: FlaskClient, signer: TelnyxSigner, body: str) -> Any:
    return client.post("/telnyx/call-control", data=body.encode(), content_type="application/json",
                       headers=signer.headers(body))


def refused(fake: FakeCallControl) -> list[dict[str, Any]]:
    return requests.get(fake.url + "/_fake/commands", timeout=5).json()["refused"]


def last(fake: FakeCallControl, action: str) -> dict[str, Any]:
    return fake.commands(action)[-1]["body"]


def test_kallglot_down_speaks_the_profiles_message_in_its_language_then_transfers(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    with telnyx_app.app_context():
        services().profiles.set(TO, SPANISH)
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    state = last(fake_call_control, "answer")["client_state"]
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered", client_state=state))
    speak = last(fake_call_control, "speak")
    assert (speak["payload"], speak["language"]) == (SPANISH.fallback_message, "es-ES")
    cc(client, telnyx_signer, event("call.speak.ended", call_id, status="completed",
                                    client_state=speak["client_state"]))
    assert [c["action"] for c in fake_call_control.commands()] == ["answer", "speak", "transfer"]
    assert last(fake_call_control, "transfer")["to"] == SPANISH.fallback_number
    assert refused(fake_call_control) == []


def test_greeting_is_spoken_before_streaming_starts(telnyx_app: Flask, client: FlaskClient,
                                                    telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
                                                    fake_call_control: FakeCallControl) -> None:
    with telnyx_app.app_context():
        services().profiles.set(TO, SPANISH)
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    state = last(fake_call_control, "answer")["client_state"]
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered", client_state=state))
    speak = last(fake_call_control, "speak")
    assert (speak["payload"], speak["language"]) == (SPANISH.greeting, "es-ES")
    assert fake_call_control.commands("streaming_start") == []  # not before the greeting ends
    cc(client, telnyx_signer, event("call.speak.ended", call_id, status="completed",
                                    client_state=speak["client_state"]))
    (start,) = fake_call_control.commands("streaming_start")
    assert decode_client_state(start["body"]["client_state"])["s"] == emulator.sessions()[0]["id"]


def test_streaming_lost_on_a_live_call_is_restored_three_times_then_the_fallback(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    state = last(fake_call_control, "answer")["client_state"]
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered", client_state=state))
    for _ in range(MAX_STREAM_RESTARTS):  # the relay's worker died: no end recorded, the newest stream stopped
        newest = last(fake_call_control, "streaming_start")["client_state"]
        cc(client, telnyx_signer, event("streaming.stopped", call_id, client_state=newest, stream_url="wss://x"))
    assert len(fake_call_control.commands("streaming_start")) == 1 + MAX_STREAM_RESTARTS
    assert [decode_client_state(c["body"]["client_state"])["sg"] for c in fake_call_control.commands(
        "streaming_start")] == [str(n) for n in range(1 + MAX_STREAM_RESTARTS)]
    assert fake_call_control.commands("speak") == []
    newest = last(fake_call_control, "streaming_start")["client_state"]
    cc(client, telnyx_signer, event("streaming.failed", call_id, client_state=newest, failure_reason="gone"))
    assert len(fake_call_control.commands("streaming_start")) == 1 + MAX_STREAM_RESTARTS
    assert "not available" in last(fake_call_control, "speak")["payload"]
    assert len(emulator.sessions()) == 1 and refused(fake_call_control) == []


def stream_lost(client: FlaskClient, signer: TelnyxSigner, call_id: str, client_state: str, kind: str) -> Any:
    """Telnyx reports a stream lost (``streaming.stopped`` or ``.failed``) with the client_state it started with."""
    fields = {"stream_url": "wss://x"} if kind == "streaming.stopped" else {"failure_reason": "gone"}
    return cc(client, signer, event(kind, call_id, client_state=client_state, **fields))


def restore_state(telnyx_app: Flask, call_id: str) -> tuple[str, str, str]:
    """The leg's state, restores counted and stream generation, as Redis holds them."""
    with telnyx_app.app_context():
        svc = services()
        call = svc.lifecycle.call_record("telnyx", call_id)
        generation = svc.redis.get(svc.keys.stream_generation(call["session_id"], "telnyx", call_id))
    return call["state"], call.get("stream_restarts", "0"), (generation or b"0").decode()


@pytest.mark.parametrize("kind", ["streaming.stopped", "streaming.failed"])
def test_a_replaced_streams_late_loss_changes_nothing(telnyx_app: Flask, client: FlaskClient,
                                                      telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
                                                      fake_call_control: FakeCallControl, kind: str) -> None:
    """Under load, the stop of a stream already restored arrived late and was taken for a new loss: a second
    ``start_streaming``, whose stream was refused ("another relay is live"), and a restore counted twice. Each
    stream's generation travels in its client_state; only the newest one's loss restores."""
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered",
                                    client_state=last(fake_call_control, "answer")["client_state"]))
    first = last(fake_call_control, "streaming_start")["client_state"]
    stream_lost(client, telnyx_signer, call_id, first, "streaming.stopped")  # the relay's worker died
    assert len(fake_call_control.commands("streaming_start")) == 2
    assert restore_state(telnyx_app, call_id) == ("live", "1", "1")
    assert stream_lost(client, telnyx_signer, call_id, first, kind).status_code == 200  # the old stream, late
    assert len(fake_call_control.commands("streaming_start")) == 2 and fake_call_control.commands("speak") == []
    assert restore_state(telnyx_app, call_id) == ("live", "1", "1")
    # The restored stream's own loss still restores.
    stream_lost(client, telnyx_signer, call_id, last(fake_call_control, "streaming_start")["client_state"], kind)
    assert len(fake_call_control.commands("streaming_start")) == 3
    assert restore_state(telnyx_app, call_id) == ("live", "2", "2") and refused(fake_call_control) == []


def test_a_loss_echoing_another_commands_client_state_is_the_newest_streams(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    """A stop carrying a later command's client_state (the agent-unavailable notice spoken on the streaming leg)
    names no generation: it is the newest stream's loss, restored — never taken for a stale one (dead air)."""
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered",
                                    client_state=last(fake_call_control, "answer")["client_state"]))
    stream_lost(client, telnyx_signer, call_id, last(fake_call_control, "streaming_start")["client_state"],
                "streaming.stopped")
    spoken = encode_client_state({"bye": "agent_unavailable", "to": TO})
    stream_lost(client, telnyx_signer, call_id, spoken, "streaming.stopped")
    assert len(fake_call_control.commands("streaming_start")) == 3
    assert restore_state(telnyx_app, call_id) == ("live", "2", "2")


def test_a_restore_frees_the_killed_relays_lease_and_a_stale_stop_keeps_the_live_ones(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    """Chaos (Call Control, a worker killed): the restored stream was refused "another relay is live" — the dead
    relay's lease outlives it — and only a second restore, 3 s later, got through (the caller heard nothing).
    The loss of the newest stream frees the lease, as Twilio's and TeXML's restores do; a stale stop must not
    free the lease of the relay serving the newer stream."""
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered",
                                    client_state=last(fake_call_control, "answer")["client_state"]))
    first = last(fake_call_control, "streaming_start")["client_state"]
    with telnyx_app.app_context():
        svc = services()
        lease = svc.keys.relay_lease("telnyx", call_id)
        svc.redis.set(lease, "nonce-of-the-killed-relay", ex=30)
    stream_lost(client, telnyx_signer, call_id, first, "streaming.stopped")
    assert len(fake_call_control.commands("streaming_start")) == 2
    with telnyx_app.app_context():
        assert svc.redis.get(lease) is None
        svc.redis.set(lease, "nonce-of-the-restored-relay", ex=30)
    stream_lost(client, telnyx_signer, call_id, first, "streaming.failed")  # the killed stream's, late
    with telnyx_app.app_context():
        assert svc.redis.get(lease) == b"nonce-of-the-restored-relay"


def test_two_reports_of_one_loss_at_once_restore_it_once(telnyx_app: Flask, client: FlaskClient,
                                                         telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
                                                         fake_call_control: FakeCallControl) -> None:
    """``streaming.failed`` and ``streaming.stopped`` of the same stream handled by two workers at once: both
    wait for the relay to settle, then exactly one claims the loss."""
    from concurrent.futures import ThreadPoolExecutor

    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    cc(client, telnyx_signer, event("call.answered", call_id, state="answered",
                                    client_state=last(fake_call_control, "answer")["client_state"]))
    first = last(fake_call_control, "streaming_start")["client_state"]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda kind: stream_lost(telnyx_app.test_client(), telnyx_signer, call_id, first,
                                                         kind), ["streaming.stopped", "streaming.failed"]))
    assert [a.status_code for a in answers] == [200, 200]
    assert len(fake_call_control.commands("streaming_start")) == 2
    assert restore_state(telnyx_app, call_id) == ("live", "1", "1")


def test_stream_stopped_by_the_callers_hang_up_is_not_restored(telnyx_app: Flask, client: FlaskClient,
                                                                telnyx_signer: TelnyxSigner,
                                                                emulator: EmulatorControl,
                                                                fake_call_control: FakeCallControl) -> None:
    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    with telnyx_app.app_context():
        services().lifecycle.leg_ended("telnyx", call_id, "relay_carrier_stop")
    cc(client, telnyx_signer, event("streaming.stopped", call_id, stream_url="wss://x"))
    assert fake_call_control.commands("streaming_start") == [] and fake_call_control.commands("speak") == []


@pytest.fixture
def app_without_redis(emulator: EmulatorControl, telnyx_signer: TelnyxSigner,
                      fake_call_control: FakeCallControl) -> Flask:
    from tests.support.servers import free_port

    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = create_app(telnyx_config(bridge_config(dead_redis, emulator.api_url, "no-redis", PUBLIC_URL),
                                   telnyx_signer.public_key, fake_call_control.api_url))
    app.testing = True
    return app


def test_call_control_with_redis_down_answers_and_speaks_instead_of_503(
        app_without_redis: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    client = app_without_redis.test_client()
    call_id = new_call_control_id()
    first = cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    assert first.status_code == 200  # a 503 leaves the caller ringing until Telnyx gives up
    state = last(fake_call_control, "answer")["client_state"]
    assert cc(client, telnyx_signer, event("call.answered", call_id, state="answered",
                                           client_state=state)).status_code == 200
    speak = last(fake_call_control, "speak")
    assert "not available" in speak["payload"]
    assert cc(client, telnyx_signer, event("call.speak.ended", call_id, status="completed",
                                           client_state=speak["client_state"])).status_code == 200
    assert [c["action"] for c in fake_call_control.commands()] == ["answer", "speak", "hangup"]
    assert emulator.sessions() == [] or all(s["status"] == "ended" for s in emulator.sessions())


def test_texml_kallglot_down_says_the_profiles_message_and_dials_its_fallback(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl) -> None:
    with telnyx_app.app_context():
        services().profiles.set(TO, SPANISH)
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    body = urlencode(TexmlCallSimulator.call_params(new_call_control_id(), TO, FROM, "ringing"))
    root = ET.fromstring(client.post("/telnyx/texml", data=body.encode(), headers=telnyx_signer.headers(body),
                                     content_type="application/x-www-form-urlencoded").data)
    assert [child.tag for child in root] == ["Say", "Dial"]
    assert (root[0].text, root[0].get("language"), root[1].text) == \
        (SPANISH.fallback_message, "es-ES", SPANISH.fallback_number)


def test_texml_greeting_comes_before_the_stream(telnyx_app: Flask, client: FlaskClient,
                                                telnyx_signer: TelnyxSigner, emulator: EmulatorControl) -> None:
    with telnyx_app.app_context():
        services().profiles.set(TO, SPANISH)
    body = urlencode(TexmlCallSimulator.call_params(new_call_control_id(), TO, FROM, "ringing"))
    root = ET.fromstring(client.post("/telnyx/texml", data=body.encode(), headers=telnyx_signer.headers(body),
                                     content_type="application/x-www-form-urlencoded").data)
    assert [child.tag for child in root][:2] == ["Say", "Connect"]
    assert (root[0].text, root[0].get("language")) == (SPANISH.greeting, "es-ES")


def test_client_state_round_trips() -> None:
    assert decode_client_state(encode_client_state({"s": "x", "p": "agent"})) == {"s": "x", "p": "agent"}


def start_customer_with_agent(telnyx_app: Flask, client: FlaskClient, signer: TelnyxSigner,
                              fake: FakeCallControl, profile: NumberProfile) -> tuple[str, str, str]:
    """A customer call streaming into its session, plus an agent leg dialled into it (as agent.py does)."""
    from app.calls.leg_spec import LegSpec

    with telnyx_app.app_context():
        services().profiles.set(TO, profile)
    customer = new_call_control_id()
    cc(client, signer, event("call.initiated", customer, direction="incoming", state="parked"))
    state = last(fake, "answer")["client_state"]
    cc(client, signer, event("call.answered", customer, state="answered", client_state=state))
    session_id = decode_client_state(state)["s"]
    agent = new_call_control_id()
    with telnyx_app.app_context():
        lifecycle = services().lifecycle
        record = lifecycle.session_record(session_id)
        assert lifecycle.register_leg(LegSpec.joining(record, carrier="telnyx", call_id=agent, speaker="agent",
                                                      from_number=TO, to_number=profile.agent_number),
                                      session_id=session_id)
    return customer, agent, session_id


@pytest.mark.parametrize("cause", ["no_answer", "user_busy", "call_rejected", "timeout"])
def test_agent_who_never_answers_leaves_the_customer_on_and_told(telnyx_app: Flask, client: FlaskClient,
                                                                 telnyx_signer: TelnyxSigner,
                                                                 emulator: EmulatorControl,
                                                                 fake_call_control: FakeCallControl,
                                                                 cause: str) -> None:
    """Item 10: the agent's failure does not hang up the customer; the customer hears why; the session goes on."""
    customer, agent, session_id = start_customer_with_agent(
        telnyx_app, client, telnyx_signer, fake_call_control, NumberProfile(agent_number="+14155557770"))
    cc(client, telnyx_signer, event("call.hangup", agent, hangup_cause=cause, hangup_source="callee"))
    assert fake_call_control.commands("hangup") == []  # nobody hung up the customer
    (speak,) = [c for c in fake_call_control.commands("speak") if c["call_control_id"] == customer]
    assert "agent is not available" in speak["body"]["payload"]
    cc(client, telnyx_signer, event("call.speak.ended", customer, status="completed",
                                    client_state=speak["body"]["client_state"]))
    assert fake_call_control.commands("hangup") == [] and fake_call_control.commands("transfer") == []
    with telnyx_app.app_context():
        assert services().lifecycle.call_record("telnyx", customer)["state"] == "live"
    assert emulator.session(session_id)["status"] != "ended"


def test_agent_unavailable_forwards_to_the_fallback_number(telnyx_app: Flask, client: FlaskClient,
                                                           telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
                                                           fake_call_control: FakeCallControl) -> None:
    customer, agent, _ = start_customer_with_agent(
        telnyx_app, client, telnyx_signer, fake_call_control,
        NumberProfile(agent_number="+14155557770", fallback_number="+14155550199"))
    cc(client, telnyx_signer, event("call.hangup", agent, hangup_cause="user_busy"))
    speak = last(fake_call_control, "speak")
    cc(client, telnyx_signer, event("call.speak.ended", customer, status="completed",
                                    client_state=speak["client_state"]))
    transfer = fake_call_control.commands("transfer")
    assert [(t["call_control_id"], t["body"]["to"]) for t in transfer] == [(customer, "+14155550199")]


@pytest.mark.parametrize("ends_call", [True, False])
def test_agent_hangup_ends_call_both_ways(telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner,
                                          emulator: EmulatorControl, fake_call_control: FakeCallControl,
                                          ends_call: bool) -> None:
    """An agent who answered and then hung up ends the customer's call only if the profile says so."""
    customer, agent, _ = start_customer_with_agent(
        telnyx_app, client, telnyx_signer, fake_call_control,
        NumberProfile(agent_number="+14155557770", agent_hangup_ends_call=ends_call))
    cc(client, telnyx_signer, event("call.answered", agent, state="answered"))
    cc(client, telnyx_signer, event("call.hangup", agent, hangup_cause="normal_clearing", hangup_source="callee"))
    hung_up = [c["call_control_id"] for c in fake_call_control.commands("hangup")]
    assert hung_up == ([customer] if ends_call else [])
    assert [c for c in fake_call_control.commands("speak") if c["call_control_id"] == customer] == []


def test_an_event_whose_worker_died_mid_handler_is_handled_when_telnyx_redelivers_it(
        telnyx_app: Flask, client: FlaskClient, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl) -> None:
    """Chaos (1000 calls, a worker killed mid-``call.answered``): the event was marked seen before its handler
    ran, so Telnyx's redelivery was dropped as a duplicate and the caller sat in silence. Now the mark is a
    short "being handled" lease: a redelivery meanwhile gets 503 (Telnyx tries again), one after the lease is
    handled, and only a handled event is a duplicate."""
    from app.carriers.telnyx.call_control import HANDLED, HANDLING

    call_id = new_call_control_id()
    cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming", state="parked"))
    state = last(fake_call_control, "answer")["client_state"]
    answered = event("call.answered", call_id, state="answered", client_state=state)
    with telnyx_app.app_context():
        svc = services()
        seen = svc.keys.seen("telnyx", json.loads(answered)["data"]["id"])
        svc.redis.set(seen, HANDLING, ex=20)  # a worker took it, then was killed before it streamed
    first = cc(client, telnyx_signer, answered)
    assert first.status_code == 503 and fake_call_control.commands("streaming_start") == []
    with telnyx_app.app_context():
        services().redis.delete(seen)  # the lease lapsed
    again = cc(client, telnyx_signer, answered)
    assert again.status_code == 200 and len(fake_call_control.commands("streaming_start")) == 1
    with telnyx_app.app_context():
        assert services().redis.get(seen) == HANDLED.encode()
    duplicate = cc(client, telnyx_signer, answered)
    assert (duplicate.status_code, duplicate.json["status"]) == (200, "duplicate")
    assert len(fake_call_control.commands("streaming_start")) == 1
