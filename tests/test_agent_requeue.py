"""A browser agent's leg lost by any path puts the call back on the agents' list (real Redis, the reaper's pass):
a tab that never opens its media socket after **Take** (given up after ``AGENT_SOCKET_OPEN_SECONDS``, not the
lifecycle's 60 s stream-start grace), and a leg whose worker died (its heartbeat stops). A leg that ended
otherwise (hung up) or whose customer is gone is not offered again; a re-offer whose wait runs out goes to the
agent number or fallback like a first offer."""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.calls.agent import browser_leg_lost, expire_agent_waits
from app.calls.agent_queue import BROWSER_LEG, AgentQueue
from app.calls.events import LEG, SessionEventLog
from app.calls.reaper import Reaper
from app.config import Settings
from app.extensions import Services, services
from app.profiles import NumberProfile
from tests.support.admin import admin_sign_in, csrf_token_in
from tests.support.agent_offers import offer_a_call
from tests.support.controls import EmulatorControl
from tests.support.twilio_requests import TO

#: The shortest bounds the settings allow, so the reaper's give-up comes within seconds.
SHORT = {"AGENT_SOCKET_OPEN_SECONDS": "3", "HEARTBEAT_TIMEOUT_SECONDS": "3"}


def _reaper(svc: Services) -> Reaper:
    """The reaper as the app's factory wires it (agent waits pass, browser legs re-offered when lost)."""
    return Reaper(svc.lifecycle, extra_passes=[lambda: expire_agent_waits(svc)],
                  on_leg_lost=lambda carrier, call_id: browser_leg_lost(svc, carrier, call_id))


def _taken_call(make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> tuple[Flask, FlaskClient, str, str,
                                                                                          str]:
    """A simulated Twilio customer's call offered to browser agents and taken by "Ana" (whose page never opens
    its socket): (app, Ana's client, session id, customer call sid, browser leg id)."""
    app = make_admin_app(**SHORT)
    with app.app_context():
        services().profiles.set(TO, NumberProfile(source_language="en", target_language="es", browser_agents=True,
                                                  browser_agent_wait_seconds=30))
    session_id, call_sid = offer_a_call(app, emulator)
    ana = app.test_client()
    assert admin_sign_in(ana, name="Ana").status_code == 302
    token = csrf_token_in(ana.get("/admin/agent").get_data(as_text=True))
    taken = ana.post(f"/admin/agent/take/{session_id}", data={"csrf_token": token})
    assert taken.status_code == 303
    return app, ana, session_id, call_sid, taken.location.rsplit("/", 1)[1]


def _reap_until(svc: Services, done: Callable[[], bool], timeout: float = 15.0) -> None:
    """Run reaper passes (as a worker's reaper does, once a second or faster) until ``done()``."""
    reaper, deadline = _reaper(svc), time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the reaper did not get there in time"
        reaper.run_once()
        time.sleep(0.2)


def test_settings_bound_the_socket_open_wait() -> None:
    assert "AGENT_SOCKET_OPEN_SECONDS must be between 3 and 120" in " ".join(
        Settings.from_mapping({"agent_socket_open_seconds": 2}).problems())


def test_a_taken_call_whose_page_never_opens_its_socket_goes_back_on_the_list(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, _ana, session_id, call_sid, leg_id = _taken_call(make_admin_app, emulator)
    with app.app_context():
        svc = services()
        queue = AgentQueue(svc.redis, svc.keys)
        taken_at = float(queue.offer_record(session_id)["taken_at"])
        member = f"{BROWSER_LEG}:{leg_id}"
        give_up_at = svc.redis.zscore(svc.keys.heartbeats(svc.keys.shard_of(session_id)), member)
        # The short bound, not the lifecycle's 60 s stream-start grace.
        assert give_up_at is not None and taken_at <= give_up_at <= taken_at + 3.5
        assert queue.waiting() == []
        _reap_until(svc, lambda: bool(queue.waiting()))
        (waiting,) = queue.waiting()
        legs = svc.lifecycle.session_legs(session_id)
        call = svc.lifecycle.call_record(BROWSER_LEG, leg_id)
    assert (waiting["session_id"], waiting["reason"]) == (session_id, "agent_lost")
    assert 25 <= waiting["seconds_left"] <= 30  # a fresh wait of the profile's 30 s
    assert legs[(BROWSER_LEG, leg_id)] == "ended" and call["end_reason"] == "heartbeat_lost"
    assert legs[("twilio", call_sid)] == "live"  # the customer stays on


def test_a_browser_leg_whose_worker_died_is_offered_again_and_then_goes_to_the_fallback(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, _ana, session_id, _call_sid, leg_id = _taken_call(make_admin_app, emulator)
    with app.app_context():
        svc = services()
        svc.profiles.set(TO, NumberProfile(source_language="en", target_language="es", browser_agents=True,
                                           browser_agent_wait_seconds=30))
        queue = AgentQueue(svc.redis, svc.keys)
        # The page's socket was served by a worker that then died: its stream started and beat, then nothing.
        assert svc.lifecycle.stream_started(BROWSER_LEG, leg_id, "brw-dead-worker")
        assert svc.lifecycle.heartbeat(BROWSER_LEG, leg_id, "brw-dead-worker")
        _reap_until(svc, lambda: bool(queue.waiting()))
        (waiting,) = queue.waiting()
        assert waiting["reason"] == "agent_lost"
        assert not browser_leg_lost(svc, BROWSER_LEG, leg_id) or len(queue.waiting()) == 1  # never twice
        # Nobody takes it this time either: the wait running out goes to the agent number / fallback path.
        svc.redis.zadd(svc.keys.agents_waiting(), {session_id: 0})
        assert expire_agent_waits(svc) == 1
        events = [e for e in SessionEventLog(svc.redis, svc.keys).latest(session_id, 20) if e.kind == LEG]
    assert any(e.data.get("state") == "fallback" and "no browser agent took the call" in e.data.get("detail", "")
               for e in events)


def test_a_browser_leg_that_ended_otherwise_or_without_its_customer_is_not_offered_again(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app, _ana, session_id, call_sid, leg_id = _taken_call(make_admin_app, emulator)
    with app.app_context():
        svc = services()
        queue = AgentQueue(svc.redis, svc.keys)
        assert not browser_leg_lost(svc, "twilio", call_sid)  # a phone leg: not the agents' list's business
        assert not browser_leg_lost(svc, BROWSER_LEG, leg_id)  # still live
        svc.lifecycle.leg_ended("twilio", call_sid, "completed", clean=True)  # the customer hung up
        _reap_until(svc, lambda: svc.lifecycle.call_record(BROWSER_LEG, leg_id).get("state") == "ended")
        assert not browser_leg_lost(svc, BROWSER_LEG, leg_id)
        assert queue.waiting() == []


@pytest.mark.parametrize("path", ["socket", "reaper"])
def test_either_path_offering_again_keeps_one_entry_and_its_deadline(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl, path: str) -> None:
    from app.calls.agent import offer_again

    app, _ana, session_id, _call_sid, leg_id = _taken_call(make_admin_app, emulator)
    with app.app_context():
        svc = services()
        queue = AgentQueue(svc.redis, svc.keys)
        _reap_until(svc, lambda: bool(queue.waiting()))
        deadline = svc.redis.zscore(svc.keys.agents_waiting(), session_id)
        again = offer_again(svc, session_id, leg_id) if path == "socket" else browser_leg_lost(svc, BROWSER_LEG,
                                                                                               leg_id)
        assert again
        assert svc.redis.zscore(svc.keys.agents_waiting(), session_id) == deadline and len(queue.waiting()) == 1
