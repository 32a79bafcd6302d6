"""Telnyx TeXML and Call Control through the same end-to-end scenarios as Twilio (issue 12): returning caller,
stream restored after ``kill -9`` of the relay's worker, fallback message and forward, agent no-answer / busy /
failed, Redis down, Kallglot down, duplicated and reordered webhooks — the bridge under gunicorn + gevent (two
workers), the TeXML simulator or the fake Telnyx, the Kallglot emulator, real Redis."""
from __future__ import annotations

import base64
import os
import signal
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests

from app.calls.prompts import AGENT_UNAVAILABLE_MESSAGE, UNAVAILABLE_MESSAGE
from app.carriers.registry import carrier_names
from app.devtools.simulator.telnyx import TelnyxMediaLeg, TexmlCallSimulator
from app.profiles import NumberProfile, ProfileStore
from app.redis_keys import RedisKeys
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl, FakeCallControl, finished_call
from tests.support.numbers import CallNumbers
from tests.support.relays import relay_pid
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import (
    E2E_GRACEFUL_TIMEOUT_SECONDS, TELNYX_CONNECTION_ID, e2e_bridge_env, telnyx_config,
)
from tests.support.waiting import only_session, wait_until

pytestmark = pytest.mark.e2e
NAMESPACE = "e2e-telnyx"  # the session-wide Telnyx bridge's (tests/conftest.py)
AGENT, FALLBACK = "+14155557770", "+14155550199"


@pytest.fixture
def texml(telnyx_bridge_server: RunningServer, telnyx_signer) -> TexmlCallSimulator:
    # A bound, not a timing claim: with a worker killed, the survivor serves every request while its replacement
    # imports (seconds on a loaded machine); a 10 s read timeout was seen to run out in CI at load 18.
    return TexmlCallSimulator(telnyx_bridge_server.url, telnyx_signer, timeout=20.0)


@pytest.fixture
def state(redis_client: redis_lib.Redis) -> BridgeState:
    return BridgeState(redis_client, NAMESPACE)


@pytest.fixture
def profiles(redis_client: redis_lib.Redis) -> ProfileStore:
    """The Telnyx bridge's number profiles (its namespace is flushed before each test)."""
    return ProfileStore(redis_client, RedisKeys(NAMESPACE), NumberProfile(), carriers=carrier_names())


def ended_once(emulator: EmulatorControl, state: BridgeState, timeout: float = 15.0) -> dict:
    """The one session is ended, once, for good (nothing left due that could end it again)."""
    session = only_session(emulator)
    assert wait_until(lambda: state.settled_ended(session["id"]), timeout), state.session(session["id"])
    assert emulator.session(session["id"])["end_calls"] == 1 and emulator.stats()["double_end_calls"] == 0
    return session


def customer_audio(emulator: EmulatorControl) -> bytes:
    return base64.b64decode(only_session(emulator)["audio_received"].get("customer", ""))


# ----- returning caller --------------------------------------------------------------------------------------------
def test_texml_returning_caller_reattaches_to_the_held_session(texml: TexmlCallSimulator, emulator: EmulatorControl,
                                                               state: BridgeState, numbers: CallNumbers) -> None:
    first = texml.place_call(*numbers, b"\x01" * 800, callbacks="none", listen_seconds=0,
                             hold_open=lambda leg: leg.close_abruptly())
    assert first.errors == [] and len(first.legs) == 1
    session_id = only_session(emulator)["id"]
    # The relay notices the dropped socket and holds the session for the reconnect window.
    assert wait_until(lambda: state.redis.exists(state.keys.held(*numbers)))
    second = texml.place_call(*numbers, b"\x02" * 800, listen_seconds=0.5)
    assert second.errors == [] and second.leg is not None and second.leg.protocol_errors == []
    session = only_session(emulator)  # no second session
    assert session["id"] == session_id and session["connections_total"] == 2
    assert customer_audio(emulator) == b"\x01" * 800 + b"\x02" * 800
    ended_once(emulator, state)


