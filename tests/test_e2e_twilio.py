"""Whole Twilio calls over real sockets: the simulator (as Twilio) → the bridge under gunicorn + gevent
(two workers) → the Kallglot emulator, with a real Redis."""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import math
import os
import struct
import time
import threading
import uuid
import warnings
from collections.abc import Callable

import pytest
import requests
from simple_websocket import Client, ConnectionClosed
from twilio.request_validator import RequestValidator

from app import create_app
from app.calls.lifecycle import END_CLAIM_LEASE_SECONDS, SAFETY_LEASE_SECONDS
from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.extensions import services
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.settings import (
    E2E_RECONNECT_BACKOFF_MS, E2E_RECONNECT_WINDOW_SECONDS, EMULATOR_API_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN,
    bridge_config,
)
from tests.support.bridge_state import BridgeState
from tests.support.numbers import CallNumbers
from tests.support.waiting import only_session, wait_until
from tests.support.servers import RunningServer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

pytestmark = pytest.mark.e2e


@pytest.fixture
def simulator(bridge_server: RunningServer) -> TwilioCallSimulator:
    return TwilioCallSimulator(bridge_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)




def live_session_id(emulator: EmulatorControl) -> str:
    """The one session's id, once the relay's stream socket to Kallglot is up."""
    assert wait_until(lambda: only_session(emulator)["connections_live"] == 1)
    return only_session(emulator)["id"]




def test_audio_flows_both_ways_byte_exact_and_the_session_ends_once(
        simulator: TwilioCallSimulator, emulator: EmulatorControl, numbers: CallNumbers,
        bridge_state: BridgeState) -> None:
    # 53 frames = 8480 bytes: ten 100 ms chunks plus a 480-byte remainder, flushed after the quiet time.
    audio = os.urandom(53 * 160)

    def until_the_last_utterance_is_played_and_marked(stream: SimulatedStream) -> None:
        # An event, not a listening window: the caller stays until a mark came back with every byte played (the
        # last utterance's), however long a loaded machine takes to get there.
        assert stream.wait_for(lambda s: len(s.heard) >= len(audio) and len(audio) in s.played_at_mark.values(),
                               timeout=30)

    result = simulator.place_call(*numbers, audio, pace=False, listen_seconds=0.2,
                                  hold_open=until_the_last_utterance_is_played_and_marked)
    assert result.protocol_errors == [] and result.errors == []
    session = only_session(emulator)
    received = base64.b64decode(session["audio_received"]["customer"])
    assert received == audio  # exactly the caller's bytes, in order
    assert session["audio_input_messages"]["customer"] == 11
    assert session["sequences_increasing"] is True
    # The emulator echoes each chunk; the caller hears everything unchanged: the 480-byte remainder went to
    # Kallglot once the caller had been quiet for UPLINK_QUIET_FLUSH_MS, while the call was still up.
    assert result.heard_audio == audio
    # One mark per utterance, named in order, each echoed back by the caller's side once played.
    assert result.marks_received == [f"utt-{n}" for n in range(1, len(result.marks_received) + 1)]
    assert len(result.marks_received) >= 1 and result.marks_echoed == result.marks_received
    # The end state: ended, the end recorded for good, nothing left due that could end it again.
    assert wait_until(lambda: bridge_state.settled_ended(session["id"]))
    assert emulator.session(session["id"])["end_calls"] == 1


def test_paced_call_in_real_time(simulator: TwilioCallSimulator, emulator: EmulatorControl,
                                 numbers: CallNumbers) -> None:
    tone = audioop.lin2ulaw(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 300 * n / 8000)))
                                     for n in range(8000)), 2)
    result = simulator.place_call(*numbers, tone, pace=True, listen_seconds=0.5, dtmf="12")
    assert result.protocol_errors == []
    assert base64.b64decode(only_session(emulator)["audio_received"]["customer"]) == tone
    assert result.heard_audio == tone


