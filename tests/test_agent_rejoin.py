"""What browser agents see and may do once a waiting call changed under them (real Redis, the app in-process): a
call whose customer hung up while it waited leaves the Agent page's list at once (not when its wait runs out) and
cannot be taken; an agent whose leg was lost rejoins while the call waits, but not once it went to another agent
(the dialled agent number, after the wait ran out) — a customer never ends up with two agents by accident. And
sessions that will have an agent declare their participants on every path that creates one: a profile with only an
agent number (no browser agents), and a call the bridge places (``POST /api/calls``)."""
from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from app.calls.agent import offer_again
from app.calls.agent_queue import BROWSER_LEG, AgentQueue
from app.calls.leg_spec import LegSpec
from app.extensions import services
from app.kallglot.stream_protocol import SPEAKER_AGENT
from app.profiles import NumberProfile
from tests.support.admin import admin_sign_in, csrf_token_in
from tests.support.agent_offers import offer_a_call
from tests.support.controls import EmulatorControl
from tests.support.twilio_requests import TO, answer, new_call_sid

AGENT_NUMBER = "+14155550142"


def _offered_call(make_admin_app: Callable[..., Flask], emulator: EmulatorControl,
                  **profile: object) -> tuple[Flask, FlaskClient, str, str]:
    """A simulated Twilio customer's call offered to browser agents, and "Ana" signed in to the Agent page:
    (app, Ana's client, session id, customer call sid)."""
    app = make_admin_app()
    with app.app_context():
        services().profiles.set(TO, NumberProfile(source_language="en", target_language="es", browser_agents=True,
                                                  browser_agent_wait_seconds=60, **profile))  # type: ignore[arg-type]
    session_id, call_sid = offer_a_call(app, emulator)
    ana = app.test_client()
    assert admin_sign_in(ana, name="Ana").status_code == 302
    return app, ana, session_id, call_sid


def _waiting_ids(agent: FlaskClient) -> list[str]:
    return [offer["session_id"] for offer in agent.get("/admin/agent/waiting.json").get_json()["waiting"]]