def test_call_control_returning_caller_reattaches_to_the_held_session(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        state: BridgeState, numbers: CallNumbers) -> None:
    to, caller = numbers
    first = fake_call_control.place_call(to=to, **{"from": caller}, vanish=True,
                                         payload=base64.b64encode(b"\x01" * 800).decode())
    assert wait_until(lambda: state.redis.exists(state.keys.held(to, caller)), 15), fake_call_control.call(first)
    session_id = only_session(emulator)["id"]
    second = fake_call_control.place_call(to=to, **{"from": caller}, listen_seconds=0.5,
                                          payload=base64.b64encode(b"\x02" * 800).decode())
    call = finished_call(fake_call_control, second)
    assert call["protocol_errors"] == [] and [c["action"] for c in call["commands"]] == ["answer", "streaming_start"]
    session = only_session(emulator)
    assert session["id"] == session_id and session["connections_total"] == 2
    assert customer_audio(emulator) == b"\x01" * 800 + b"\x02" * 800
    ended_once(emulator, state)


# ----- stream restored after kill -9 of the relay's worker --------------------------------------------------------
def test_texml_worker_killed_mid_call_the_stream_is_restored(texml: TexmlCallSimulator, emulator: EmulatorControl,
                                                             telnyx_bridge_server: RunningServer, state: BridgeState,
                                                             numbers: CallNumbers) -> None:
    killed: list[int] = []

    def kill_the_relay_worker(leg: TelnyxMediaLeg) -> None:
        # Bounds, not timing claims: on a loaded machine the relay takes a while to start.
        assert wait_until(lambda: only_session(emulator)["connections_live"] == 1, 20)
        pid = relay_pid(telnyx_bridge_server, leg.call_control_id, timeout=20)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        assert leg.wait_for(lambda r: r.server_closed_first, 10)

    result = texml.place_call(*numbers, b"\x11" * 800, listen_seconds=1.0, hold_open=kill_the_relay_worker,
                              restore_audio=b"\x12" * 800)
    # The <Redirect> after <Connect> restored the stream into the same session on a live worker: no goodbye.
    assert killed and len(result.legs) == 2 and result.said == [] and not result.hung_up, result
    assert result.legs[1].protocol_errors == [] and not result.legs[1].server_closed_first
    session = only_session(emulator)
    assert session["connections_total"] == 2
    assert customer_audio(emulator).endswith(b"\x12" * 800)
    ended_once(emulator, state)


# ----- fallback message and forward -------------------------------------------------------------------------------
SPANISH_FALLBACK = NumberProfile(fallback_message="Lo sentimos, no hay traducción ahora.", fallback_language="es-ES",
                                 fallback_number=FALLBACK)


def test_texml_kallglot_down_says_the_profiles_message_and_forwards(texml: TexmlCallSimulator,
                                                                    emulator: EmulatorControl, profiles: ProfileStore,
                                                                    numbers: CallNumbers) -> None:
    profiles.set(numbers.to, SPANISH_FALLBACK)
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    result = texml.place_call(*numbers, b"\xff" * 800)
    assert result.webhook_status == 200 and result.legs == []
    assert (result.said, result.dialled) == ([SPANISH_FALLBACK.fallback_message], [FALLBACK])
    assert 'language="es-ES"' in result.texml[0]
    assert emulator.sessions() == []


def test_call_control_kallglot_down_says_the_profiles_message_and_transfers(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        profiles: ProfileStore, numbers: CallNumbers) -> None:
    profiles.set(numbers.to, SPANISH_FALLBACK)
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    call = finished_call(fake_call_control, fake_call_control.place_call(to=numbers.to, **{"from": numbers.from_}))
    assert [c["action"] for c in call["commands"]] == ["answer", "speak", "transfer"]
    assert call["spoken"] == [SPANISH_FALLBACK.fallback_message]
    assert call["commands"][1]["body"]["language"] == "es-ES" and call["transferred_to"] == FALLBACK
    assert emulator.sessions() == []


# ----- agent no-answer / busy / failed ----------------------------------------------------------------------------
def unanswered(fake: FakeCallControl, number: str, cause: str) -> None:
    requests.post(fake.url + "/_fake/unanswered", json={number: cause}, timeout=5).raise_for_status()


def customer_commands(fake: FakeCallControl, call_id: str, action: str) -> list[dict]:
    return [c for c in fake.commands(action) if c["call_control_id"] == call_id]


