"""The session lifecycle end to end: agent legs, outbound calls, Kallglot webhooks, returning callers, worker
deaths and Redis restarts — the bridge under gunicorn + gevent, a fake Twilio REST API that really places the
calls it is asked for, the Kallglot emulator and a real Redis."""
from __future__ import annotations

import base64

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis as redis_lib
import requests

from app.carriers.registry import carrier_names
from app.kallglot.signature import sign
from app.profiles import NumberProfile, ProfileStore
from app.redis_keys import RedisKeys
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.settings import (
    E2E_GRACEFUL_TIMEOUT_SECONDS, E2E_HEARTBEAT_TIMEOUT_SECONDS, E2E_RECONNECT_WINDOW_SECONDS, TWILIO_ACCOUNT_SID,
    TWILIO_AUTH_TOKEN, e2e_bridge_env,
)
from tests.support.bridge_state import BridgeState
from tests.support.waiting import only_session, wait_until
from tests.support.servers import RunningServer, free_port, run_gunicorn

pytestmark = pytest.mark.e2e
TO, FROM, AGENT, CUSTOMER = "+15005550006", "+15551230000", "+14155557770", "+14155558880"
NAMESPACE = "e2e-lifecycle"
WEBHOOK_SECRET = "whsec_test_lifecycle"
API_TOKEN = "api-token-for-tests"


@dataclass
class Stack:
    bridge: RunningServer
    fake_twilio: RunningServer
    profiles: ProfileStore
    redis: redis_lib.Redis

    @property
    def state(self) -> BridgeState:
        """The bridge's Redis state (its own namespace)."""
        return BridgeState(self.redis, NAMESPACE)

    def placed_calls(self) -> list[dict]:
        return requests.get(self.fake_twilio.url + "/_fake/calls", timeout=5).json()["calls"]


