"""``LIVE_TRANSCRIPTS``: with it off, the relay receives and parses Kallglot's transcript lines but keeps none in
Redis, while leg changes still reach the live console. Also the load benchmark's "not forwarded" arm.

End to end under real gunicorn + gevent: a simulated Twilio call through a bridge started with
``LIVE_TRANSCRIPTS=off``, the Kallglot emulator saying a transcript line on the stream, then the session's live
event stream read back from the real Redis.
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from app.calls.events import LEG, TRANSCRIPT, SessionEventLog
from app.config import Settings
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from app.redis_keys import RedisKeys
from tests.support.controls import EmulatorControl
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, e2e_bridge_env
from tests.support.waiting import wait_until

STEP_TIMEOUT = 20.0


def test_the_setting_reads_on_and_off() -> None:
    assert Settings.from_env({}).live_transcripts is True
    assert Settings.from_env({"LIVE_TRANSCRIPTS": "off"}).live_transcripts is False
    assert Settings.from_env({"LIVE_TRANSCRIPTS": "on"}).live_transcripts is True


@pytest.fixture(scope="module")
def quiet_namespace() -> str:
    return f"no-transcripts-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def quiet_bridge(redis_url: str, emulator_server: RunningServer, quiet_namespace: str) -> Iterator[RunningServer]:
    """A bridge (one gevent worker) that does not forward transcript lines."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**e2e_bridge_env(redis_url, emulator_server.url + "/v1", quiet_namespace, url), "LIVE_TRANSCRIPTS": "off"}
    with run_gunicorn("app:create_app()", env, workers=1, port=port) as server:
        yield server


@pytest.mark.e2e
def test_with_live_transcripts_off_lines_are_parsed_but_not_kept_and_legs_still_are(
        quiet_bridge: RunningServer, emulator: EmulatorControl, redis_url: str, quiet_namespace: str) -> None:
    log = SessionEventLog(redis_lib.Redis.from_url(redis_url), RedisKeys(quiet_namespace))
    emulator.behaviour("silent")  # no echo: the only thing the relay sends the caller is the clear below
    on_call, release, done = threading.Event(), threading.Event(), threading.Event()
    streams: list[SimulatedStream] = []
    outcome: list[Any] = []

    def hold(stream: SimulatedStream) -> None:
        streams.append(stream)
        on_call.set()
        release.wait(STEP_TIMEOUT)

    def place() -> None:
        simulator = TwilioCallSimulator(quiet_bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
        try:
            outcome.append(simulator.place_call("+14155550199", "+15557770042", b"\xff" * 1600, pace=False,
                                                listen_seconds=0.2, hold_open=hold))
        finally:
            done.set()

    threading.Thread(target=place, name="quiet-call", daemon=True).start()
    try:
        assert on_call.wait(STEP_TIMEOUT), "the simulated call never reached its media stream"
        (session,) = [s for s in emulator.sessions() if s["status"] != "ended"]
        session_id = session["id"]
        # The leg's "started" is written once the relay holds its Kallglot stream.
        assert wait_until(lambda: log.latest(session_id, 10), timeout=STEP_TIMEOUT), "the leg never started"
        # The clear after the line is the proof the relay read (and parsed) the line: one socket, in order.
        assert emulator.send(session_id, {
            "type": "transcript.final", "id": "t-1", "speaker": "customer", "language": "en", "text": "Good morning",
            "translation": {"language": "es", "text": "Buenos días"}}, {"type": "audio.clear"}) == 1
        assert streams[0].wait_for(lambda s: s.clears >= 1, STEP_TIMEOUT), "the relay never passed the clear on"
    finally:
        release.set()
    assert done.wait(STEP_TIMEOUT) and outcome and outcome[0].protocol_errors == []

    def leg_over() -> bool:  # published after the line was handled: the writer keeps the order
        return any(e.kind == LEG and e.data.get("state") in ("ended", "lost") for e in log.latest(session_id, 100))

    assert wait_until(leg_over, timeout=STEP_TIMEOUT), "the leg's end never reached the live stream"
    events = log.latest(session_id, 100)
    assert [e.data["state"] for e in events if e.kind == LEG][0] == "started"
    assert [e for e in events if e.kind == TRANSCRIPT] == []