@pytest.mark.parametrize("cause", ["no_answer", "user_busy", "call_rejected"])
def test_call_control_agent_who_does_not_answer_leaves_the_customer_told_and_on_the_session(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        state: BridgeState, profiles: ProfileStore, numbers: CallNumbers, cause: str) -> None:
    profiles.set(numbers.to, NumberProfile(carrier="telnyx", agent_number=AGENT, agent_hangup_ends_call=True))
    unanswered(fake_call_control, AGENT, cause)
    # The customer stays on long enough for the agent to be dialled and not answer, even on a loaded machine.
    call_id = fake_call_control.place_call(to=numbers.to, **{"from": numbers.from_}, listen_seconds=8.0,
                                           payload=base64.b64encode(b"\x01" * 1600).decode())
    call = finished_call(fake_call_control, call_id, timeout=40)
    (speak,) = customer_commands(fake_call_control, call_id, "speak")
    assert speak["body"]["payload"] == AGENT_UNAVAILABLE_MESSAGE
    # Nobody hung the customer up: the caller hung up at the end of the call (the fake's own normal_clearing).
    assert customer_commands(fake_call_control, call_id, "hangup") == []
    assert customer_commands(fake_call_control, call_id, "transfer") == []
    assert call["streams"] == 1 and call["close_codes"] == [None]  # the stream ran on until the caller left
    agent = next(c for c in fake_call_control.commands("dial"))
    assert state.call("telnyx", agent["call_control_id"])["end_reason"] == f"hangup_{cause}"
    ended_once(emulator, state)


def test_call_control_agent_unavailable_forwards_to_the_fallback_number(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        state: BridgeState, profiles: ProfileStore, numbers: CallNumbers) -> None:
    profiles.set(numbers.to, NumberProfile(carrier="telnyx", agent_number=AGENT, fallback_number=FALLBACK))
    unanswered(fake_call_control, AGENT, "user_busy")
    call_id = fake_call_control.place_call(to=numbers.to, **{"from": numbers.from_}, listen_seconds=6.0,
                                           payload=base64.b64encode(b"\x01" * 1600).decode())
    call = finished_call(fake_call_control, call_id, timeout=30)
    assert call["spoken"] == [AGENT_UNAVAILABLE_MESSAGE] and call["transferred_to"] == FALLBACK
    ended_once(emulator, state)


def test_texml_agent_who_does_not_answer_is_told_through_call_control_and_stays_on(
        texml: TexmlCallSimulator, fake_call_control: FakeCallControl, emulator: EmulatorControl,
        state: BridgeState, profiles: ProfileStore, numbers: CallNumbers) -> None:
    """A TeXML customer's agent is dialled through Call Control (TELNYX_CONNECTION_ID); when it does not answer
    the customer is told with ``speak`` on its call_control_id (TeXML's CallSid is one) and stays streaming."""
    profiles.set(numbers.to, NumberProfile(carrier="telnyx", agent_number=AGENT))
    unanswered(fake_call_control, AGENT, "no_answer")
    told: list[dict] = []

    def until_told(leg: TelnyxMediaLeg) -> None:
        told.extend(wait_until(lambda: customer_commands(fake_call_control, leg.call_control_id, "speak"), 15) or [])

    result = texml.place_call(*numbers, b"\x01" * 800, listen_seconds=0.5, hold_open=until_told)
    assert [t["body"]["payload"] for t in told] == [AGENT_UNAVAILABLE_MESSAGE]
    assert result.leg is not None and not result.leg.server_closed_first  # still streaming; the caller hung up
    assert fake_call_control.commands("dial")[0]["body"]["connection_id"] == TELNYX_CONNECTION_ID
    ended_once(emulator, state)


# ----- duplicated and reordered webhooks ---------------------------------------------------------------------------
@pytest.mark.parametrize("callbacks", ["twice", "reversed"])
def test_texml_duplicated_and_reordered_callbacks_end_the_session_once(texml: TexmlCallSimulator,
                                                                       emulator: EmulatorControl,
                                                                       state: BridgeState, numbers: CallNumbers,
                                                                       callbacks: str) -> None:
    result = texml.place_call(*numbers, b"\x01" * 800, listen_seconds=0.5, callbacks=callbacks)
    assert result.errors == [] and len(result.callbacks) == (4 if callbacks == "twice" else 2)
    assert all(status == 200 for _, status in result.callbacks)
    ended_once(emulator, state)


def test_call_control_hangup_before_streaming_stopped_ends_once_without_a_restore(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        state: BridgeState, numbers: CallNumbers) -> None:
    call_id = fake_call_control.place_call(to=numbers.to, **{"from": numbers.from_}, listen_seconds=0.5,
                                           reverse_final_webhooks=True, duplicate_webhooks=True,
                                           payload=base64.b64encode(b"\x01" * 800).decode())
    finished_call(fake_call_control, call_id)
    # streaming.stopped is delivered after call.hangup here: wait for both copies of it too.
    call = wait_until(lambda: (c := fake_call_control.call(call_id)) and
                      [w["event"] for w in c["webhooks"]].count("streaming.stopped") == 2 and c)
    assert call, fake_call_control.call(call_id)
    events = [w["event"] for w in call["webhooks"]]
    assert events.index("call.hangup") < events.index("streaming.stopped")  # delivered out of order (twice)
    assert [c["action"] for c in call["commands"]] == ["answer", "streaming_start"]  # nothing restored after
    ended_once(emulator, state)