@pytest.fixture(scope="module")
def stack(redis_url: str, emulator_server: RunningServer) -> Iterator[Stack]:
    bridge_port = free_port()
    bridge_url = f"http://127.0.0.1:{bridge_port}"
    fake_env = {"TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
                "FAKE_TWILIO_BRIDGE_URL": bridge_url, "FAKE_TWILIO_MAX_CALL_SECONDS": "20"}
    with run_gunicorn("app.devtools.simulator.twilio_rest:create_fake_twilio_rest()", fake_env) as fake:
        env = {**e2e_bridge_env(redis_url, emulator_server.url + "/v1", NAMESPACE, bridge_url),
               "TWILIO_API_URL": fake.url, "KALLGLOT_WEBHOOK_SECRET": WEBHOOK_SECRET, "API_TOKEN": API_TOKEN}
        with run_gunicorn("app:create_app()", env, workers=2, port=bridge_port,
                          graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as bridge:
            client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
            store = ProfileStore(client, RedisKeys(NAMESPACE), NumberProfile(), carriers=carrier_names())
            yield Stack(bridge, fake, store, client)
            client.close()


@pytest.fixture
def clean_stack(stack: Stack, emulator: EmulatorControl) -> Stack:
    requests.post(stack.fake_twilio.url + "/_fake/reset", timeout=5).raise_for_status()
    stack.state.flush()  # no held session or live leg of an earlier test is reaped during this one
    return stack


def simulator(stack: Stack) -> TwilioCallSimulator:
    return TwilioCallSimulator(stack.bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)






def test_agent_leg_joins_the_session_and_is_hung_up_with_the_customer(clean_stack: Stack,
                                                                      emulator: EmulatorControl) -> None:
    clean_stack.profiles.set(TO, NumberProfile(agent_number=AGENT))

    def talk_until_the_agent_spoke(stream: SimulatedStream) -> None:
        assert wait_until(lambda: len(only_session(emulator)["audio_received"].get("agent", "")) > 0)
        agent_bytes = 8000  # the fake's answering party speaks one second
        assert wait_until(lambda: only_session(emulator)["audio_input_messages"].get("agent", 0) >= agent_bytes // 800)

    result = simulator(clean_stack).place_call(TO, FROM, b"\xff" * 1600, pace=False,
                                               hold_open=talk_until_the_agent_spoke, listen_seconds=0.2)
    assert result.protocol_errors == []
    (agent_call,) = clean_stack.placed_calls()
    assert agent_call["to"] == AGENT and agent_call["from"] == TO
    # The customer hung up: the bridge hung the agent up through Twilio's REST API, then ended the session once.
    assert wait_until(lambda: clean_stack.placed_calls()[0]["status"] == "completed")
    assert clean_stack.placed_calls()[0]["hung_up_by_api"] is True
    assert clean_stack.placed_calls()[0]["heard_bytes"] >= 8000  # the agent heard Kallglot's audio on its leg
    session = only_session(emulator)
    assert set(session["audio_received"]) == {"customer", "agent"}
    assert wait_until(lambda: clean_stack.state.settled_ended(session["id"]))  # ended for good, nothing due
    assert emulator.session(session["id"])["end_calls"] == 1


def api_call(stack: Stack, body: dict, token: str | None = API_TOKEN, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if key:
        headers["Idempotency-Key"] = key
    return requests.post(stack.bridge.url + "/api/calls", json=body, headers=headers, timeout=10)


def kallglot_event(stack: Stack, event: dict, *, secret: str = WEBHOOK_SECRET,
                   timestamp: int | None = None) -> requests.Response:
    body = json.dumps(event).encode()
    header = sign(secret, body, timestamp or int(time.time()))
    return requests.post(stack.bridge.url + "/kallglot/webhooks", data=body, timeout=10,
                         headers={"Kallglot-Signature": header, "Content-Type": "application/json"})


def test_outbound_api_dials_the_customer_and_kallglot_session_ended_hangs_up(
        clean_stack: Stack, emulator: EmulatorControl) -> None:
    clean_stack.profiles.set(TO, NumberProfile())  # "from" must be one of our configured numbers
    assert api_call(clean_stack, {"to": CUSTOMER, "from": TO}, token=None).status_code == 401
    assert api_call(clean_stack, {"to": CUSTOMER, "from": TO}, token="wrong").status_code == 401
    bad = api_call(clean_stack, {"to": "555", "from": TO, "carrier": "pigeon"})
    assert bad.status_code == 422 and set(bad.json()["problems"]) == {"to", "carrier"}
    key = str(uuid.uuid4())
    created = api_call(clean_stack, {"to": CUSTOMER, "from": TO}, key=key)
    assert created.status_code == 201, created.text
    replay = api_call(clean_stack, {"to": CUSTOMER, "from": TO}, key=key)
    assert replay.status_code == 200 and replay.json()["call_id"] == created.json()["call_id"]
    session_id = created.json()["session_id"]
    assert len(clean_stack.placed_calls()) == 1 and len(emulator.sessions()) == 1
    # The customer answers and talks: their audio reaches the session as the customer.
    assert wait_until(lambda: emulator.session(session_id)["audio_input_messages"].get("customer", 0) >= 10)

    event = {"id": f"evt_{uuid.uuid4().hex}", "type": "session.ended", "api_version": "v1",
             "created_at": "2026-11-24T11:00:00Z",
             "data": {"id": session_id, "object": "session", "status": "ended", "duration": 12.5}}
    assert kallglot_event(clean_stack, event, secret="wrong").status_code == 403
    assert kallglot_event(clean_stack, event, timestamp=int(time.time()) - 3600).status_code == 403
    first = kallglot_event(clean_stack, event)
    again = kallglot_event(clean_stack, event)
    assert (first.status_code, first.json()["status"]) == (200, "ok")
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert wait_until(lambda: clean_stack.placed_calls()[0]["status"] == "completed")
    assert clean_stack.placed_calls()[0]["hung_up_by_api"] is True
    assert wait_until(lambda: clean_stack.state.settled_ended(session_id))  # ended for good, nothing due
    assert clean_stack.state.end_claim(session_id).startswith("ended:kallglot:")
    assert emulator.session(session_id)["end_calls"] == 0  # Kallglot ended it; the bridge did not end it again


def test_returning_caller_reattaches_to_the_held_session(clean_stack: Stack, emulator: EmulatorControl) -> None:
    sim = simulator(clean_stack)
    first = sim.place_call(TO, FROM, b"\x01" * 800, pace=False, status_callbacks="none",
                           hold_open=lambda stream: stream.close_abruptly(), listen_seconds=0)
    assert first.protocol_errors == []
    session_id = only_session(emulator)["id"]
    # The relay notices the dropped socket and holds the session for the reconnect window.
    assert wait_until(lambda: clean_stack.redis.exists(RedisKeys(NAMESPACE).held(TO, FROM)))
    second = sim.place_call(TO, FROM, b"\x02" * 800, pace=False, listen_seconds=0.3)
    assert second.protocol_errors == [] and second.streams == 1
    session = only_session(emulator)  # no second POST /v1/sessions
    assert session["id"] == session_id and session["connections_total"] == 2
    # Both calls' audio reached the one session, the returning caller's after the first's.
    assert base64.b64decode(session["audio_received"]["customer"]) == b"\x01" * 800 + b"\x02" * 800
    assert wait_until(lambda: clean_stack.state.settled_ended(session_id))
    assert emulator.session(session_id)["end_calls"] == 1


def relay_pid(bridge: RunningServer, call_sid: str) -> int:
    """The worker whose relay carries ``call_sid`` (from its "relay started" log line)."""
    for line in bridge.log().splitlines():
        if call_sid in line and "relay started" in line:
            match = re.search(r'"pid":\s*(\d+)', line) or re.search(r"\[pid (\d+)\]", line)
            if match:
                return int(match.group(1))
    raise AssertionError(f"no relay log line for {call_sid}")


def test_worker_killed_mid_call_the_stream_is_restored_on_a_live_worker(clean_stack: Stack,
                                                                        emulator: EmulatorControl) -> None:
    killed: list[int] = []

    def kill_the_relay_worker(stream: SimulatedStream) -> None:
        assert wait_until(lambda: only_session(emulator)["connections_live"] == 1)
        pid = relay_pid(clean_stack.bridge, stream.call_sid)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        assert stream.wait_for(lambda s: s.server_closed, timeout=5)

    result = simulator(clean_stack).place_call(TO, FROM, b"\xff" * 800, pace=False,
                                               hold_open=kill_the_relay_worker, listen_seconds=0.5)
    assert killed and result.streams == 2  # <Connect action> restored the stream (on a live worker)
    session = only_session(emulator)
    assert session["connections_total"] == 2
    assert wait_until(lambda: emulator.session(session["id"])["status"] == "ended")
    assert emulator.session(session["id"])["end_calls"] == 1


def test_worker_and_caller_gone_without_any_callback_the_session_still_ends(clean_stack: Stack,
                                                                            emulator: EmulatorControl) -> None:
    def kill_everything(stream: SimulatedStream) -> None:
        assert wait_until(lambda: only_session(emulator)["connections_live"] == 1)
        os.kill(relay_pid(clean_stack.bridge, stream.call_sid), signal.SIGKILL)
        stream.close_abruptly()  # the caller is gone too: no <Connect action>, no status callback

    simulator(clean_stack).place_call(TO, FROM, b"\xff" * 800, pace=False, status_callbacks="none",
                                      hold_open=kill_everything, listen_seconds=0)
    session_id = only_session(emulator)["id"]
    # The relay's heartbeat expires, the leg counts as lost, the hold runs out, the session ends — once.
    # A bound on the wait, not a timing claim: on a loaded machine the surviving worker's reaper runs late.
    budget = E2E_HEARTBEAT_TIMEOUT_SECONDS + E2E_RECONNECT_WINDOW_SECONDS + 20
    assert wait_until(lambda: clean_stack.state.settled_ended(session_id), timeout=budget), (
        clean_stack.state.session(session_id), clean_stack.state.deadline(session_id),
        clean_stack.redis.zrange(clean_stack.state.keys.heartbeats(clean_stack.state.keys.shard_of(session_id)), 0,
                                 -1, withscores=True), time.time(),
        [line for line in clean_stack.bridge.log().splitlines() if "reaper" in line or "heartbeat" in line][-5:])
    assert emulator.session(session_id)["end_calls"] == 1


def test_a_caller_talking_while_kallglot_refuses_the_first_stream_connect_is_still_heard(
        clean_stack: Stack, emulator: EmulatorControl) -> None:
    """Chaos-run dead air: Kallglot accepted the stream's WebSocket, then refused it (``session.error``, close)
    after the relay had written the caller's first words to it. Those words were lost and the caller, who
    spoke only then, heard nothing. They now go out again on the reopened stream, and come back."""
    emulator.fault(endpoint="connect", status=503, code="service_unavailable", delay_seconds=2.0, times=1)
    audio = bytes(range(1, 161)) * 5  # one 100 ms chunk, sent at once

    def listen_for_the_echo(stream: SimulatedStream) -> None:
        assert stream.wait_for(lambda s: len(s.heard) >= len(audio), timeout=15), stream.heard

    result = simulator(clean_stack).place_call(TO, FROM, audio, pace=False, hold_open=listen_for_the_echo,
                                               listen_seconds=0)
    assert result.heard_audio == audio and result.streams == 1
    session = only_session(emulator)
    # The refused stream (never attached), then the reopened one.
    assert session["errors_sent"] == ["service_unavailable"] and session["connections_total"] == 1
    assert base64.b64decode(session["audio_received"]["customer"]) == audio  # once, not twice


# ----- issue 12 item 10 on Twilio: an agent who does not answer does not hang up the customer ---------------------
def fake_twilio(stack: Stack, path: str, body: dict) -> dict:
    response = requests.post(stack.fake_twilio.url + path, json=body, timeout=5)
    response.raise_for_status()
    return response.json()


def placed_call(stack: Stack, sid: str) -> dict:
    return next(c for c in stack.placed_calls() if c["sid"] == sid)


def customer_call(stack: Stack, listen_seconds: float = 4.0) -> str:
    """An inbound customer call run by the fake Twilio (so the bridge's REST ``update`` reaches it); its sid."""
    return fake_twilio(stack, "/_fake/inbound", {"to": TO, "from": FROM, "audio_byte": 1, "audio_seconds": 0.3,
                                                 "listen_seconds": listen_seconds})["sid"]


def finished(stack: Stack, sid: str, timeout: float = 30.0) -> dict:
    call = wait_until(lambda: (c := placed_call(stack, sid))["status"] == "completed" and c, timeout)
    assert call, placed_call(stack, sid)
    return call


@pytest.mark.parametrize("status", ["no-answer", "busy", "failed"])
def test_agent_who_does_not_answer_leaves_the_customer_told_and_on_the_session(clean_stack: Stack,
                                                                                emulator: EmulatorControl,
                                                                                status: str) -> None:
    from app.calls.prompts import AGENT_UNAVAILABLE_MESSAGE

    clean_stack.profiles.set(TO, NumberProfile(agent_number=AGENT, agent_hangup_ends_call=True,
                                               fallback_language="en-GB"))
    fake_twilio(clean_stack, "/_fake/numbers", {AGENT: status})
    sid = customer_call(clean_stack)
    call = finished(clean_stack, sid)
    # Told in the profile's language, then back on the same session (a second stream), never hung up by us.
    assert call["said"] == [AGENT_UNAVAILABLE_MESSAGE] and call["dialled"] == [] and call["streams"] == 2, call
    assert 'language="en-GB"' in call["redirects"][0] and not call["hung_up_by_api"]
    assert call["protocol_errors"] == [] and call["errors"] == []
    # The second stream replaced the first on purpose: not one of the 3 restores the customer has for losses.
    assert clean_stack.state.call("twilio", sid).get("stream_restarts", "0") == "0"
    session = only_session(emulator)
    assert session["connections_total"] == 2 and emulator.stats()["created"] == 1
    agent_sid = next(c["sid"] for c in clean_stack.placed_calls() if c["to"] == AGENT)
    assert clean_stack.state.call("twilio", agent_sid)["end_reason"] == f"call_{status}"
    # The customer hung up at the end: the session ended then, once, for good.
    assert wait_until(lambda: clean_stack.state.settled_ended(session["id"]))
    assert emulator.session(session["id"])["end_calls"] == 1


def test_agent_unavailable_forwards_the_customer_to_the_fallback_number(clean_stack: Stack,
                                                                        emulator: EmulatorControl) -> None:
    from app.calls.prompts import AGENT_UNAVAILABLE_MESSAGE

    fallback = "+14155550199"
    clean_stack.profiles.set(TO, NumberProfile(agent_number=AGENT, fallback_number=fallback))
    fake_twilio(clean_stack, "/_fake/numbers", {AGENT: "busy"})
    call = finished(clean_stack, customer_call(clean_stack))
    assert (call["said"], call["dialled"], call["streams"]) == ([AGENT_UNAVAILABLE_MESSAGE], [fallback], 1), call
    session = only_session(emulator)
    # Forwarded: the translation session is over (its one customer leg stopped cleanly), ended once.
    assert wait_until(lambda: clean_stack.state.settled_ended(session["id"]))
    assert emulator.session(session["id"])["end_calls"] == 1


@pytest.mark.parametrize("ends_call", [True, False])
def test_agent_hangup_ends_call_both_ways(clean_stack: Stack, emulator: EmulatorControl, ends_call: bool) -> None:
    """An agent who answered, talked and hung up ends the customer's call only when the profile says so."""
    clean_stack.profiles.set(TO, NumberProfile(agent_number=AGENT, agent_hangup_ends_call=ends_call))
    fake_twilio(clean_stack, "/_fake/numbers", {AGENT: "hangs-up"})
    sid = customer_call(clean_stack, listen_seconds=6.0)
    agent = wait_until(lambda: next((c for c in clean_stack.placed_calls() if c["to"] == AGENT
                                     and c["status"] == "completed"), None), 20)
    assert agent and not agent["hung_up_by_api"]  # the agent hung up by itself
    call = finished(clean_stack, sid)
    assert call["hung_up_by_api"] is ends_call, call
    assert call["said"] == [] and call["redirects"] == []
    session = only_session(emulator)
    assert wait_until(lambda: clean_stack.state.settled_ended(session["id"]))
    assert emulator.session(session["id"])["end_calls"] == 1
