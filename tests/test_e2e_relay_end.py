"""How a relay ends, over real sockets (simulator → bridge under gunicorn + gevent → emulator): no caller byte
is lost at the end, every Kallglot stream closes with a closing handshake (1000), and a leg restored after a
fatal frame stays live."""
from __future__ import annotations

import base64
import concurrent.futures
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests

from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.settings import (
    E2E_GRACEFUL_TIMEOUT_SECONDS, EMULATOR_API_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, e2e_bridge_env,
)
from tests.support.bridge_state import BridgeState
from tests.support.numbers import new_numbers
from tests.support.server_log import closed_media_sockets
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.waiting import only_session, wait_until

pytestmark = pytest.mark.e2e

#: Return audio Kallglot keeps pushing while the caller hangs up (20 ms μ-law frames): the relay's socket has
#: unread input when the relay ends, the case where closing without a handshake makes the kernel reset the
#: connection and discard the relay's last audio and its close frame.
PUSH = [{"type": "audio.output", "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                            "payload": base64.b64encode(bytes([0x10 + n % 100]) * 160).decode()}}
        for n in range(100)]


class KallglotPusher:
    """Pushes return audio to a session's stream connections, over and over, until stopped."""

    def __init__(self, emulator: EmulatorControl, session_id: str) -> None:
        self._emulator, self._session_id = emulator, session_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self._emulator.send(self._session_id, *PUSH):
            pass

    def __enter__(self) -> KallglotPusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def simulator(bridge_server: RunningServer) -> TwilioCallSimulator:
    return TwilioCallSimulator(bridge_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)


def close_codes(emulator: EmulatorControl, session_id: str) -> list[int | None]:
    """The close code the emulator saw on each of the session's stream connections, once all have closed."""
    assert wait_until(lambda: emulator.session(session_id)["connections_live"] == 0, timeout=10)
    return [conn["close_code"] for conn in emulator.session(session_id)["connections"]]


@pytest.mark.parametrize("attempt", range(3))
def test_kallglot_audio_arriving_at_hang_up_loses_no_caller_byte_and_closes_normally(
        simulator: TwilioCallSimulator, emulator: EmulatorControl, attempt: int) -> None:
    # 27 frames: five full 100 ms chunks, echoed back, and a 320-byte remainder that is flushed only at the stop,
    # while Kallglot's echoes and a 2 s burst are still arriving on the relay's socket.
    audio = os.urandom(27 * 160)

    pushers: list[KallglotPusher] = []

    def push_then_hang_up(stream: SimulatedStream) -> None:
        session_id = only_session(emulator)["id"]
        assert wait_until(lambda: emulator.session(session_id)["connections_live"] == 1, timeout=5)
        pushers.append(KallglotPusher(emulator, session_id).__enter__())
        assert stream.wait_for(lambda s: len(s.heard) > 160 * 50, timeout=5)  # Kallglot's audio is flowing
        # Return: the simulator sends ``stop`` while Kallglot's audio keeps arriving.

    numbers = new_numbers()
    try:
        result = simulator.place_call(numbers.to, numbers.from_, audio, pace=False, listen_seconds=0,
                                      hold_open=push_then_hang_up)
    finally:
        for pusher in pushers:
            pusher.__exit__()
    assert result.protocol_errors == [] and result.errors == []
    # The caller's ``stop`` has gone out, but the relay flushes and closes on its own time (seconds, on a loaded
    # machine): read what Kallglot received only once the relay's Kallglot socket has closed.
    session_id = only_session(emulator)["id"]
    assert close_codes(emulator, session_id) == [1000]
    session = only_session(emulator)
    assert base64.b64decode(session["audio_received"]["customer"]) == audio
    assert session["audio_input_messages"]["customer"] == 6


def test_a_restored_leg_after_a_fatal_frame_is_live_and_a_clean_stop_ends_the_session_at_once(
        simulator: TwilioCallSimulator, emulator: EmulatorControl, bridge_server: RunningServer,
        redis_client: redis_lib.Redis) -> None:
    state = BridgeState(redis_client, "e2e")
    numbers = new_numbers()
    call_sid = "CA" + uuid.uuid4().hex

    def send_a_fatal_frame(stream: SimulatedStream) -> None:
        stream.send_raw(b"\x00binary")  # fatal for Twilio's protocol: the relay closes with 1003
        assert stream.wait_for(lambda s: s.server_closed, timeout=5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        # The restored stream stays open (listening) for 3 s, then the caller stops; the checks run meanwhile.
        call = pool.submit(simulator.place_call, numbers.to, numbers.from_, b"\x02" * 800, pace=False,
                           call_sid=call_sid, hold_open=send_a_fatal_frame, listen_seconds=3,
                           restore_audio=b"\x03" * 800)
        assert wait_until(lambda: len(emulator.sessions()) == 1
                          and only_session(emulator)["connections_total"] == 2
                          and only_session(emulator)["connections_live"] == 1, timeout=8)
        session_id = only_session(emulator)["id"]
        # The old relay's end was recorded before its socket closed, so nothing ends the restored leg: it is
        # live, with a running heartbeat, once the old socket's handler has finished its whole teardown (its
        # last log line); the restored socket is still open (it listens for 3 s).
        assert wait_until(lambda: closed_media_sockets(bridge_server, call_id=call_sid), timeout=8)
        assert len(closed_media_sockets(bridge_server, call_id=call_sid)) == 1
        assert state.call("twilio", call_sid)["state"] == "live"
        assert state.has_live_heartbeat("twilio", call_sid)
        assert state.session(session_id)["status"] == "active"
        result = call.result(timeout=30)
    assert result.streams == 2
    assert any("code 1003" in event for _, event in result.timeline)
    # The caller's clean stop (not a hold expiring) ended the session, straight away.
    assert wait_until(lambda: state.settled_ended(session_id), timeout=5)
    record = state.session(session_id)
    assert record["end_reason"] == "relay_carrier_stop"
    assert emulator.session(session_id)["end_calls"] == 1
    session = emulator.session(session_id)
    assert base64.b64decode(session["audio_received"]["customer"]) == b"\x02" * 800 + b"\x03" * 800
    assert close_codes(emulator, session_id) == [1000, 1000]



#: Stream tokens of the short-lived emulator expire this soon after they are minted.
SHORT_TOKEN_TTL_SECONDS = 2


@pytest.fixture(scope="module")
def short_token_stack(redis_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    """An emulator whose stream tokens expire within seconds, and a one-worker bridge in front of it."""
    with run_gunicorn("app.devtools.emulator:create_emulator_app()",
                      {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_API_KEY,
                       "KALLGLOT_EMULATOR_STREAM_TOKEN_TTL": str(SHORT_TOKEN_TTL_SECONDS)},
                      ready_path="/_emulator/stats", graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as kallglot:
        port = free_port()
        env = e2e_bridge_env(redis_url, kallglot.url + "/v1", "e2e-short-token", f"http://127.0.0.1:{port}")
        with run_gunicorn("app:create_app()", env, port=port, graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as bridge:
            yield kallglot, bridge


def test_a_reopen_after_the_stream_token_expired_refreshes_the_token(
        short_token_stack: tuple[RunningServer, RunningServer]) -> None:
    kallglot, bridge = short_token_stack
    emulator = EmulatorControl(kallglot.url)
    emulator.reset()
    simulator = TwilioCallSimulator(bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)

    def drop_after_the_token_expired(stream: SimulatedStream) -> None:
        session_id = only_session(emulator)["id"]
        assert wait_until(lambda: emulator.session(session_id)["connections_live"] == 1, timeout=10)
        # The token the relay was given is now expired: a reopen with it would be refused (invalid_token).
        time.sleep(SHORT_TOKEN_TTL_SECONDS + 0.5)
        requests.post(f"{emulator.url}/_emulator/sessions/{session_id}/drop", timeout=5).raise_for_status()
        assert wait_until(lambda: emulator.session(session_id)["connections_total"] == 2
                          and emulator.session(session_id)["connections_live"] == 1, timeout=10)

    numbers = new_numbers()
    result = simulator.place_call(numbers.to, numbers.from_, b"\xff" * 800, pace=False, listen_seconds=0.3,
                                  hold_open=drop_after_the_token_expired)
    assert result.protocol_errors == [] and not result.server_closed_first  # the call went on
    session = only_session(emulator)
    assert "invalid_token" not in session["errors_sent"]  # the reopen used a fresh token, not the expired one