def test_return_audio_in_pcm16_is_transcoded_and_clear_stops_playback(
        simulator: TwilioCallSimulator, emulator: EmulatorControl, numbers: CallNumbers) -> None:
    emulator.behaviour("silent")
    pcm16k = b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * 440 * n / 16000))) for n in range(16000))

    def barge_in(stream: SimulatedStream) -> None:
        session_id = live_session_id(emulator)
        three_seconds = base64.b64encode(b"\xff" * 24000).decode()
        assert 1 == emulator.send(session_id,
                      {"type": "audio.output", "audio": {"encoding": "pcm16", "sample_rate_hz": 16000,
                                                         "payload": base64.b64encode(pcm16k).decode()}},
                      {"type": "audio.output", "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                                         "payload": three_seconds}},
                      {"type": "transcript.final", "speaker": "agent", "text": "hola"},
                      {"type": "something.new", "x": 1},
                      {"type": "audio.output", "audio": {"encoding": "opus", "sample_rate_hz": 48000,
                                                         "payload": "AAAA"}},
                      {"type": "audio.clear"})
        assert stream.wait_for(lambda s: s.clears == 1, timeout=5)

    result = simulator.place_call(*numbers, b"\xff" * 1600, pace=False, listen_seconds=0.3, hold_open=barge_in)
    assert result.protocol_errors == []
    assert result.clears == 1
    # One second of 16 kHz PCM became one second of 8 kHz μ-law, then the μ-law 3 s; opus was dropped.
    assert abs(len(result.heard_audio) - (8000 + 24000)) <= 4
    decoded = audioop.ulaw2lin(result.heard_audio[100:7900], 2)
    assert 5000 < audioop.rms(decoded, 2) < 7500  # the tone survived (9000/√2 ≈ 6364)
    assert len(result.played_audio) < len(result.heard_audio)  # clear dropped what had not played


def media_socket(bridge: RunningServer, *, signed: bool = True) -> Client:
    """Open /twilio/media as Twilio would (signature over the wss:// public URL, no params)."""
    url = bridge.url.replace("http://", "ws://") + "/twilio/media"
    headers = {"X-Twilio-Signature": RequestValidator(TWILIO_AUTH_TOKEN).compute_signature(url, {})} if signed else {}
    return Client.connect(url, headers=headers)


def start_frame(call_sid: str, token: str) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + "1" * 32, "start": {
        "accountSid": TWILIO_ACCOUNT_SID, "callSid": call_sid, "streamSid": "MZ" + "1" * 32, "tracks": ["inbound"],
        "customParameters": {"relay_token": token},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


def expect_close(ws: Client, timeout: float = 5.0) -> int | None:
    """Read until the server closes the socket; return its close code."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.receive(timeout=0.2)
    except ConnectionClosed:
        pass
    assert not ws.connected, "server did not close the socket"
    return ws.close_reason


@pytest.mark.parametrize("signature", [None, "bogus"])
def test_unsigned_media_socket_upgrade_is_refused(bridge_server: RunningServer, signature: str | None) -> None:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    if signature:
        headers["X-Twilio-Signature"] = signature
    response = requests.get(bridge_server.url + "/twilio/media", headers=headers, timeout=5)
    assert response.status_code == 403


@pytest.mark.parametrize("case", ["forged", "other-call", "none"])
def test_forged_relay_token_closes_and_opens_nothing(bridge_server: RunningServer, simulator: TwilioCallSimulator,
                                                     emulator: EmulatorControl, case: str,
                                                     numbers: CallNumbers) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    answer = simulator.post_voice_webhook(*numbers, call_sid=call_sid)
    token = answer.text.split('name="relay_token" value="')[1].split('"')[0]
    if case == "forged":
        token = token[:10] + ("x" if token[10] != "x" else "y") + token[11:]
    elif case == "none":
        token = ""
    ws = media_socket(bridge_server)
    ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    ws.send(start_frame(call_sid if case != "other-call" else "CA" + uuid.uuid4().hex, token))
    assert expect_close(ws) == 1008
    assert emulator.stats()["connections_live"] == 0
    assert only_session(emulator)["connections_total"] == 0


@pytest.mark.parametrize("frame, code", [
    (b"\x00\x01binary", 1003),
    ("{not json", 1007),
    (json.dumps({"event": "media", "media": {"payload": "AAAA"}}), 1008),  # media before start
])
def test_malformed_frames_before_start_close_cleanly(bridge_server: RunningServer, frame: str | bytes,
                                                     code: int) -> None:
    ws = media_socket(bridge_server)
    ws.send(frame)
    assert expect_close(ws) == code
    assert requests.get(bridge_server.url + "/healthz", timeout=5).status_code == 200


def test_malformed_frames_mid_call(simulator: TwilioCallSimulator, emulator: EmulatorControl,
                                   bridge_server: RunningServer, numbers: CallNumbers) -> None:
    def misbehave(stream: SimulatedStream) -> None:
        stream.send_raw(json.dumps({"event": "media", "streamSid": stream.stream_sid,
                                    "media": {"track": "inbound", "payload": "***not base64***"}}))
        stream.send_raw(json.dumps({"event": "media", "streamSid": stream.stream_sid,
                                    "media": {"track": "inbound",
                                              "payload": base64.b64encode(b"\x01" * 160).decode()}}))
        stream.send_raw(b"\x00binary")
        assert stream.wait_for(lambda s: s.server_closed, timeout=5)

    def hear_kallglot_again(stream: SimulatedStream) -> None:
        # The restored stream's relay reached Kallglot (its echo is heard) before the caller hangs up: otherwise
        # the hang-up may end the session while a slow relay is still connecting, and there is nothing to check.
        assert stream.wait_for(lambda s: len(s.heard) > 0, timeout=30), "the restored stream never reached Kallglot"

    result = simulator.place_call(*numbers, b"\x02" * 800, pace=False, hold_open=misbehave, listen_seconds=0.5,
                                  restore_audio=b"\x03" * 800, restore_hold_open=hear_kallglot_again)
    assert any("code 1003" in event for _, event in result.timeline)
    # <Connect action> restored the stream to the same session; that stream then ended normally.
    assert result.streams == 2
    session_id = only_session(emulator)["id"]
    assert wait_until(lambda: emulator.session(session_id)["status"] == "ended")
    session = emulator.session(session_id)  # the end state: both relays are over
    assert session["connections_total"] == 2
    # The bad frame was dropped, the good one after it still arrived, then the restored stream's audio.
    assert base64.b64decode(session["audio_received"]["customer"]) == b"\x02" * 800 + b"\x01" * 160 + b"\x03" * 800
    assert requests.get(bridge_server.url + "/healthz", timeout=5).status_code == 200


def test_kallglot_stream_unreachable_is_not_dead_air(simulator: TwilioCallSimulator,
                                                     emulator: EmulatorControl, numbers: CallNumbers) -> None:
    # Every attempt fails: the first connect and each reopen (a single failure would just be retried).
    backoff = [int(ms) / 1000 for ms in E2E_RECONNECT_BACKOFF_MS.split(",")]
    emulator.fault(endpoint="connect", status=503, times=1 + len(backoff))
    give_up_after = sum(backoff) + 5
    result = simulator.place_call(*numbers, b"\xff" * 1600, pace=False, listen_seconds=0.2,
                                  hold_open=lambda s: s.wait_for(lambda st: st.server_closed, give_up_after))
    assert result.server_closed_first
    assert result.said == [UNAVAILABLE_MESSAGE] and result.hung_up  # the fallback message, then hang up
    session = only_session(emulator)
    # A Kallglot failure is an abnormal end: the session is held for the reconnect window, then ended once.
    assert emulator.session(session["id"])["status"] != "ended"
    assert wait_until(lambda: emulator.session(session["id"])["status"] == "ended",
                      timeout=E2E_RECONNECT_WINDOW_SECONDS + 3)
    assert emulator.session(session["id"])["end_calls"] == 1


def test_kallglot_ending_the_session_closes_the_call_politely(simulator: TwilioCallSimulator,
                                                              emulator: EmulatorControl, numbers: CallNumbers,
                                                              bridge_state: BridgeState) -> None:
    def end_at_kallglot(stream: SimulatedStream) -> None:
        session_id = live_session_id(emulator)
        requests.post(f"{emulator.api_url}/sessions/{session_id}/end", timeout=5,
                      headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}).raise_for_status()
        assert stream.wait_for(lambda s: s.server_closed, timeout=5)

    result = simulator.place_call(*numbers, b"\xff" * 800, pace=False, hold_open=end_at_kallglot, listen_seconds=0)
    assert result.said == [SESSION_OVER_MESSAGE] and result.hung_up
    session_id = only_session(emulator)["id"]
    # Recorded as Kallglot's end, for good: nothing is left due that could call ``end`` again.
    assert wait_until(lambda: bridge_state.settled_ended(session_id)), (
        bridge_state.session(session_id), bridge_state.end_claim(session_id), bridge_state.deadline(session_id))
    assert bridge_state.end_claim(session_id).startswith("ended:kallglot:")
    assert only_session(emulator)["end_calls"] == 1  # ours, from the test: the bridge did not end it again


def test_caller_socket_lost_without_stop_still_ends_the_session(simulator: TwilioCallSimulator,
                                                                emulator: EmulatorControl,
                                                                numbers: CallNumbers) -> None:
    result = simulator.place_call(*numbers, b"\xff" * 1600, pace=False, status_callbacks="none",
                                  hold_open=lambda stream: stream.close_abruptly(), listen_seconds=0)
    assert result.protocol_errors == []
    session = only_session(emulator)
    assert emulator.session(session["id"])["status"] != "ended"  # held for a reconnect first
    assert wait_until(lambda: emulator.session(session["id"])["status"] == "ended",
                      timeout=E2E_RECONNECT_WINDOW_SECONDS + 3)
    assert emulator.session(session["id"])["end_calls"] == 1


def test_exactly_one_end_when_every_end_path_races(simulator: TwilioCallSimulator, emulator: EmulatorControl,
                                                    bridge_server: RunningServer, bridge_state: BridgeState,
                                                    redis_url: str, numbers: CallNumbers) -> None:
    """Every way a session can end, at once, for real: a call whose stream never started (so nothing has ended
    it yet), distinct status deliveries to both workers (no dedupe collapses them), the connect action, the leg's
    heartbeat expiring and the session's deadline coming due in a third process's reaper. One Kallglot end."""
    call_sid = "CA" + uuid.uuid4().hex
    assert simulator.post_voice_webhook(*numbers, call_sid=call_sid).status_code == 200
    session_id = only_session(emulator)["id"]
    assert bridge_state.call("twilio", call_sid)["state"] == "live"
    # A reaper in this process, on the same Redis namespace as the bridge's two workers.
    racer = create_app(bridge_config(redis_url, emulator.api_url, "e2e", bridge_server.url))
    with racer.app_context():
        lifecycle = services().lifecycle
    now = time.time()
    shard = bridge_state.keys.shard_of(session_id)
    bridge_state.redis.zadd(bridge_state.keys.heartbeats(shard), {f"twilio:{call_sid}": now - 1}, xx=True)
    bridge_state.redis.zadd(bridge_state.keys.deadlines(shard), {session_id: now - 1})

    def deliver(status: str, sequence: int) -> int:
        params = {**simulator.base_params(*numbers, call_sid, status), "CallDuration": "3",
                  "SequenceNumber": str(sequence), "CallbackSource": "call-progress-events"}
        return simulator.signed_post("/twilio/status", params).status_code

    def connect_action() -> int:
        return simulator.signed_post("/twilio/connect-action",
                                     simulator.base_params(*numbers, call_sid, "in-progress")).status_code

    # The reapers run a little later than the others: every hold any racer starts is due by then (the window is
    # E2E_RECONNECT_WINDOW_SECONDS), but no end claim's lease (END_CLAIM_LEASE_SECONDS) has run out — a reaper an
    # hour ahead would count a claim whose end is still in flight as abandoned and rightly end again (a takeover
    # of a stalled holder, which Kallglot's idempotency key answers, but a second REST call all the same).
    reaper_clock_ahead = E2E_RECONNECT_WINDOW_SECONDS + 5
    assert reaper_clock_ahead < min(END_CLAIM_LEASE_SECONDS, SAFETY_LEASE_SECONDS)

    def reap_lost_heartbeats() -> int:
        lifecycle.expire_lost_legs(now=time.time() + reaper_clock_ahead)  # the heartbeat set above is due
        return 204

    def reap_due_deadlines() -> int:
        lifecycle.end_due_sessions(now=time.time() + reaper_clock_ahead)  # every hold is due
        return 204

    racers: list[Callable[[], int]] = [
        *(functools.partial(deliver, ("completed", "busy", "failed", "no-answer")[n % 4], n) for n in range(12)),
        connect_action, connect_action, *[reap_lost_heartbeats] * 3, *[reap_due_deadlines] * 3]
    start = threading.Barrier(len(racers))

    def run(racer: Callable[[], int]) -> int:
        start.wait(timeout=10)
        return racer()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(racers)) as pool:
        statuses = list(pool.map(run, racers))
    assert set(statuses) <= {200, 204}
    # Whatever won (a clean end, a hold that the due deadline then ends), the end state is one end, for good.
    assert wait_until(lambda: bridge_state.settled_ended(session_id), timeout=E2E_RECONNECT_WINDOW_SECONDS + 5)
    assert bridge_state.call("twilio", call_sid)["state"] == "ended"
    assert emulator.session(session_id)["end_calls"] == 1
    assert emulator.stats()["double_end_calls"] == 0


def test_retried_voice_webhook_creates_one_session(simulator: TwilioCallSimulator, emulator: EmulatorControl,
                                                   numbers: CallNumbers) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: simulator.post_voice_webhook(*numbers, call_sid=call_sid), range(4)))
    assert {r.status_code for r in responses} == {200}
    assert all("<Connect" in r.text for r in responses)
    assert len(emulator.sessions()) == 1


def test_kallglot_stream_drop_is_reopened_and_the_call_goes_on(simulator: TwilioCallSimulator,
                                                               emulator: EmulatorControl,
                                                               numbers: CallNumbers) -> None:
    def drop_kallglot(stream: SimulatedStream) -> None:
        session_id = live_session_id(emulator)
        requests.post(f"{emulator.url}/_emulator/sessions/{session_id}/drop", timeout=5).raise_for_status()
        assert wait_until(lambda: only_session(emulator)["connections_total"] == 2
                          and only_session(emulator)["connections_live"] == 1)
        heard_before = len(stream.heard)
        # Audio sent after the reconnect flows both ways again.
        for n in range(10):
            stream.send_event("media", {"streamSid": stream.stream_sid, "media": {
                "track": "inbound", "chunk": str(100 + n), "timestamp": str(2000 + 20 * n),
                "payload": base64.b64encode(b"\x05" * 160).decode()}})
        assert stream.wait_for(lambda s: len(s.heard) >= heard_before + 1600, timeout=5)

    result = simulator.place_call(*numbers, b"\xff" * 1600, pace=False, hold_open=drop_kallglot, listen_seconds=0.3)
    assert result.protocol_errors == [] and not result.server_closed_first
    session = only_session(emulator)
    assert base64.b64decode(session["audio_received"]["customer"]).endswith(b"\x05" * 1600)
    assert wait_until(lambda: emulator.session(session["id"])["status"] == "ended")
    assert emulator.session(session["id"])["end_calls"] == 1


def test_a_dropped_kallglot_stream_of_a_session_already_over_is_not_reopened(
        simulator: TwilioCallSimulator, emulator: EmulatorControl, bridge_server: RunningServer,
        redis_url: str, numbers: CallNumbers) -> None:
    """Kallglot's end reached us (recorded as ended) but its stream dropped before saying ``session.ended`` on it: the
    relay must not reopen a stream into a session that is over (chaos-run logs: relays walked the whole ~8 s backoff
    against refusals before the caller heard anything), but end the leg at once."""
    reporter = create_app(bridge_config(redis_url, emulator.api_url, "e2e", bridge_server.url))

    def end_then_drop(stream: SimulatedStream) -> None:
        session_id = live_session_id(emulator)
        with reporter.app_context():
            assert services().lifecycle.ended_by_kallglot(session_id, "test_ended")
        requests.post(f"{emulator.url}/_emulator/sessions/{session_id}/drop", timeout=5).raise_for_status()
        assert stream.wait_for(lambda s: s.server_closed, timeout=5)  # well inside the first 0.2 s backoff + reopen

    result = simulator.place_call(*numbers, b"\xff" * 1600, pace=False, hold_open=end_then_drop, listen_seconds=0)
    assert result.protocol_errors == []
    session = only_session(emulator)
    assert session["connections_total"] == 1  # never reopened
