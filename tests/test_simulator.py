"""Tests for the Twilio call simulator, run against a tiny fake of our Twilio-facing surface.

The fake (``create_fake_service``) runs under gunicorn+gevent like the real service. It verifies every
signature, checks the simulator's Media Streams frames field by field, and picks a behaviour from the
dialled number. It records what it saw per CallSid at ``GET /_calls/<sid>`` for the tests to inspect.
"""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import wave
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request
from flask_sock import Sock
from twilio.request_validator import RequestValidator
from wsproto.events import CloseConnection
from twilio.twiml.voice_response import Connect, VoiceResponse

from app.devtools.simulator import SimulatedStream, TwilioCallSimulator, speech_like_tone
from app.devtools.simulator.__main__ import main as cli_main
from app.devtools.simulator.audio import read_wav_as_ulaw, ulaw_to_wav_bytes, wav_bytes_to_ulaw
from tests.support.servers import RunningServer, run_gunicorn

TOKEN = "sim-test-auth-token"
PUBLIC = "https://bridge.example.test"  # what the fake believes its public URL is (as behind a proxy)
CALLER = "+15551230000"
ECHO, MARKS, CLEAR, CLOSE_FIRST, RECONNECT, BAD_FRAMES = (f"+1555000000{i}" for i in range(1, 7))
#: The "clear" scenario's reply: 1 s before its first mark, 10 s after it (20 ms frames).
CLEAR_FIRST_FRAMES, CLEAR_REST_FRAMES = 50, 500
SCENARIOS = {ECHO: "echo", MARKS: "marks", CLEAR: "clear", CLOSE_FIRST: "close_first",
             RECONNECT: "reconnect", BAD_FRAMES: "bad_frames"}
e2e = pytest.mark.e2e


