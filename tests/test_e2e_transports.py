"""Whole calls on each transport × carrier over real sockets: the simulators (as Twilio and Telnyx) → the bridge
under gunicorn + gevent → the Kallglot emulator, which takes carrier media straight on its stream socket
(``direct``) or a SIP leg on its SIP endpoint (``sip``), with a real Redis."""
from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests

from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.carriers.telnyx.streams import MAX_STREAM_RESTARTS
from app.carriers.registry import carrier_names
from app.devtools.simulator.sip import SipDial
from app.devtools.simulator.telnyx import TexmlCallSimulator
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from app.profiles import NumberProfile, ProfileStore
from app.redis_keys import RedisKeys
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl, FakeCallControl, finished_call
from tests.support.numbers import CallNumbers
from tests.support.servers import RunningServer
from tests.support.settings import EMULATOR_API_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN
from tests.support.waiting import only_session, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def twilio(bridge_server: RunningServer) -> TwilioCallSimulator:
    return TwilioCallSimulator(bridge_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)


@pytest.fixture
def texml(telnyx_bridge_server: RunningServer, telnyx_signer) -> TexmlCallSimulator:
    return TexmlCallSimulator(telnyx_bridge_server.url, telnyx_signer)


@pytest.fixture
def profiles(redis_url: str) -> Iterator[dict[str, ProfileStore]]:
    """The number-profile stores of the Twilio (``e2e``) and Telnyx (``e2e-telnyx``) bridges under test."""
    client = redis_lib.Redis.from_url(redis_url)
    yield {namespace: ProfileStore(client, RedisKeys(namespace), NumberProfile(), carriers=carrier_names())
           for namespace in ("e2e", "e2e-telnyx")}
    client.close()


def ended_once(emulator: EmulatorControl, state: BridgeState, timeout: float = 8.0) -> dict:
    """The one session, once the bridge ended it exactly once and for good (nothing left due to end it again)."""
    session_id = only_session(emulator)["id"]
    assert wait_until(lambda: state.settled_ended(session_id), timeout), state.session(session_id)
    session = emulator.session(session_id)
    assert session["end_calls"] == 1 and emulator.stats()["double_end_calls"] == 0
    return session


def received(session: dict) -> bytes:
    return base64.b64decode(session["audio_received"].get("customer", ""))


def end_at_kallglot(emulator: EmulatorControl, session_id: str) -> None:
    """Kallglot's side ends the session (its dashboard, or its own 30-minute rule) while the call is up."""
    requests.post(f"{emulator.api_url}/sessions/{session_id}/end", timeout=5,
                  headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}).raise_for_status()


