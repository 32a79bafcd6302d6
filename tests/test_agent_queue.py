"""Browser agents without a browser: the waiting list in real Redis (first take wins, against other agents and
against the wait running out), the agent page's routes, the ``/agent/media`` frame codec, the participants a
session with an agent declares, and what happens when no browser agent takes a call in time."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis as redis_lib
from flask import Flask

from app.agents.codec import BrowserAgentCodec
from app.calls.agent import dial_agent_if_configured, expire_agent_waits
from app.calls.agent_queue import BROWSER_LEG, AgentQueue
from app.calls.events import LEG, SessionEventLog
from app.calls.leg_spec import LegSpec
from app.carriers.contract import Ignored, Malformed, MarkPlayed, Media, Stopped, StreamStarted
from app.extensions import services
from app.profiles import NumberProfile
from app.redis_keys import RedisKeys
from app import create_app
from tests.support.admin import admin_sign_in, csrf_token_in
from tests.support.settings import PUBLIC_URL, TELNYX_CONNECTION_ID, bridge_config, telnyx_config
from tests.support.agent_offers import offer_a_call
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.twilio_requests import FROM, TO, answer, new_call_sid


def queue_for(client: redis_lib.Redis, namespace: str) -> AgentQueue:
    return AgentQueue(client, RedisKeys(namespace))


def offer(queue: AgentQueue, session_id: str, wait_seconds: int = 60) -> float:
    return queue.offer(session_id, carrier="twilio", call_id="CA1", to_number=TO, from_number=FROM,
                       source_language="en", target_language="es", wait_seconds=wait_seconds)


# -- the waiting list ---------------------------------------------------------------------------------------------

def test_of_many_agents_taking_at_once_exactly_one_gets_the_call(redis_client: redis_lib.Redis,
                                                                  namespace: str) -> None:
    queue = queue_for(redis_client, namespace)
    offer(queue, "sess_race")
    start, wins = threading.Barrier(12), []

    def take(n: int) -> None:
        start.wait()
        if queue_for(redis_client, namespace).take("sess_race", agent=f"agent {n}", owner=f"o{n}",
                                                    leg_id=f"agt_{n:016x}"):
            wins.append(n)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(wins) == 1
    record = queue.offer_record("sess_race")
    assert record["state"] == "taken" and record["agent"] == f"agent {wins[0]}" and record["leg"] == f"agt_{wins[0]:016x}"
    assert queue.waiting() == [] and not queue.take("sess_race", agent="late", owner="x", leg_id="agt_" + "f" * 16)


def test_a_taken_call_never_also_expires_and_an_expired_one_cannot_be_taken(redis_client: redis_lib.Redis,
                                                                             namespace: str) -> None:
    queue, expired = queue_for(redis_client, namespace), []
    offer(queue, "sess_taken", wait_seconds=0)
    offer(queue, "sess_expired", wait_seconds=0)
    assert queue.take("sess_taken", agent="Ana", owner="o", leg_id="agt_" + "0" * 16)
    assert queue.expire_due(lambda sid, record: expired.append((sid, record["state"]))) == 1
    assert expired == [("sess_expired", "expired")]
    assert not queue.take("sess_expired", agent="Ana", owner="o", leg_id="agt_" + "1" * 16)
    assert queue.offer_record("sess_taken")["state"] == "taken"
    assert queue.expire_due(lambda sid, record: expired.append(sid)) == 0  # nothing twice


def test_the_wait_running_out_races_a_take_and_only_one_wins(redis_client: redis_lib.Redis, namespace: str) -> None:
    for round_ in range(20):
        queue = queue_for(redis_client, namespace)
        session_id = f"sess_{round_}"
        offer(queue, session_id, wait_seconds=0)
        outcomes: list[str] = []
        start = threading.Barrier(2)

        def take() -> None:
            start.wait()
            if queue_for(redis_client, namespace).take(session_id, agent="A", owner="o",
                                                        leg_id="agt_" + "2" * 16):
                outcomes.append("taken")

        def expire() -> None:
            start.wait()
            queue_for(redis_client, namespace).expire_due(lambda sid, record: outcomes.append("expired"))

        threads = [threading.Thread(target=take), threading.Thread(target=expire)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(outcomes) == 1, outcomes


def test_waiting_lists_only_calls_still_waiting_longest_first(redis_client: redis_lib.Redis, namespace: str) -> None:
    queue = queue_for(redis_client, namespace)
    offer(queue, "sess_first", wait_seconds=30)
    time.sleep(0.01)
    offer(queue, "sess_second", wait_seconds=90)
    offer(queue, "sess_gone", wait_seconds=30)
    queue.withdraw("sess_gone", "ended")
    waiting = queue.waiting()
    assert [o["session_id"] for o in waiting] == ["sess_first", "sess_second"]
    assert 28 <= waiting[0]["seconds_left"] <= 30 and waiting[1]["from"] == FROM


# -- the /agent/media frames ---------------------------------------------------------------------------------------

def test_codec_reads_the_pages_frames_and_refuses_what_breaks_the_protocol() -> None:
    codec = BrowserAgentCodec("agt_" + "a" * 16)
    frame = base64.b64encode(b"\x7f" * 160).decode()
    assert isinstance(codec.parse(json.dumps({"event": "media", "payload": frame})), Malformed)  # before start
    assert codec.parse(b"\x00\x01").close_code == 1003  # type: ignore[union-attr]
    other = codec.parse(json.dumps({"event": "start", "leg": "agt_" + "b" * 16, "token": "t"}))
    assert isinstance(other, Malformed) and other.close_code == 1008
    started = codec.parse(json.dumps({"event": "start", "leg": "agt_" + "a" * 16, "token": "sealed"}))
    assert isinstance(started, StreamStarted) and started.parameters == {"relay_token": "sealed"}
    assert codec.parse(json.dumps({"event": "media", "payload": frame})) == Media(b"\x7f" * 160)
    odd = codec.parse(json.dumps({"event": "media", "payload": base64.b64encode(b"\x7f" * 100).decode()}))
    assert isinstance(odd, Malformed) and not odd.fatal
    assert isinstance(codec.parse(json.dumps({"event": "media", "payload": "%%%"})), Malformed)
    assert codec.parse(json.dumps({"event": "mark", "name": "utt-1"})) == MarkPlayed("utt-1")
    assert codec.parse(json.dumps({"event": "hangup"})) == Stopped()
    assert isinstance(codec.parse(json.dumps({"event": "mute"})), Ignored)
    assert json.loads(codec.clear()) == {"event": "clear"}
    assert json.loads(codec.media(b"\xff\xff")) == {"event": "media", "payload": "//8="}


# -- in the app ---------------------------------------------------------------------------------------------------

def _browser_profile(app: Flask, **fields: object) -> None:
    with app.app_context():
        services().profiles.set(TO, NumberProfile(source_language="en", target_language="es", browser_agents=True,
                                                  **fields))  # type: ignore[arg-type]


def test_a_session_with_an_agent_declares_its_participants_and_is_offered_to_browser_agents(
        make_admin_app, emulator: EmulatorControl) -> None:
    app = make_admin_app()
    _browser_profile(app, browser_agent_wait_seconds=45)
    call_sid = new_call_sid()
    answer(app.test_client(), call_sid)
    (session,) = emulator.sessions()
    assert session["participants"] == [{"type": "customer", "language": "en"}, {"type": "agent", "language": "es"}]
    with app.app_context():
        svc = services()
        assert dial_agent_if_configured(svc, session["id"], "twilio", call_sid) is None
        assert dial_agent_if_configured(svc, session["id"], "twilio", call_sid) is None  # once per session
        (waiting,) = AgentQueue(svc.redis, svc.keys).waiting()
    assert (waiting["session_id"], waiting["call_id"], waiting["from"]) == (session["id"], call_sid, FROM)
    assert 43 <= waiting["seconds_left"] <= 45


def test_a_session_without_an_agent_declares_no_participants(client, emulator: EmulatorControl) -> None:
    answer(client, new_call_sid())
    (session,) = emulator.sessions()
    assert session["participants"] is None


def test_agents_take_from_the_page_and_the_second_is_told_who_was_first(make_admin_app,
                                                                        emulator: EmulatorControl) -> None:
    app = make_admin_app()
    _browser_profile(app)
    session_id, call_sid = offer_a_call(app, emulator)
    ana, bo = app.test_client(), app.test_client()
    assert admin_sign_in(ana, name="Ana").status_code == 302 and admin_sign_in(bo, name="Bo").status_code == 302
    page = ana.get("/admin/agent").get_data(as_text=True)
    assert session_id in page and FROM in page
    assert ana.get("/admin/agent/waiting.json").get_json()["waiting"][0]["session_id"] == session_id
    token = csrf_token_in(page)
    taken = ana.post(f"/admin/agent/take/{session_id}", data={"csrf_token": token})
    assert taken.status_code == 303 and "/admin/agent/call/agt_" in taken.location
    leg_id = taken.location.rsplit("/", 1)[1]
    late = bo.post(f"/admin/agent/take/{session_id}", data={"csrf_token": csrf_token_in(
        bo.get("/admin/agent").get_data(as_text=True))}, follow_redirects=True)
    assert "Ana took that call first." in late.get_data(as_text=True)

    call_page = ana.get(taken.location).get_data(as_text=True)
    assert f'data-leg="{leg_id}"' in call_page and 'data-token=""' not in call_page
    assert bo.get(taken.location).status_code == 404  # the leg is bound to the admin session that took it
    with app.app_context():
        svc = services()
        assert svc.lifecycle.session_legs(session_id)[(BROWSER_LEG, leg_id)] == "live"
        assert svc.lifecycle.call_record(BROWSER_LEG, leg_id)["speaker"] == "agent"
    assert ana.post(f"/admin/agent/take/{session_id}").status_code == 400  # no CSRF token


def test_the_agent_page_needs_a_signed_in_admin(admin_app: Flask) -> None:
    anonymous = admin_app.test_client()
    assert anonymous.get("/admin/agent").status_code == 302
    assert anonymous.get("/admin/agent/waiting.json").status_code == 302
    assert anonymous.get("/admin/agent/call/agt_" + "0" * 16).status_code == 302


@pytest.fixture
def dialling_app(redis_url: str, emulator: EmulatorControl, namespace: str, telnyx_signer,
                 fake_call_control: FakeCallControl) -> Flask:
    """The bridge in-process with Telnyx able to dial (its REST API is the fake, which records commands)."""
    app = create_app({**telnyx_config(bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                                      telnyx_signer.public_key, fake_call_control.api_url),
                      "TELNYX_CONNECTION_ID": TELNYX_CONNECTION_ID})
    app.testing = True
    return app


def _waiting_call(app: Flask, session_id_holder: dict[str, str], emulator: EmulatorControl) -> str:
    """A live customer leg on Telnyx whose session is offered to browser agents with a wait already over."""
    with app.app_context():
        svc = services()
        profile = svc.profiles.for_number(TO)
        session = svc.lifecycle.create_session(carrier="telnyx", call_id="v3:cust", idempotency_key="k-" + TO,
                                               mode=profile.mode, phone_number=TO)
        svc.lifecycle.register_leg(LegSpec.from_profile(profile, carrier="telnyx", call_id="v3:cust",
                                                        speaker="customer", from_number=FROM, to_number=TO,
                                                        default_reconnect_window_seconds=60), session_id=session.id)
        AgentQueue(svc.redis, svc.keys).offer(session.id, carrier="telnyx", call_id="v3:cust", to_number=TO,
                                              from_number=FROM, source_language="en", target_language="es",
                                              wait_seconds=0)
        session_id_holder["id"] = session.id
        return session.id


@pytest.mark.parametrize("field, which", [("agent_number", "agent number"), ("fallback_number", "fallback number")])
def test_no_browser_agent_in_time_dials_the_agent_number_or_else_the_fallback_and_says_so_live(
        dialling_app: Flask, fake_call_control: FakeCallControl, emulator: EmulatorControl, field: str,
        which: str) -> None:
    _browser_profile(dialling_app, carrier="telnyx", browser_agent_wait_seconds=5, **{field: "+14155550142"})
    session_id = _waiting_call(dialling_app, {}, emulator)
    with dialling_app.app_context():
        svc = services()
        assert expire_agent_waits(svc) == 1
        assert expire_agent_waits(svc) == 0
        (event,) = [e for e in SessionEventLog(svc.redis, svc.keys).latest(session_id, 10) if e.kind == LEG]
        legs = svc.lifecycle.session_legs(session_id)
    assert event.data["state"] == "fallback" and event.data["detail"].endswith(which)
    (dial,) = fake_call_control.commands("dial")
    assert dial["body"]["to"] == "+14155550142"
    assert len(legs) == 2  # the customer's and the dialled agent's


def test_no_browser_agent_and_no_number_leaves_the_customer_with_kallglot_and_says_so(
        telnyx_app: Flask, fake_call_control: FakeCallControl, emulator: EmulatorControl) -> None:
    _browser_profile(telnyx_app, carrier="telnyx")
    session_id = _waiting_call(telnyx_app, {}, emulator)
    with telnyx_app.app_context():
        svc = services()
        assert expire_agent_waits(svc) == 1
        (event,) = [e for e in SessionEventLog(svc.redis, svc.keys).latest(session_id, 10) if e.kind == LEG]
        assert svc.lifecycle.session_record(session_id)["status"] != "ended"
    assert event.data["state"] == "fallback" and "no agent or fallback number" in event.data["detail"]
    assert fake_call_control.commands("dial") == []


@pytest.mark.parametrize("wait", [4, 601])
def test_the_browser_agent_wait_is_bounded(wait: int) -> None:
    problems = NumberProfile(browser_agents=True, browser_agent_wait_seconds=wait).problems(("twilio",))
    assert "between 5 and 600" in problems["browser_agent_wait_seconds"]


@pytest.mark.parametrize("participants, param", [
    ({"type": "customer"}, "participants"),
    ([], "participants"),
    ([{"type": "supervisor"}], "participants[0].type"),
    ([{"type": "agent", "language": "xx"}], "participants[0].language"),
    ([{"type": "agent", "voice": "alloy"}], "participants[0]"),
    ([{"type": "customer"}, {"type": "customer"}], "participants"),
])
def test_the_emulator_refuses_participants_of_the_wrong_shape(emulator: EmulatorControl, participants: object,
                                                              param: str) -> None:
    import requests

    from tests.support.settings import EMULATOR_API_KEY

    response = requests.post(emulator.api_url + "/sessions", timeout=10, headers={
        "Authorization": f"Bearer {EMULATOR_API_KEY}"}, json={"mode": "bidirectional_translation",
                                                              "participants": participants})
    assert response.status_code == 422 and response.json()["error"]["param"] == param
    ok = requests.post(emulator.api_url + "/sessions", timeout=10, headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"},
                       json={"mode": "bidirectional_translation",
                             "participants": [{"type": "customer", "language": "en"}, {"type": "agent"}]})
    assert ok.status_code == 201


def test_the_live_page_shows_that_the_fallback_was_used(make_admin_app, emulator: EmulatorControl) -> None:
    app = make_admin_app()
    _browser_profile(app, browser_agent_wait_seconds=5)
    call_sid = new_call_sid()
    answer(app.test_client(), call_sid)
    (session,) = emulator.sessions()
    with app.app_context():
        svc = services()
        dial_agent_if_configured(svc, session["id"], "twilio", call_sid)
        svc.redis.zadd(svc.keys.agents_waiting(), {session["id"]: 0})  # the wait ran out
        assert expire_agent_waits(svc) == 1
    admin = app.test_client()
    admin_sign_in(admin)
    page = admin.get(f"/admin/live/{session['id']}").get_data(as_text=True)
    assert "fallback used" in page and "no browser agent took the call in 5 s" in page


def test_an_agent_without_a_microphone_gives_the_call_back_and_the_customer_stays_on(
        make_admin_app, emulator: EmulatorControl) -> None:
    app = make_admin_app()
    _browser_profile(app)
    session_id, call_sid = offer_a_call(app, emulator)
    ana = app.test_client()
    admin_sign_in(ana, name="Ana")
    token = csrf_token_in(ana.get("/admin/agent").get_data(as_text=True))
    leg_id = ana.post(f"/admin/agent/take/{session_id}", data={"csrf_token": token}).location.rsplit("/", 1)[1]
    page = ana.get(f"/admin/agent/call/{leg_id}").get_data(as_text=True)
    back = ana.post(f"/admin/agent/call/{leg_id}/give-back", data={"csrf_token": csrf_token_in(page)},
                    follow_redirects=True)
    assert "The call is back on the waiting list." in back.get_data(as_text=True)
    with app.app_context():
        svc = services()
        legs = svc.lifecycle.session_legs(session_id)
        (waiting,) = AgentQueue(svc.redis, svc.keys).waiting()
    assert legs[("twilio", call_sid)] == "live" and legs[(BROWSER_LEG, leg_id)] == "ended"
    assert (waiting["session_id"], waiting["reason"]) == (session_id, "agent_gave_back")
    other = app.test_client()
    admin_sign_in(other, name="Bo")
    assert other.post(f"/admin/agent/call/{leg_id}/give-back", data={"csrf_token": csrf_token_in(
        other.get("/admin/agent").get_data(as_text=True))}).status_code == 404  # only the agent who took it