# --------------------------------------------------------------------------- fake service
def create_fake_service() -> Flask:
    """Flask app standing in for our service's Twilio surface (run in gunicorn by the fixture)."""
    app = Flask(__name__)
    sock = Sock(app)
    public = os.environ["FAKE_PUBLIC_URL"]
    wss = "wss://" + public.split("://", 1)[1]
    validator = RequestValidator(os.environ["FAKE_TWILIO_AUTH_TOKEN"])
    calls: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": [], "streams": [], "actions": 0})

    def stream_twiml(scenario: str) -> str:
        response, connect = VoiceResponse(), Connect(action=public + "/twilio/connect-action")
        stream = connect.stream(url=wss + "/twilio/media", name="bridge",
                                status_callback=public + "/twilio/stream-status", status_callback_method="POST")
        stream.parameter(name="scenario", value=scenario)
        stream.parameter(name="session", value="opaque-123")
        response.append(connect)
        return str(response)

    def record() -> tuple[dict[str, str], bool]:
        form = request.form.to_dict()
        valid = validator.validate(public + request.path, request.form, request.headers.get("X-Twilio-Signature", ""))
        calls[form.get("CallSid", "?")]["requests"].append({"path": request.path, "form": form, "valid": valid})
        return form, valid

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.get("/_calls/<sid>")
    def call_log(sid: str) -> Any:
        return jsonify(calls.get(sid, {}))

    @app.post("/twilio/voice")
    def voice() -> Any:
        form, valid = record()
        if not valid:
            return "bad signature", 403
        if form.get("To") not in SCENARIOS:
            response = VoiceResponse()
            response.say("This number is not in service.")
            response.hangup()
            return str(response), 200, {"Content-Type": "text/xml"}
        return stream_twiml(SCENARIOS[form["To"]]), 200, {"Content-Type": "text/xml"}

    @app.post("/twilio/connect-action")
    def connect_action() -> Any:
        form, valid = record()
        if not valid:
            return "bad signature", 403
        call = calls[form["CallSid"]]
        call["actions"] += 1
        if call["scenario"] == "reconnect" and call["actions"] == 1:
            return stream_twiml("echo"), 200, {"Content-Type": "text/xml"}
        response = VoiceResponse()
        response.say("Goodbye.")
        response.hangup()
        return str(response), 200, {"Content-Type": "text/xml"}

    @app.post("/twilio/stream-status")
    @app.post("/twilio/status")
    def callbacks() -> Any:
        _, valid = record()
        return ("", 204) if valid else ("bad signature", 403)

    @sock.route("/twilio/media")
    def media(ws: Any) -> None:
        info: dict[str, Any] = {"signature_valid": validator.validate(
            wss + "/twilio/media", {}, request.headers.get("X-Twilio-Signature", "")),
            "problems": [], "media_times": [], "dtmf": [], "mark_delays": {}, "stopped": False, "ended": False}
        if not info["signature_valid"]:
            ws.close(reason=1008, message="bad signature")
            return
        t0, problems = time.monotonic(), info["problems"]
        first = json.loads(ws.receive(timeout=5))
        if first != {"event": "connected", "protocol": "Call", "version": "1.0.0"}:
            problems.append(f"bad connected: {first}")
        start = json.loads(ws.receive(timeout=5))
        sid, body = start.get("streamSid", ""), start.get("start", {})
        expected = {"accountSid", "streamSid", "callSid", "tracks", "customParameters", "mediaFormat"}
        if (start.get("event"), start.get("sequenceNumber"), set(body)) != ("start", "1", expected) \
                or body["streamSid"] != sid or not (sid.startswith("MZ") and len(sid) == 34) \
                or not (body["callSid"].startswith("CA") and len(body["callSid"]) == 34) \
                or not (body["accountSid"].startswith("AC") and len(body["accountSid"]) == 34) \
                or body["tracks"] != ["inbound"] \
                or body["mediaFormat"] != {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}:
            problems.append(f"bad start: {start}")
        call = calls[body.get("callSid", "?")]
        call["streams"].append(info)
        scenario = body.get("customParameters", {}).get("scenario", "echo")
        call.setdefault("scenario", scenario)
        info["custom_parameters"] = body.get("customParameters")

        def out(event: str, **fields: Any) -> None:
            ws.send(json.dumps({"event": event, "streamSid": sid, **fields}))

        sent_marks: dict[str, float] = {}

        def mark(name: str) -> None:
            sent_marks[name] = time.monotonic()
            out("mark", mark={"name": name})

        if scenario == "marks":
            mark("idle")
            out("media", media={"payload": base64.b64encode(b"\x55" * 1600).decode()})  # 0.2 s
            mark("after-audio")
        elif scenario == "clear":
            # 1 s, a mark, then 10 s more (20 ms frames, far faster than real time); the clear goes out when the
            # first mark's echo says the first second has played (below): an event, not a sleep, so no machine
            # load decides how much played (only a 10 s stall could let the whole reply play first).
            for _ in range(CLEAR_FIRST_FRAMES):
                out("media", media={"payload": base64.b64encode(b"\x33" * 160).decode()})
            mark("first-second")
            for _ in range(CLEAR_REST_FRAMES):
                out("media", media={"payload": base64.b64encode(b"\x34" * 160).decode()})
            mark("end-of-reply")
        elif scenario == "bad_frames":
            ws.send(b"\x00\x01")
            ws.send(json.dumps({"event": "play", "streamSid": sid}))
            ws.send(json.dumps({"event": "media", "streamSid": "MZ" + "0" * 32, "media": {"payload": "//8="}}))
            out("media", media={"payload": "not base64!!"})
            ws.send(json.dumps({"event": "mark", "mark": {"name": "no-sid"}}))
        seq, chunk = 2, 1
        try:
            while True:
                raw = ws.receive(timeout=10)
                if raw is None:
                    problems.append("simulator went silent")
                    return
                msg = json.loads(raw)
                event = msg.get("event")
                if msg.get("streamSid") != sid:
                    problems.append(f"wrong streamSid in {msg}")
                if event in ("media", "dtmf", "mark", "stop"):
                    if msg.get("sequenceNumber") != str(seq):
                        problems.append(f"sequenceNumber {msg.get('sequenceNumber')!r}, expected {seq}")
                    seq += 1
                if event == "media":
                    m = msg["media"]
                    if (m["track"], m["chunk"], m["timestamp"]) != ("inbound", str(chunk), str((chunk - 1) * 20)) \
                            or len(base64.b64decode(m["payload"], validate=True)) != 160:
                        problems.append(f"bad media frame {msg}")
                    chunk += 1
                    info["media_times"].append(time.monotonic() - t0)
                    if scenario in ("echo", "bad_frames"):
                        out("media", media={"payload": m["payload"]})
                    if scenario in ("close_first", "reconnect") and chunk > 5:
                        ws.close(reason=1000, message="bridge ended")
                        return
                elif event == "dtmf":
                    info["dtmf"].append(msg["dtmf"]["digit"])
                elif event == "mark":
                    name = msg["mark"]["name"]
                    info["mark_delays"][name] = time.monotonic() - sent_marks.pop(name)
                    if scenario == "clear" and name == "first-second":
                        out("clear")
                elif event == "stop":
                    info["stopped"] = True
                    if msg["stop"] != {"accountSid": body["accountSid"], "callSid": body["callSid"]}:
                        problems.append(f"bad stop {msg}")
                    return
                else:
                    problems.append(f"unknown event {event!r}")
                    mark("seen-unknown")  # lets a test know the frame arrived
        finally:
            info["ended"] = True

    return app