# ----- Twilio --------------------------------------------------------------------------------------------------------
def test_twilio_direct_call_streams_to_kallglot_not_the_bridge_and_ends_once(
        twilio: TwilioCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, bridge_state: BridgeState,
        profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e"].set(numbers.to, NumberProfile(transport="direct"))
    audio = os.urandom(40 * 160)
    result = twilio.place_call(numbers.to, numbers.from_, audio, pace=False, listen_seconds=1.0)
    assert result.errors == [] and result.protocol_errors == []
    session = ended_once(emulator, bridge_state)
    assert received(session) == audio  # every frame reached the session, in order, byte-exact
    assert [conn["carrier"] for conn in session["connections"]] == ["twilio"]  # Twilio itself, no relay
    assert result.heard_audio and audio.startswith(bytes(result.heard_audio))  # Kallglot's echo, straight back
    call = bridge_state.call("twilio", result.call_sid)
    assert call["transport"] == "direct" and call["state"] == "ended" and not call.get("stream")


def test_twilio_direct_call_whose_session_kallglot_ends_is_told_and_hung_up(
        twilio: TwilioCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, bridge_state: BridgeState,
        profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e"].set(numbers.to, NumberProfile(transport="direct"))

    def kallglot_ends_it(stream: SimulatedStream) -> None:
        end_at_kallglot(emulator, only_session(emulator)["id"])
        assert stream.wait_for(lambda s: s.server_closed, 5)

    result = twilio.place_call(numbers.to, numbers.from_, b"\xff" * 1600, pace=False, hold_open=kallglot_ends_it)
    assert SESSION_OVER_MESSAGE in result.said and result.hung_up  # told why, never dead air
    session_id = only_session(emulator)["id"]
    assert wait_until(lambda: bridge_state.settled_ended(session_id)), bridge_state.session(session_id)
    assert emulator.session(session_id)["end_calls"] == 1  # Kallglot's own end: the bridge did not end it again


def test_twilio_sip_call_is_a_sip_leg_on_the_session_and_ends_once(
        twilio: TwilioCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, bridge_state: BridgeState,
        profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e"].set(numbers.to, NumberProfile(transport="sip"))
    audio = os.urandom(10 * 160)
    seen: list[dict] = []
    result = twilio.place_call(numbers.to, numbers.from_, audio, pace=False,
                               hold_sip=lambda dial: seen.append(only_session(emulator)))
    (dial,) = result.sip_dials
    assert isinstance(dial, SipDial) and dial.answered and result.errors == []
    assert seen[0]["status"] == "active" and seen[0]["sip_legs"][0]["ended_at"] is None  # live during the call
    assert ("/twilio/dial-action", 200) in result.callbacks
    session = ended_once(emulator, bridge_state)
    assert session["routing"] == {"type": "sip"} and session["connections_total"] == 0
    (leg,) = session["sip_legs"]
    assert leg["ended_at"] is not None and leg["uri"] == dial.uri
    assert received(session) == audio and bytes(result.heard_audio) == audio
    assert bridge_state.call("twilio", result.call_sid)["end_reason"] == "dial_completed"


# ----- Telnyx TeXML --------------------------------------------------------------------------------------------------
def test_texml_direct_call_streams_to_kallglot_and_ends_once(
        texml: TexmlCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, redis_client: redis_lib.Redis,
        profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e-telnyx"].set(numbers.to, NumberProfile(carrier="telnyx", transport="direct"))
    audio = os.urandom(30 * 160)
    result = texml.place_call(numbers.to, numbers.from_, audio, listen_seconds=1.0)
    assert result.errors == [] and result.leg is not None and result.leg.protocol_errors == []
    assert set(result.custom_parameters) == {"token", "session_id"}
    session = ended_once(emulator, BridgeState(redis_client, "e2e-telnyx"))
    assert received(session) == audio
    assert [conn["carrier"] for conn in session["connections"]] == ["telnyx"]
    assert bytes(result.leg.heard) and audio.startswith(bytes(result.leg.heard))


def test_texml_direct_with_an_alaw_leg_kallglot_cannot_take_is_told_not_left_silent(
        texml: TexmlCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, redis_client: redis_lib.Redis,
        profiles: dict[str, ProfileStore]) -> None:
    """Kallglot takes μ-law only and a direct stream has no bridge to convert: an A-law leg is refused at Kallglot
    each time the stream is restored, then the caller hears the number's fallback, not silence (a PCMA number
    belongs on the relay)."""
    profiles["e2e-telnyx"].set(numbers.to, NumberProfile(carrier="telnyx", transport="direct"))
    result = texml.place_call(numbers.to, numbers.from_, b"\xd5" * 1600, encoding="PCMA")
    assert result.leg is not None and result.leg.server_closed_first and result.leg.close_code == 1003
    assert len(result.legs) == 1 + MAX_STREAM_RESTARTS  # the first stream and its restores, each refused
    assert UNAVAILABLE_MESSAGE in result.said and result.hung_up
    session = ended_once(emulator, BridgeState(redis_client, "e2e-telnyx"))
    assert "invalid_audio_format" in session["errors_sent"] and received(session) == b""


def test_texml_sip_call_is_a_sip_leg_on_the_session_and_ends_once(
        texml: TexmlCallSimulator, emulator: EmulatorControl, numbers: CallNumbers, redis_client: redis_lib.Redis,
        profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e-telnyx"].set(numbers.to, NumberProfile(carrier="telnyx", transport="sip"))
    audio = os.urandom(10 * 160)
    result = texml.place_call(numbers.to, numbers.from_, audio)
    (dial,) = result.sip_dials
    assert dial.answered and result.errors == []
    assert all(status == 200 for _, status in result.callbacks)
    session = ended_once(emulator, BridgeState(redis_client, "e2e-telnyx"))
    assert session["routing"] == {"type": "sip"} and len(session["sip_legs"]) == 1
    assert received(session) == audio


# ----- Telnyx Call Control -------------------------------------------------------------------------------------------
def test_call_control_direct_call_streams_to_kallglot_and_ends_once(
        fake_call_control: FakeCallControl, telnyx_bridge_server: RunningServer, emulator: EmulatorControl,
        numbers: CallNumbers, redis_client: redis_lib.Redis, profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e-telnyx"].set(numbers.to, NumberProfile(carrier="telnyx", transport="direct"))
    audio = os.urandom(20 * 160)
    call_id = fake_call_control.place_call(to=numbers.to, payload=base64.b64encode(audio).decode(),
                                           listen_seconds=1.0)
    call = finished_call(fake_call_control, call_id)
    # The fake reports streaming.stopped before call.hangup, and only Kallglot saw the caller's ``stop``: the bridge
    # may restore the stream once more before the hang-up lands (harmless: nothing streams, the session ends once).
    assert call["protocol_errors"] == [] and call["streams"] >= 1
    session = ended_once(emulator, BridgeState(redis_client, "e2e-telnyx"))
    assert received(session) == audio
    assert session["connections"][0]["carrier"] == "telnyx"
    heard = base64.b64decode(call["heard"])
    assert heard and audio.startswith(heard)


def test_call_control_sip_call_is_transferred_to_the_session_and_ends_once(
        fake_call_control: FakeCallControl, telnyx_bridge_server: RunningServer, emulator: EmulatorControl,
        numbers: CallNumbers, redis_client: redis_lib.Redis, profiles: dict[str, ProfileStore]) -> None:
    profiles["e2e-telnyx"].set(numbers.to, NumberProfile(carrier="telnyx", transport="sip"))
    audio = os.urandom(10 * 160)
    call_id = fake_call_control.place_call(to=numbers.to, payload=base64.b64encode(audio).decode())
    call = finished_call(fake_call_control, call_id)
    (dial,) = call["sip_dials"]
    assert dial["sip_status"] == 200 and call["streams"] == 0
    session = ended_once(emulator, BridgeState(redis_client, "e2e-telnyx"))
    assert session["routing"] == {"type": "sip"} and len(session["sip_legs"]) == 1
    assert call["transferred_to"] == f"sip:{session['id']}@{emulator.api_url.split('//')[1].split('/')[0]}"
    assert received(session) == audio
