"""Whole Telnyx calls over real sockets: TeXML through the simulator, Call Control through the fake Telnyx
(REST API + call side) → the bridge under gunicorn + gevent (two workers) → the Kallglot emulator, real Redis."""
from __future__ import annotations

import base64
import json
import os
import threading
import warnings
from typing import Any

import pytest
import redis as redis_lib
import requests

from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.carriers.registry import carrier_names
from app.devtools.simulator.telnyx import TelnyxMediaLeg, TexmlCallSimulator, new_call_control_id
from tests.support.waiting import only_session, wait_until
from tests.support.controls import EmulatorControl, FakeCallControl, finished_call
from tests.support.bridge_state import BridgeState
from tests.support.settings import E2E_RECONNECT_BACKOFF_MS, E2E_RECONNECT_WINDOW_SECONDS, EMULATOR_API_KEY
from tests.support.servers import RunningServer
from tests.support.numbers import new_numbers
from tests.support.signals import pcm, samples, snr_db, voiced

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

pytestmark = pytest.mark.e2e
#: Long enough for a lost leg's hold to expire and the reaper to end the session.
HOLD_SETTLE_SECONDS = E2E_RECONNECT_WINDOW_SECONDS + 6
#: The relay's reopen backoff in the bridge under test (seconds).
BACKOFF = [int(ms) / 1000 for ms in E2E_RECONNECT_BACKOFF_MS.split(",")]


@pytest.fixture
def texml(telnyx_bridge_server: RunningServer, telnyx_signer) -> TexmlCallSimulator:
    return TexmlCallSimulator(telnyx_bridge_server.url, telnyx_signer)


@pytest.fixture
def telnyx_state(redis_client: redis_lib.Redis) -> BridgeState:
    """The Redis state of the Telnyx bridge under test."""
    return BridgeState(redis_client, "e2e-telnyx")


def ended_once(emulator: EmulatorControl, state: BridgeState, timeout: float = 8.0) -> None:
    """The one session is ended by the bridge, exactly once, for good: its end is recorded and nothing is left
    due that could end it again (no sleeping and counting: a late duplicate would need a deadline)."""
    session_id = only_session(emulator)["id"]
    assert wait_until(lambda: state.settled_ended(session_id), timeout), state.session(session_id)
    assert emulator.session(session_id)["end_calls"] == 1
    assert emulator.stats()["double_end_calls"] == 0


def received_audio(emulator: EmulatorControl) -> bytes:
    return base64.b64decode(only_session(emulator)["audio_received"].get("customer", ""))


# ----- TeXML -----------------------------------------------------------------------------------------------------
def test_texml_call_bridges_audio_both_ways_and_ends_once(texml: TexmlCallSimulator,
                                                          emulator: EmulatorControl,
                                                          telnyx_state: BridgeState) -> None:
    audio = os.urandom(53 * 160)
    to, from_ = new_numbers()  # numbers of this test's own
    result = texml.place_call(to, from_, audio, listen_seconds=1.5)
    assert result.errors == [] and result.leg is not None and result.leg.protocol_errors == []
    assert result.stream_attributes["bidirectionalMode"] == "rtp"
    assert result.stream_attributes["bidirectionalCodec"] == "PCMU"
    assert set(result.custom_parameters) == {"session_id", "relay_token", "telnyx_flow"}
    session = only_session(emulator)
    assert received_audio(emulator) == audio  # PCMU passes through byte-exact, in order
    assert session["routing"] == {"phone_number": to}
    assert session["metadata"]["telnyx_call_control_id"] == result.call_sid
    assert session["idempotency_key"] == f"telnyx-call-{result.call_sid}"
    # Kallglot's echo of everything: the remainder went after UPLINK_QUIET_FLUSH_MS of quiet, mid-call.
    assert bytes(result.leg.heard) == audio
    # One mark per utterance of return audio, named in order (the echo of 53 frames is at least one utterance).
    marks = result.leg.marks_received
    assert len(marks) >= 1 and marks == [f"utt-{n}" for n in range(1, len(marks) + 1)], marks
    assert all(status == 200 for _, status in result.callbacks)  # Telnyx retries anything else at the failover URL
    ended_once(emulator, telnyx_state)


def test_texml_pcma_leg_out_of_order_reaches_kallglot_as_the_same_speech(texml: TexmlCallSimulator,
                                                                           emulator: EmulatorControl,
                                                                           telnyx_state: BridgeState) -> None:
    speech = pcm(voiced(8000, 1.5))
    alaw = audioop.lin2alaw(speech, 2)
    result = texml.place_call(*new_numbers(), alaw, encoding="PCMA", reorder=True, duplicate=True, listen_seconds=0.3)
    assert result.errors == [] and result.leg.protocol_errors == []
    got = received_audio(emulator)
    assert len(got) == len(alaw)  # reordered, de-duplicated, nothing lost
    assert snr_db(samples(audioop.alaw2lin(alaw, 2)), samples(audioop.ulaw2lin(got, 2))) > 30
    ended_once(emulator, telnyx_state)