# --------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def fake() -> Iterator[RunningServer]:
    env = {"FAKE_TWILIO_AUTH_TOKEN": TOKEN, "FAKE_PUBLIC_URL": PUBLIC}
    with run_gunicorn("tests.test_simulator:create_fake_service()", env=env, ready_path="/healthz") as server:
        yield server


@pytest.fixture()
def sim(fake: RunningServer) -> TwilioCallSimulator:
    return TwilioCallSimulator(fake.url, TOKEN, public_url=PUBLIC, timeout=5.0)


def fake_log(server: RunningServer, call_sid: str, until: Callable[[dict[str, Any]], bool] = lambda _: True,
             timeout: float = 3.0) -> dict[str, Any]:
    """The fake's record of one call, polled until ``until`` holds (the server finishes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        log = requests.get(f"{server.url}/_calls/{call_sid}", timeout=2).json()
        if until(log) or time.monotonic() > deadline:
            return log
        time.sleep(0.02)


def paths(log: dict[str, Any]) -> list[str]:
    return [r["path"] for r in log["requests"]]


# --------------------------------------------------------------------------- tests
@e2e
@pytest.mark.parametrize("token,sign", [("wrong-token", True), (TOKEN, False)])
def test_bad_or_missing_signature_is_refused_and_reported(fake: RunningServer, token: str, sign: bool) -> None:
    result = TwilioCallSimulator(fake.url, token, public_url=PUBLIC, timeout=5).place_call(ECHO, CALLER, sign=sign)
    assert result.webhook_status == 403
    assert result.errors and result.errors[0].startswith("11200")
    assert result.stream_sid is None and result.streams == 0
    assert result.callbacks == [("/twilio/status", 403)]
    assert [r["valid"] for r in fake_log(fake, result.call_sid)["requests"]] == [False, False]


@e2e
def test_voice_webhook_alone_is_signed_over_the_public_url(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    resp = sim.post_voice_webhook(ECHO, CALLER, call_sid="CA" + "1" * 32, extra={"FromCountry": "US"})
    assert resp.status_code == 200 and "<Connect" in resp.text
    req = fake_log(fake, "CA" + "1" * 32)["requests"][0]
    assert req["valid"] and req["form"]["FromCountry"] == "US"
    assert {k: req["form"][k] for k in ("CallStatus", "Direction", "ApiVersion", "Caller", "Called")} == {
        "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", "Caller": CALLER, "Called": ECHO}


@e2e
def test_echo_is_byte_exact_and_frames_follow_the_protocol(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    audio = speech_like_tone(1.0)
    result = sim.place_call(ECHO, CALLER, audio, pace=False, dtmf="42", listen_seconds=0,
                            hold_open=lambda s: s.wait_for(lambda st: len(st.heard) >= len(audio), 5))
    assert result.protocol_errors == [] and result.errors == []
    assert result.sent_audio == audio and result.heard_audio == audio
    assert result.custom_parameters == {"scenario": "echo", "session": "opaque-123"}
    assert result.stream_sid and result.stream_sid.startswith("MZ") and not result.server_closed_first
    assert result.said == [] and not result.hung_up
    stream = fake_log(fake, result.call_sid, until=lambda log: log["streams"][0]["ended"])["streams"][0]
    assert stream["signature_valid"] and stream["problems"] == [] and stream["stopped"]
    assert len(stream["media_times"]) == 50 and stream["dtmf"] == ["4", "2"]


@e2e
def test_paced_audio_is_sent_in_real_time(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    result = sim.place_call(ECHO, CALLER, b"\x7e" * 4000, pace=True, listen_seconds=0.1)
    times = fake_log(fake, result.call_sid, until=lambda log: log["streams"][0]["ended"])["streams"][0]["media_times"]
    # 25 frames = 24 intervals of 20 ms (0.48 s); the first frames may queue up while the server starts. Only the
    # lower bound is asserted: pacing means never faster than real time, and no machine load can break that
    # (a slower arrival is the machine, not the simulator).
    assert len(times) == 25 and times[-1] - times[0] >= 0.4


@e2e
def test_marks_are_echoed_when_playback_reaches_them(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    result = sim.place_call(MARKS, CALLER, listen_seconds=0,
                            hold_open=lambda s: s.wait_for(lambda st: len(st.marks_echoed) == 2, 3))
    assert result.marks_received == result.marks_echoed == ["idle", "after-audio"]
    assert result.heard_audio == result.played_audio == b"\x55" * 1600
    # Where playback stood when each mark came back: "idle" at once (nothing queued), "after-audio" only once
    # the 0.2 s before it had played.
    assert result.played_at_mark == {"idle": 0, "after-audio": 1600}
    echoed = fake_log(fake, result.call_sid, until=lambda log: log["streams"][0]["ended"])["streams"][0]["mark_delays"]
    assert set(echoed) == {"idle", "after-audio"}  # the service received both echoes


@e2e
def test_clear_drops_unplayed_audio_and_returns_pending_marks(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    result = sim.place_call(CLEAR, CALLER, listen_seconds=0,
                            hold_open=lambda s: s.wait_for(lambda st: st.clears == 1, 30))
    first, rest = CLEAR_FIRST_FRAMES * 160, CLEAR_REST_FRAMES * 160
    assert result.clears == 1 and result.marks_echoed == ["first-second", "end-of-reply"]
    assert result.protocol_errors == []
    assert result.heard_audio == b"\x33" * first + b"\x34" * rest
    # The first mark came back once its second had played; the clear (sent on that echo) then cut the reply
    # short: some of the 10 s after it was dropped, and what played is the reply's beginning.
    assert result.played_at_mark["first-second"] >= first
    assert first <= len(result.played_audio) < first + rest
    assert result.played_audio == result.heard_audio[: len(result.played_audio)]
    # The pending mark was returned by the clear, with playback cut short, not after the 10 s played.
    assert result.played_at_mark["end-of-reply"] == len(result.played_audio)
    echoed = fake_log(fake, result.call_sid, until=lambda log: log["streams"][0]["ended"])["streams"][0]["mark_delays"]
    assert set(echoed) == {"first-second", "end-of-reply"}


@e2e
@pytest.mark.parametrize("mode,expected", [
    ("normal", ["/twilio/stream-status", "/twilio/status"]),
    ("reversed", ["/twilio/status", "/twilio/stream-status"]),
    ("twice", ["/twilio/stream-status", "/twilio/status", "/twilio/status"]),
    ("none", []),
])
def test_status_callback_options(sim: TwilioCallSimulator, fake: RunningServer, mode: str, expected: list[str]) -> None:
    result = sim.place_call(ECHO, CALLER, b"\xff" * 320, pace=False, listen_seconds=0.05, status_callbacks=mode)
    assert result.callbacks == [(p, 204) for p in expected]
    log = fake_log(fake, result.call_sid)
    assert paths(log) == ["/twilio/voice", *expected] and all(r["valid"] for r in log["requests"])
    for req in log["requests"][1:]:
        form = req["form"]
        if req["path"] == "/twilio/status":
            assert form["CallStatus"] == "completed" and form["CallDuration"].isdigit()
            assert form["CallbackSource"] == "call-progress-events" and form["SequenceNumber"] == "0"
            assert form["Timestamp"].endswith("+0000")
        else:
            assert form["StreamEvent"] == "stream-stopped" and form["StreamSid"] == result.stream_sid
            assert form["StreamName"] == "bridge" and form["CallSid"] == result.call_sid


@e2e
def test_server_closing_first_follows_the_connect_action(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    audio = speech_like_tone(1.0)
    result = sim.place_call(CLOSE_FIRST, CALLER, audio, pace=True)
    assert result.server_closed_first and result.close_code == 1000
    assert len(result.sent_audio) < len(audio)  # stopped streaming once the server hung up
    assert result.said == ["Goodbye."] and result.hung_up and len(result.twiml) == 2
    assert result.callbacks == [("/twilio/connect-action", 200), ("/twilio/stream-status", 204),
                                ("/twilio/status", 204)]
    log = fake_log(fake, result.call_sid)
    action = log["requests"][1]
    assert action["path"] == "/twilio/connect-action" and action["valid"]
    assert action["form"]["CallStatus"] == "in-progress"
    assert not log["streams"][0]["stopped"]  # Twilio sends no stop after the server closed


@e2e
def test_action_twiml_with_a_new_stream_reconnects(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    result = sim.place_call(RECONNECT, CALLER, speech_like_tone(0.5), pace=False, listen_seconds=0.1)
    assert result.streams == 2 and result.errors == [] and not result.server_closed_first
    assert [p for p, _ in result.callbacks] == ["/twilio/connect-action", "/twilio/stream-status",
                                                 "/twilio/stream-status", "/twilio/status"]
    log = fake_log(fake, result.call_sid, until=lambda log: len(log["streams"]) == 2 and log["streams"][1]["stopped"])
    assert [s["custom_parameters"]["scenario"] for s in log["streams"]] == ["reconnect", "echo"]
    assert log["streams"][1]["stopped"]


@e2e
def test_failure_twiml_is_heard_and_hangs_up(sim: TwilioCallSimulator) -> None:
    result = sim.place_call("+15550009999", CALLER, speech_like_tone(0.2))
    assert result.said == ["This number is not in service."] and result.hung_up
    assert result.stream_sid is None and result.sent_audio == b""
    assert result.callbacks == [("/twilio/status", 204)]


@e2e
def test_protocol_violations_are_recorded(sim: TwilioCallSimulator) -> None:
    result = sim.place_call(BAD_FRAMES, CALLER, listen_seconds=0,
                            hold_open=lambda s: s.wait_for(lambda st: len(st.received) >= 5, 3))
    codes = [e.split(":")[0] for e in result.protocol_errors]
    assert codes == ["31950", "31951", "31951", "31951", "31951"], result.protocol_errors
    assert result.heard_audio == b""  # rejected frames are not played


@e2e
def test_hold_open_can_inject_frames_and_drop_the_socket(sim: TwilioCallSimulator, fake: RunningServer) -> None:
    def hook(stream: SimulatedStream) -> None:
        stream.send_raw(json.dumps({"event": "custom", "streamSid": stream.stream_sid, "sequenceNumber": "3"}))
        assert stream.wait_for(lambda st: "seen-unknown" in st.marks_received, 3)
        stream.close_abruptly()

    result = sim.place_call(ECHO, CALLER, b"\xff" * 160, pace=False, hold_open=hook)
    assert not result.server_closed_first and result.callbacks[-1] == ("/twilio/status", 204)
    stream = fake_log(fake, result.call_sid, until=lambda log: log["streams"][0]["ended"])["streams"][0]
    assert stream["ended"] and not stream["stopped"]
    assert stream["problems"] == ["unknown event 'custom'"]


@e2e
def test_cli_places_a_call_and_writes_what_was_heard(fake: RunningServer, tmp_path: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "heard.wav"
    base = ["--base-url", fake.url, "--public-url", PUBLIC, "--auth-token", TOKEN, "--no-pace", "--listen", "0.3"]
    assert cli_main([*base, "--to", ECHO, "--out", str(out)]) == 0
    assert len(read_wav_as_ulaw(out)) == 24000  # 3 s of the default tone, echoed back
    assert "summary" in capsys.readouterr().out
    assert cli_main([*base, "--to", "+15550009999", "--out", str(tmp_path / "none.wav")]) == 1


def _wav(fmt_tag: int, bits: int, rate: int, data: bytes) -> bytes:
    block = bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, 1, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def test_audio_helpers_round_trip_and_convert() -> None:
    tone = speech_like_tone(1.0)
    assert tone == speech_like_tone(1.0) and len(tone) == 8000 and len(set(tone)) > 50
    assert wav_bytes_to_ulaw(ulaw_to_wav_bytes(tone)) == tone
    assert wav_bytes_to_ulaw(_wav(7, 8, 8000, tone)) == tone  # μ-law WAV passes through untouched
    with wave.open(io.BytesIO(ulaw_to_wav_bytes(tone))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 8000)
    pcm16k = struct.pack("<1600h", *([1000, -1000] * 800))
    assert len(wav_bytes_to_ulaw(_wav(1, 16, 16000, pcm16k))) == 800  # resampled to 8 kHz
    with pytest.raises(ValueError):
        wav_bytes_to_ulaw(b"not a wav file")


@e2e
def test_a_mark_due_while_the_socket_is_closing_ends_the_echo_loop_quietly(sim: TwilioCallSimulator) -> None:
    """Chaos-run bug: a mark fell due in the instant between the close frame going out and simple-websocket
    saying ``connected = False``; the echo's send raised ``LocalProtocolError`` and killed the reader thread."""
    seen: dict[str, Any] = {}

    def close_half_way(stream: SimulatedStream) -> None:
        assert stream.wait_for(lambda st: len(st.marks_echoed) == 2, 3)
        with stream._send_lock:  # where Client.close() stands after wsproto built its close frame
            stream.ws.sock.sendall(stream.ws.ws.send(CloseConnection(1000)))
        assert stream.ws.connected  # the window: closing, yet still "connected"
        seen["sent"] = stream.send_event("mark", {"streamSid": stream.stream_sid, "mark": {"name": "late"}})
        with stream._cond:
            stream._pending_marks.append((0.0, "late"))
            stream._echo_marks(1)  # raised LocalProtocolError in the reader thread before the fix
            seen["pending"] = list(stream._pending_marks)
        seen["closed"] = stream.wait_for(lambda st: not st.ws.connected, 3)

    result = sim.place_call(MARKS, CALLER, listen_seconds=0, hold_open=close_half_way)
    assert seen == {"sent": False, "pending": [], "closed": True}
    assert result.marks_echoed == ["idle", "after-audio"]  # "late" was never echoed