def test_a_call_whose_customer_hung_up_while_waiting_leaves_the_agents_list_at_once(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, ana, session_id, call_sid = _offered_call(make_admin_app, emulator)
    assert _waiting_ids(ana) == [session_id]
    page = ana.get("/admin/agent").get_data(as_text=True)
    with app.app_context():
        services().lifecycle.leg_ended("twilio", call_sid, "completed", clean=True)  # the customer hung up
        assert services().lifecycle.session_record(session_id)["status"] == "ended"
    # Not listed for the rest of its 60 s wait: neither by the page's refresh nor by a reload.
    assert _waiting_ids(ana) == []
    assert f'data-session="{session_id}"' not in ana.get("/admin/agent").get_data(as_text=True)
    # A Take from a page loaded before the hang-up is refused, and registers no agent leg.
    took = ana.post(f"/admin/agent/take/{session_id}", data={"csrf_token": csrf_token_in(page)},
                    follow_redirects=True)
    assert "That call has just ended." in took.get_data(as_text=True)
    with app.app_context():
        assert [leg for leg in services().lifecycle.session_legs(session_id) if leg[0] == BROWSER_LEG] == []


def _take_and_lose(app: Flask, ana: FlaskClient, session_id: str) -> str:
    """Ana takes the call, then her tab goes away (the socket route's path: lost leg, offered again)."""
    token = csrf_token_in(ana.get("/admin/agent").get_data(as_text=True))
    leg_id = ana.post(f"/admin/agent/take/{session_id}", data={"csrf_token": token}).location.rsplit("/", 1)[1]
    with app.app_context():
        svc = services()
        svc.lifecycle.leg_ended(BROWSER_LEG, leg_id, "relay_carrier_lost", clean=False)
        assert offer_again(svc, session_id, leg_id)
    return leg_id


def test_a_lost_agent_rejoins_while_the_call_waits_for_an_agent(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, ana, session_id, _call_sid = _offered_call(make_admin_app, emulator)
    leg_id = _take_and_lose(app, ana, session_id)
    page = ana.get(f"/admin/agent/call/{leg_id}").get_data(as_text=True)
    assert 'data-token="' in page and 'data-token=""' not in page
    with app.app_context():
        svc = services()
        assert svc.lifecycle.session_legs(session_id)[(BROWSER_LEG, leg_id)] == "live"
        assert AgentQueue(svc.redis, svc.keys).waiting() == []


def test_a_lost_agent_cannot_rejoin_once_the_call_went_to_the_agent_number(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, ana, session_id, call_sid = _offered_call(make_admin_app, emulator, agent_number=AGENT_NUMBER)
    leg_id = _take_and_lose(app, ana, session_id)
    with app.app_context():
        svc = services()
        # Nobody took it again in time: the wait ran out and the agent number was dialled into the session (as
        # app.calls.agent.dial_into_session registers it once the carrier accepted the dial).
        assert AgentQueue(svc.redis, svc.keys).withdraw(session_id, "expired")
        session = svc.lifecycle.session_record(session_id)
        assert svc.lifecycle.register_leg(LegSpec.joining(session, carrier="twilio", call_id="CA" + "a" * 32,
                                                          speaker=SPEAKER_AGENT, from_number=TO,
                                                          to_number=AGENT_NUMBER), session_id=session_id)
    page = ana.get(f"/admin/agent/call/{leg_id}").get_data(as_text=True)
    assert "This call can no longer be rejoined." in page and "data-token" not in page
    with app.app_context():
        legs = services().lifecycle.session_legs(session_id)
    assert legs[(BROWSER_LEG, leg_id)] == "ended" and legs[("twilio", call_sid)] == "live"


def test_a_lost_agent_rejoins_a_call_left_with_kallglot_when_the_wait_ran_out_without_a_number(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, ana, session_id, _call_sid = _offered_call(make_admin_app, emulator)
    leg_id = _take_and_lose(app, ana, session_id)
    with app.app_context():
        svc = services()
        assert AgentQueue(svc.redis, svc.keys).withdraw(session_id, "expired")  # no number: customer stays on
    assert 'data-token=""' not in ana.get(f"/admin/agent/call/{leg_id}").get_data(as_text=True)
    with app.app_context():
        assert services().lifecycle.session_legs(session_id)[(BROWSER_LEG, leg_id)] == "live"


def test_a_profile_with_only_an_agent_number_declares_the_sessions_participants(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app = make_admin_app()
    with app.app_context():
        services().profiles.set(TO, NumberProfile(source_language="fr", target_language="de",
                                                  agent_number=AGENT_NUMBER))
    answer(app.test_client(), new_call_sid())
    (session,) = emulator.sessions()
    assert session["participants"] == [{"type": "customer", "language": "fr"}, {"type": "agent", "language": "de"}]


def test_a_call_the_bridge_places_for_a_number_with_browser_agents_declares_the_sessions_participants(
        redis_url: str, emulator: EmulatorControl, namespace: str) -> None:
    """``POST /api/calls`` from a number whose calls go to browser agents: its session is created with both
    participants too (the API's own create, not the inbound webhooks')."""
    from app import create_app
    from app.devtools.localstack import run_gunicorn
    from tests.support.settings import PUBLIC_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config

    fake_env = {"TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
                "FAKE_TWILIO_BRIDGE_URL": "http://127.0.0.1:9", "FAKE_TWILIO_MAX_CALL_SECONDS": "1"}
    with run_gunicorn("app.devtools.simulator.twilio_rest:create_fake_twilio_rest()", fake_env) as fake_twilio:
        app = create_app({**bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                          "API_TOKEN": "api-token", "TWILIO_API_URL": fake_twilio.url})
        with app.app_context():
            services().profiles.set("+15005550006", NumberProfile(source_language="en", target_language="ja",
                                                                  browser_agents=True))
        response = app.test_client().post("/api/calls", json={"to": "+14155550100", "from": "+15005550006"},
                                          headers={"Authorization": "Bearer api-token"})
    assert response.status_code in (200, 201), response.json
    session = emulator.session(response.json["session_id"])
    assert session["participants"] == [{"type": "customer", "language": "en"}, {"type": "agent", "language": "ja"}]