def test_texml_kallglot_down_says_something_and_hangs_up(texml: TexmlCallSimulator,
                                                         emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    result = texml.place_call(*new_numbers(), b"\xff" * 800)
    assert result.webhook_status == 200 and result.leg is None
    assert result.said == [UNAVAILABLE_MESSAGE] and result.hung_up
    assert emulator.sessions() == []


def test_texml_kallglot_ending_the_session_runs_the_goodbye(texml: TexmlCallSimulator,
                                                           emulator: EmulatorControl,
                                                           telnyx_state: BridgeState) -> None:
    def end_at_kallglot() -> None:
        session = wait_until(lambda: [s for s in emulator.sessions() if s["connections_live"] == 1])
        requests.post(f"{emulator.api_url}/sessions/{session[0]['id']}/end", timeout=5,
                      headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}).raise_for_status()

    ender = threading.Thread(target=end_at_kallglot, daemon=True)
    ender.start()
    result = texml.place_call(*new_numbers(), b"\xff" * 800, listen_seconds=5)
    ender.join(timeout=5)
    assert result.leg is not None and result.leg.server_closed_first
    assert result.said == [SESSION_OVER_MESSAGE] and result.hung_up  # the verbs after <Connect>: never dead air
    session_id = only_session(emulator)["id"]
    assert wait_until(lambda: telnyx_state.settled_ended(session_id))
    assert telnyx_state.end_claim(session_id).startswith("ended:kallglot:")
    assert only_session(emulator)["end_calls"] == 1  # the test's own: the bridge did not end it again


def test_media_socket_refuses_a_forged_relay_token(telnyx_bridge_server: RunningServer, texml: TexmlCallSimulator,
                                                   emulator: EmulatorControl) -> None:
    call_sid = new_call_control_id()
    answer = texml.post_form(texml.public_url + "/telnyx/texml", texml.call_params(call_sid, *new_numbers(), "ringing"))
    token = answer.text.split('name="relay_token" value="')[1].split('"')[0]
    url = telnyx_bridge_server.url.replace("http://", "ws://") + "/telnyx/media"
    for forged in (token[:10] + ("x" if token[10] != "x" else "y") + token[11:], ""):
        leg = TelnyxMediaLeg(url, call_control_id=call_sid, custom_parameters={"relay_token": forged}, timeout=5)
        leg.begin()
        assert leg.wait_for(lambda r: r.server_closed_first, 5) and leg.result.close_code == 1008
    assert only_session(emulator)["connections_total"] == 0


# ----- Call Control ----------------------------------------------------------------------------------------------
def refused_commands(fake: FakeCallControl) -> list[dict[str, Any]]:
    """Commands the fake answered 422: bodies the telnyx SDK's own types do not allow."""
    return requests.get(fake.url + "/_fake/commands", timeout=5).json()["refused"]



def test_call_control_l16_leg_with_duplicate_webhooks(fake_call_control: FakeCallControl,
                                                      emulator: EmulatorControl,
                                                      telnyx_bridge_server: RunningServer,
                                                      telnyx_state: BridgeState) -> None:
    wide = voiced(16000, 1.5)
    call_id = fake_call_control.place_call(
        to=new_numbers().to, encoding="L16", sample_rate=16000, payload=base64.b64encode(pcm(wide, ">")).decode(),
        listen_seconds=1.0, duplicate_webhooks=True, reorder_media=True)
    call = finished_call(fake_call_control, call_id)
    assert call["protocol_errors"] == []
    # call.initiated and call.answered arrived twice, concurrently: each handled once. ``answer`` carries no
    # stream (it defines neither stream_auth_token nor custom_parameters); call.answered starts streaming.
    assert [c["action"] for c in call["commands"]] == ["answer", "streaming_start"]
    assert refused_commands(fake_call_control) == []
    body = call["commands"][1]["body"]
    assert body["stream_url"].endswith("/telnyx/media")
    assert (body["stream_bidirectional_mode"], body["stream_bidirectional_codec"]) == ("rtp", "PCMU")
    assert body["stream_codec"] == "PCMU"
    assert body["stream_track"] == "inbound_track" and body["command_id"] and body["client_state"]
    assert body["stream_auth_token"] and "kst_" not in json.dumps(call["webhooks"])
    got = received_audio(emulator)
    assert len(got) == 12000  # 1.5 s at 8 kHz
    assert snr_db(voiced(8000, 1.5), samples(audioop.ulaw2lin(got, 2)), lag=16) > 30
    assert len(base64.b64decode(call["heard"])) >= 8000  # Kallglot's echo came back as PCMU
    # Every event was handled (a 200); a copy that arrived while its twin was being handled got 503 and is
    # redelivered (its later attempts may land after the call is over): nothing else, no failure.
    assert {w["status"] for w in call["webhooks"]} <= {200, 503}, call["webhooks"]
    assert {w["event"] for w in call["webhooks"] if w["status"] == 200} == {w["event"] for w in call["webhooks"]}
    ended_once(emulator, telnyx_state)
    session = only_session(emulator)
    assert session["metadata"]["telnyx_call_control_id"] == call_id