# ----- Redis down --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bridge_without_redis(emulator_server: RunningServer, telnyx_signer,
                         fake_call_control_server: RunningServer) -> Iterator[RunningServer]:
    """A Telnyx bridge whose Redis is down (nothing listens at its REDIS_URL)."""
    port = free_port()
    env = {**telnyx_config(e2e_bridge_env(f"redis://127.0.0.1:{free_port()}/0", emulator_server.url + "/v1",
                                          "e2e-no-redis", f"http://127.0.0.1:{port}"),
                           telnyx_signer.public_key, fake_call_control_server.url + "/v2"),
           "TELNYX_CONNECTION_ID": TELNYX_CONNECTION_ID}
    with run_gunicorn("app:create_app()", env, workers=1, port=port,
                      graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server


def test_texml_with_redis_down_answers_the_fallback(bridge_without_redis: RunningServer, telnyx_signer,
                                                    emulator: EmulatorControl, numbers: CallNumbers) -> None:
    result = TexmlCallSimulator(bridge_without_redis.url, telnyx_signer).place_call(*numbers, b"\xff" * 800)
    assert result.webhook_status == 200
    assert result.said == [UNAVAILABLE_MESSAGE] and result.hung_up and result.legs == []
    root = ET.fromstring(result.texml[0])
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert emulator.sessions() == []  # nothing created that could not be tracked


def test_call_control_with_redis_down_answers_speaks_and_hangs_up(bridge_without_redis: RunningServer,
                                                                  fake_call_control: FakeCallControl,
                                                                  emulator: EmulatorControl,
                                                                  numbers: CallNumbers) -> None:
    call_id = fake_call_control.place_call(to=numbers.to, **{"from": numbers.from_},
                                           webhook_url=bridge_without_redis.url + "/telnyx/call-control")
    call = finished_call(fake_call_control, call_id)
    # Answered (a 503 would leave the caller ringing), told why, hung up: never ringing, never dead air.
    assert [c["action"] for c in call["commands"]] == ["answer", "speak", "hangup"]
    assert call["spoken"] == [UNAVAILABLE_MESSAGE]
    # Every event that drives what the caller hears is acknowledged; only ``call.hangup``, which has nothing to
    # record without Redis, asks Telnyx to deliver it again later (503).
    statuses = {w["event"]: w["status"] for w in call["webhooks"]}
    assert {event: status for event, status in statuses.items() if event != "call.hangup"} == {
        "call.initiated": 200, "call.answered": 200, "call.speak.started": 200, "call.speak.ended": 200}, statuses
    assert emulator.sessions() == []


# ----- the voice webhook fails (its worker killed mid-request): the failover URL answers ----------------------------
class PrimaryDown(TexmlCallSimulator):
    """Telnyx whose request to the voice webhook got no answer (the worker serving it was killed)."""

    def post_form(self, url: str, params: dict[str, str], **kwargs) -> requests.Response:
        if url.endswith("/telnyx/texml"):
            raise requests.ConnectionError("Remote end closed connection without response")
        return super().post_form(url, params, **kwargs)


def test_texml_voice_webhook_failing_the_failover_url_says_why_and_hangs_up(
        telnyx_bridge_server: RunningServer, telnyx_signer, emulator: EmulatorControl, numbers: CallNumbers) -> None:
    simulator = PrimaryDown(telnyx_bridge_server.url, telnyx_signer)
    result = simulator.place_call(*numbers, b"\xff" * 800,
                                  fallback_url=telnyx_bridge_server.url + "/telnyx/texml/fallback")
    assert result.webhook_status == 200 and result.said == [UNAVAILABLE_MESSAGE] and result.hung_up
    assert result.legs == [] and emulator.sessions() == []
    # Unsigned, the failover URL is refused like every Telnyx route.
    assert requests.post(telnyx_bridge_server.url + "/telnyx/texml/fallback", data="CallSid=v3:abcdefgh",
                         timeout=5, headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 403