def test_call_control_kallglot_down_answers_speaks_and_hangs_up(fake_call_control: FakeCallControl,
                                                                emulator: EmulatorControl,
                                                                telnyx_bridge_server: RunningServer) -> None:
    emulator.fault(endpoint="create", status=503, code="service_unavailable", times=5)
    call_id = fake_call_control.place_call(to=new_numbers().to)
    call = finished_call(fake_call_control, call_id)
    assert [c["action"] for c in call["commands"]] == ["answer", "speak", "hangup"]
    assert "stream_url" not in call["commands"][0]["body"]
    assert call["spoken"] and "not available" in call["spoken"][0]
    assert emulator.sessions() == []


def test_call_control_streaming_failed_is_retried_once(fake_call_control: FakeCallControl,
                                                       emulator: EmulatorControl,
                                                       telnyx_bridge_server: RunningServer,
                                                       telnyx_state: BridgeState) -> None:
    audio = os.urandom(1600)
    call_id = fake_call_control.place_call(to=new_numbers().to, payload=base64.b64encode(audio).decode(),
                                           fail_first_stream=True,
                                           listen_seconds=0.5)
    call = finished_call(fake_call_control, call_id)
    assert [c["action"] for c in call["commands"]] == ["answer", "streaming_start", "streaming_start"]
    assert call["commands"][2]["body"]["stream_auth_token"] and call["streams"] == 2
    assert only_session(emulator)["connections_total"] == 1
    ended_once(emulator, telnyx_state)


def test_call_control_kallglot_stream_unreachable_is_not_dead_air(fake_call_control: FakeCallControl,
                                                                  emulator: EmulatorControl,
                                                                  telnyx_bridge_server: RunningServer) -> None:
    # Every attempt fails, the first open and the relay's reopen attempts alike.
    emulator.fault(endpoint="connect", status=503, times=1 + len(BACKOFF))
    call_id = fake_call_control.place_call(to=new_numbers().to, payload=base64.b64encode(b"\xff" * 800).decode(),
                                           listen_seconds=sum(BACKOFF) + 5)
    call = finished_call(fake_call_control, call_id, timeout=sum(BACKOFF) + 10)
    assert [c["action"] for c in call["commands"]] == ["answer", "streaming_start", "speak", "hangup"]
    # The product's answer to an unreachable Kallglot is the spoken fallback, then a hang-up (asserted above):
    # whether its 1011 close or the fake's own close on that hang-up reaches the socket first is a race between
    # two sockets, so the close code says nothing about the product and is not asserted.
    assert call["spoken"] and len(call["close_codes"]) == 1
    assert wait_until(lambda: emulator.session(only_session(emulator)["id"])["status"] == "ended",
                      HOLD_SETTLE_SECONDS)


def test_call_control_agent_leg_is_dialled_streams_and_is_hung_up_with_the_customer(
        fake_call_control: FakeCallControl, emulator: EmulatorControl, telnyx_bridge_server: RunningServer,
        redis_url: str, telnyx_state: BridgeState) -> None:
    import redis as redis_lib

    from app.profiles import NumberProfile, ProfileStore
    from app.redis_keys import RedisKeys

    agent = "+14155557770"
    client = redis_lib.Redis.from_url(redis_url)
    store = ProfileStore(client, RedisKeys("e2e-telnyx"), NumberProfile(), carriers=carrier_names())
    to = new_numbers().to  # a number of this test's own (its profile names the agent)
    store.set(to, NumberProfile(carrier="telnyx", agent_number=agent))
    try:
        # The customer talks, then listens long enough for the agent to be dialled, answer and talk.
        call_id = fake_call_control.place_call(to=to, payload=base64.b64encode(b"\xff" * 1600).decode(),
                                               listen_seconds=3.0)
        session = wait_until(lambda: emulator.sessions() and emulator.sessions()[0], timeout=5)
        assert wait_until(lambda: emulator.session(session["id"])["audio_input_messages"].get("agent", 0) >= 10)
        customer = finished_call(fake_call_control, call_id)
        assert customer["protocol_errors"] == []
        dials = [c for c in fake_call_control.commands() if c["action"] == "dial"]
        assert len(dials) == 1
        dial = dials[0]
        assert (dial["body"]["to"], dial["body"]["from"]) == (agent, to)
        assert dial["body"]["connection_id"] == "1494404757140276705"
        # The customer hung up (normal_clearing): the bridge hung the agent up, and the session ended once.
        agent_call = wait_until(lambda: (c := fake_call_control.call(dial["call_control_id"]))["hung_up"] and c)
        assert agent_call and any(c["action"] == "hangup" for c in agent_call["commands"])
        # The agent heard Kallglot on its own leg (its media socket's result lands just after the hang-up).
        assert wait_until(lambda: len(base64.b64decode(fake_call_control.call(dial["call_control_id"])["heard"]))
                          >= 1600), fake_call_control.call(dial["call_control_id"])
        ended_once(emulator, telnyx_state)
        assert set(only_session(emulator)["audio_received"]) == {"customer", "agent"}
    finally:
        store.delete(to)
        client.close()
