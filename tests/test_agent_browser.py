"""An agent takes a translated call in the browser: Debian's headless chromium with a fake microphone fed from a
speech file, the bridge under gunicorn + gevent, a simulated Twilio customer, the Kallglot emulator.

The agent signs in, sees the waiting call on the Agent page, takes it; the page's AudioWorklet sends the file's
speech as 8 kHz μ-law 20 ms frames over ``/agent/media`` and the emulator receives it as ``speaker: agent`` with
the file's energy envelope; audio the emulator sends for the agent plays in the page (its analyser node sees it);
Hang up ends the agent leg cleanly and, as the profile says, the whole call. Screenshots go to
``$ADMIN_SCREENSHOT_DIR`` (``docs`` refreshes the README's) or the test's temp folder.
"""
from __future__ import annotations

import base64
import json
import math
import re
import struct
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
import requests
import simple_websocket
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from app.calls.agent_queue import BROWSER_LEG
from app.calls.events import SessionEventLog
from app.profiles import NumberProfile
from app.redis_keys import RedisKeys
from app.relay.audio import audioop
from tests.support.agent_calls import (CALLER, MUTE_SETTLE_BYTES, NUMBER, WaitingCustomer, set_browser_profile,
                                       signed_in, take_over_http)
from tests.support.bridge_state import BridgeState
from tests.support.browser import PAGE_TIMEOUT_SECONDS, chromium, fake_microphone_flags, fill, find, wait_for
from tests.support.controls import EmulatorControl
from tests.support.settings import ADMIN_PASSWORD, bridge_config
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

FILE_RATE = 16000
#: Syllable loudness per 250 ms of the speech file: no rotation of it, nor of it reversed, correlates above 0.27
#: with it, so a high correlation at some lag means the file's own envelope arrived.
SYLLABLES = (0.5, 0.25, 0, 0.75, 0.25, 0.75, 0.75, 0.25, 0.75, 0.75, 0.25, 0.5, 0.75, 0.75, 0.5, 0.5)
SYLLABLE_MS = 250


def speech_file(path: Path) -> list[float]:
    """Write a speech-like 16 kHz WAV (voiced 140 Hz with harmonics, syllables of the loudness above) and return
    its energy envelope (RMS per :data:`ENVELOPE_WINDOW_MS`)."""
    samples = []
    for i in range(int(FILE_RATE * 0.25 * len(SYLLABLES))):
        t = i / FILE_RATE
        loudness = SYLLABLES[int(t / 0.25)]
        envelope = loudness * math.sin(math.pi * ((t * 4.0) % 1.0)) ** 2
        phase = 2 * math.pi * 140.0 * t - (20.0 / 0.7) * math.cos(2 * math.pi * 0.7 * t)
        samples.append(int(9000 * envelope * sum(math.sin(k * phase) / k for k in range(1, 15))))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(FILE_RATE)
        out.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return envelope_of(samples, FILE_RATE)


def envelope_of(samples: list[int] | tuple[int, ...], rate: int, offset_ms: int = 0) -> list[float]:
    """RMS per syllable (:data:`SYLLABLE_MS`), starting ``offset_ms`` in."""
    window, start = rate * SYLLABLE_MS // 1000, rate * offset_ms // 1000
    return [math.sqrt(sum(x * x for x in samples[i:i + window]) / window)
            for i in range(start, len(samples) - window + 1, window)]


def pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b)) / var if var else 0.0


def best_correlation(samples: tuple[int, ...], reference: list[float]) -> float:
    """The highest correlation of the received audio's syllable envelope (at any 10 ms alignment) with the looping
    ``reference`` envelope at any lag."""
    n = len(reference)
    best = -1.0
    for offset_ms in range(0, SYLLABLE_MS, 10):
        received = envelope_of(samples, 8000, offset_ms)[:2 * n]
        for lag in range(n):
            best = max(best, pearson(received, [reference[(lag + i) % n] for i in range(len(received))]))
    return best


@pytest.fixture(scope="module")
def agent_bridge(redis_url: str, emulator_server: RunningServer,
                 fake_twilio_server: RunningServer) -> Iterator[tuple[RunningServer, str]]:
    """The bridge with the admin enabled (two workers: the page, its socket and the customer's relay may each
    land on either)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", f"agent-{port}", url),
           "ADMIN_PASSWORD": ADMIN_PASSWORD, "TWILIO_API_URL": fake_twilio_server.url}
    with run_gunicorn("app:create_app()", env, workers=2, port=port) as server:
        yield server, f"agent-{port}"


def test_agent_takes_talks_on_and_hangs_up_a_call_in_the_browser(
        agent_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str, tmp_path: Path,
        screenshot: Callable[[WebDriver, str], Path]) -> None:
    bridge, namespace = agent_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    state, keys = BridgeState(client, namespace), RedisKeys(namespace)
    set_browser_profile(client, keys)
    emulator.behaviour("silent")  # what plays in the page is only what the test sends for the agent
    reference = speech_file(tmp_path / "agent-speech.wav")

    with chromium(*fake_microphone_flags(tmp_path / "agent-speech.wav")) as browser:
        base = bridge.url
        browser.get(base + "/admin/agent")
        fill(browser, "name", "Agent Ana")
        fill(browser, "password", ADMIN_PASSWORD + Keys.ENTER)
        wait_for(browser, lambda: browser.current_url.endswith("/admin/agent"), "the agent page")
        assert "No calls are waiting" in browser.page_source

        customer = WaitingCustomer(bridge)
        try:
            assert customer.on_call.wait(PAGE_TIMEOUT_SECONDS), "the customer's call never reached its stream"
            (session,) = emulator.sessions()
            session_id = session["id"]
            # The session was created declaring both participants, as Kallglot's multi-participant example does.
            assert session["participants"] == [{"type": "customer", "language": "en"},
                                               {"type": "agent", "language": "es"}]

            # The waiting call appears on the page by itself (no reload), and the first take wins.
            take = find(browser, By.CSS_SELECTOR, f"#waiting-calls tr[data-session='{session_id}'] button.take")
            assert CALLER in browser.find_element(By.ID, "waiting-calls").text
            screenshot(browser, "agent-waiting")
            take.click()
            wait_for(browser, lambda: "/admin/agent/call/agt_" in browser.current_url, "the call page")
            leg_id = browser.current_url.rsplit("/", 1)[1]
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent && window.kbAgent.state")
                     == "on call", "the page on the call")

            # The agent's speech reaches Kallglot as speaker "agent", with the file's energy envelope.
            def agent_audio() -> bytes:
                received = emulator.session(session_id)["audio_received"].get("agent", "")
                return base64.b64decode(received)
            wait_for(browser, lambda: len(agent_audio()) >= 8000 * 9, "9 s of the agent's speech at Kallglot",
                     timeout=40)
            pcm = audioop.ulaw2lin(agent_audio()[8000:], 2)  # past the first second (audio start-up)
            speech = struct.unpack(f"<{len(pcm) // 2}h", pcm)
            assert max(envelope_of(speech, 8000)) > 500, "the agent's audio at Kallglot is silent"
            correlation = best_correlation(speech, reference)
            unrelated = best_correlation(speech, reference[::-1])  # what the check gives another envelope
            assert correlation > 0.85 > 0.6 > unrelated, \
                f"agent audio envelope correlates {correlation:.2f} with the file ({unrelated:.2f} with its reverse)"
            record = emulator.session(session_id)
            assert record["connections_live"] == 2 and record["sequences_increasing"]
            assert state.call(BROWSER_LEG, leg_id)["state"] == "live"
            assert state.has_live_heartbeat(BROWSER_LEG, leg_id)

            # Mute: the page goes on sending frames (the stream keeps its timing) but they are μ-law silence —
            # nothing of the microphone leaves the page; Unmute brings the speech back.
            mute = browser.find_element(By.ID, "mute")
            mute.click()
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent.muted") is True, "muted")
            muted_from = len(agent_audio()) + MUTE_SETTLE_BYTES
            wait_for(browser, lambda: len(agent_audio()) >= muted_from + 8000 * 2, "2 s of frames while muted")
            assert set(agent_audio()[muted_from:muted_from + 8000 * 2]) == {0xFF}, "microphone audio sent while muted"
            assert mute.get_attribute("aria-pressed") == "true"
            mute.click()
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent.muted") is False, "unmuted")
            unmuted_from = len(agent_audio()) + MUTE_SETTLE_BYTES
            wait_for(browser, lambda: len(agent_audio()) >= unmuted_from + 8000 * 2, "2 s of frames after unmute")
            pcm = audioop.ulaw2lin(agent_audio()[unmuted_from:unmuted_from + 8000 * 2], 2)
            assert max(envelope_of(struct.unpack(f"<{len(pcm) // 2}h", pcm), 8000)) > 500, "no speech after unmute"

            # Kallglot's audio for the agent plays in the page: 40 s of a 440 Hz tone (sent at once, faster than it
            # plays, as speech synthesis may), seen by the analyser after the jitter buffer.
            tone = audioop.lin2ulaw(struct.pack("<8000h", *(int(8000 * math.sin(2 * math.pi * 440 * i / 8000))
                                                           for i in range(8000))), 2) * 40
            messages = [{"type": "audio.output", "sequence": n,
                         "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                   "payload": base64.b64encode(tone[n * 800:(n + 1) * 800]).decode()}}
                        for n in range(400)]
            assert emulator.send(session_id, *messages) == 2  # the customer's and the agent's connections
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent.level()") > 0.05,
                     "the emulator's audio playing in the page")
            # Barge-in: Kallglot's audio.clear stops playback at once: silence long before the 40 s of tone end.
            emulator.send(session_id, {"type": "audio.clear"})
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent.clears") == 1
                     and browser.execute_script("return window.kbAgent.level()") < 0.005, "playback stopped by clear")
            emulator.send(session_id, *messages[:30])  # more speech for the agent, playing in the screenshot
            emulator.send(session_id, {"type": "transcript.final", "id": "utt-customer-1", "speaker": "customer",
                                       "language": "en", "text": "Hi, the invoice I got is wrong.",
                                       "translation": {"language": "es", "text": "Hola, la factura que recibí está mal."}})
            emulator.send(session_id, {"type": "transcript.final", "id": "utt-agent-1", "speaker": "agent",
                                       "language": "es", "text": "Buenos días, ¿en qué puedo ayudarle?",
                                       "translation": {"language": "en", "text": "Good morning, how can I help?"}})
            wait_for(browser, lambda: "Good morning, how can I help?" in
                     browser.find_element(By.ID, "agent-transcript").text, "the live transcript beside the controls")
            screenshot(browser, "agent-call")
            # The relay marks the end of that speech; the page echoes the mark once it has played it, so the
            # console's relay health shows the agent's playback lag as for phone legs.
            wait_for(browser, lambda: browser.execute_script("return window.kbAgent.marksEchoed") >= 1,
                     "the utterance's mark echoed after playback")
            wait_for(browser, lambda: any(
                e.kind == "relay" and e.data.get("speaker") == "agent" and "playback_lag_ms" in e.data
                for e in SessionEventLog(client, keys).latest(session_id, 200)), "the agent's playback lag, live")

            # Hang up from the page: the agent leg ends cleanly and, by the profile, the whole call.
            browser.find_element(By.ID, "hangup").click()
            wait_for(browser, lambda: state.call(BROWSER_LEG, leg_id).get("state") == "ended", "the agent leg ended")
            assert state.call(BROWSER_LEG, leg_id).get("end_reason") == "relay_carrier_stop"
            wait_for(browser, lambda: state.settled_ended(session_id), "the session ended, once")
            wait_for(browser, lambda: emulator.session(session_id)["status"] == "ended", "the Kallglot session ended")
            assert emulator.session(session_id)["end_calls"] == 1
            assert client.zscore(keys.agents_waiting(), session_id) is None
        finally:
            customer.release()
        assert customer.result is not None and customer.result.protocol_errors == []
    client.close()


def on_the_call(browser: WebDriver) -> bool:
    return browser.execute_script("return window.kbAgent ? window.kbAgent.state : ''") == "on call"


def test_a_closed_tab_is_a_lost_leg_the_call_is_offered_again_and_the_agent_rejoins(
        agent_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str, tmp_path: Path) -> None:
    bridge, namespace = agent_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    state, keys = BridgeState(client, namespace), RedisKeys(namespace)
    set_browser_profile(client, keys)
    emulator.behaviour("echo")
    speech_file(tmp_path / "agent-speech.wav")

    with chromium(*fake_microphone_flags(tmp_path / "agent-speech.wav")) as browser:
        browser.get(bridge.url + "/admin/agent")
        fill(browser, "name", "Agent Bo")
        fill(browser, "password", ADMIN_PASSWORD + Keys.ENTER)
        wait_for(browser, lambda: browser.current_url.endswith("/admin/agent"), "the agent page")
        customer = WaitingCustomer(bridge)
        try:
            assert customer.on_call.wait(PAGE_TIMEOUT_SECONDS), "the customer's call never reached its stream"
            (session,) = emulator.sessions()
            session_id = session["id"]
            find(browser, By.CSS_SELECTOR, f"#waiting-calls tr[data-session='{session_id}'] button.take").click()
            wait_for(browser, lambda: on_the_call(browser), "the page on the call")
            leg_id = browser.current_url.rsplit("/", 1)[1]
            call_page = browser.current_url

            # The tab goes away without hanging up: the agent's leg is lost, not ended cleanly, the customer stays
            # on with Kallglot, and the call is back on the agents' list.
            browser.get("about:blank")
            wait_for(browser, lambda: state.call(BROWSER_LEG, leg_id).get("state") == "ended",
                     "the agent leg given up")
            assert state.call(BROWSER_LEG, leg_id).get("end_reason") == "relay_carrier_lost"
            assert state.session(session_id)["status"] == "active"
            wait_for(browser, lambda: client.zscore(keys.agents_waiting(), session_id) is not None,
                     "the call offered to agents again")
            assert offer_record(client, keys, session_id)["reason"] == "agent_lost"

            # Reopening the call's page rejoins: the same leg is live again, its relay beating.
            browser.get(call_page)
            wait_for(browser, lambda: on_the_call(browser), "the page on the call again")
            wait_for(browser, lambda: state.call(BROWSER_LEG, leg_id).get("state") == "live", "the leg live again")
            wait_for(browser, lambda: state.has_live_heartbeat(BROWSER_LEG, leg_id), "the rejoined relay beating")
            assert client.zscore(keys.agents_waiting(), session_id) is None
            assert emulator.session(session_id)["connections_live"] == 2
        finally:
            customer.release()  # the customer hangs up
        wait_for(browser, lambda: state.settled_ended(session_id), "the session ended, once")
        wait_for(browser, lambda: browser.execute_script("return window.kbAgent.state") == "ended",
                 "the page told the call ended")
        assert state.call(BROWSER_LEG, leg_id).get("state") == "ended"
        assert emulator.session(session_id)["end_calls"] == 1
    client.close()


def offer_record(client: redis_lib.Redis, keys: RedisKeys, session_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.agent_offer(session_id)).items()}


def _close_of(url: str, http: requests.Session | None, *frames: str | bytes) -> tuple[int, str]:
    """Open ``/agent/media`` (with ``http``'s cookies), send ``frames``, return how the service closed it."""
    cookie = "; ".join(f"{c.name}={c.value}" for c in http.cookies) if http else ""
    ws = simple_websocket.Client.connect(url, headers={"Cookie": cookie} if cookie else None)
    deadline = time.monotonic() + PAGE_TIMEOUT_SECONDS
    try:
        for frame in frames:
            ws.send(frame)
        while time.monotonic() < deadline:
            ws.receive(timeout=1)
    except simple_websocket.ConnectionClosed:
        pass
    finally:
        if ws.connected:
            ws.close()
    return int(ws.close_reason), str(ws.close_message or "")


def test_the_agent_media_socket_refuses_everyone_but_the_tab_that_took_the_call(
        agent_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str) -> None:
    bridge, namespace = agent_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    set_browser_profile(client, RedisKeys(namespace))
    customer = WaitingCustomer(bridge)
    try:
        assert customer.on_call.wait(PAGE_TIMEOUT_SECONDS)
        (session,) = emulator.sessions()
        ana, bo = signed_in(bridge.url, "Ana"), signed_in(bridge.url, "Bo")
        wait_until(lambda: session["id"] in ana.get(bridge.url + "/admin/agent", timeout=10).text)
        page = ana.get(bridge.url + "/admin/agent", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        call_page = ana.post(f"{bridge.url}/admin/agent/take/{session['id']}", data={"csrf_token": csrf}, timeout=10)
        leg = re.search(r'data-leg="([^"]+)"', call_page.text).group(1)  # type: ignore[union-attr]
        token = re.search(r'data-token="([^"]+)"', call_page.text).group(1)  # type: ignore[union-attr]
        url = bridge.url.replace("http", "ws") + f"/agent/media?leg={leg}"
        start = json.dumps({"event": "start", "leg": leg, "token": token})

        assert _close_of(url, None, start) == (1008, "admin session required")
        assert _close_of(url, bo, start) == (1008, "not your call")
        assert _close_of(url, ana, json.dumps({"event": "start", "leg": leg, "token": "forged"}))[0] == 1008
        assert _close_of(url, ana, b"\x00binary")[0] == 1003
        assert _close_of(url, ana, json.dumps({"event": "media", "payload": ""}))[0] == 1008  # before start
        # The right tab: relayed until it hangs up; its token cannot be used a second time.
        frame = json.dumps({"event": "media", "payload": base64.b64encode(b"\x7f" * 160).decode()})
        assert _close_of(url, ana, start, *[frame] * 10, json.dumps({"event": "hangup"}))[0] == 1000
        assert base64.b64decode(emulator.session(session["id"])["audio_received"]["agent"]) == b"\x7f" * 1600
        assert _close_of(url, ana, start) == (1008, "relay token already used")
    finally:
        customer.release()
    client.close()


def test_an_agents_hang_up_leaves_the_customer_on_when_the_profile_says_so(
        agent_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str) -> None:
    """The other side of "by profile": without *When the agent hangs up, end the whole call*, the page's Hang up
    ends only the agent's leg (cleanly: not offered to agents again); the customer stays on with Kallglot."""
    bridge, namespace = agent_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    keys, state = RedisKeys(namespace), BridgeState(client, namespace)
    profile = NumberProfile(source_language="en", target_language="es", browser_agents=True,
                            agent_hangup_ends_call=False)
    client.set(keys.profile(NUMBER), profile.to_json())
    customer = WaitingCustomer(bridge)
    try:
        assert customer.on_call.wait(PAGE_TIMEOUT_SECONDS)
        (session,) = emulator.sessions()
        ana, leg, token = take_over_http(bridge.url, session["id"])
        start = json.dumps({"event": "start", "leg": leg, "token": token})
        assert _close_of(bridge.url.replace("http", "ws") + f"/agent/media?leg={leg}", ana, start,
                         json.dumps({"event": "hangup"}))[0] == 1000
        assert wait_until(lambda: state.call(BROWSER_LEG, leg).get("state") == "ended")
        assert state.call(BROWSER_LEG, leg)["end_reason"] == "relay_carrier_stop"
        assert state.session(session["id"])["status"] == "active"
        assert emulator.session(session["id"])["end_calls"] == 0
        assert client.zscore(keys.agents_waiting(), session["id"]) is None  # a hang-up is not a lost leg
    finally:
        customer.release()
    assert wait_until(lambda: state.settled_ended(session["id"]))
    client.close()


def test_a_customer_hanging_up_frees_the_agent_even_while_the_session_is_held_for_its_grace(
        agent_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str) -> None:
    bridge, namespace = agent_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    keys, state = RedisKeys(namespace), BridgeState(client, namespace)
    profile = NumberProfile(source_language="en", target_language="es", browser_agents=True, hangup_grace_seconds=60)
    client.set(keys.profile(NUMBER), profile.to_json())
    customer = WaitingCustomer(bridge)
    try:
        assert customer.on_call.wait(PAGE_TIMEOUT_SECONDS)
        (session,) = emulator.sessions()
        ana, leg, token = take_over_http(bridge.url, session["id"])
        threading.Timer(2.0, customer.release).start()  # the customer hangs up while the agent talks
        code, reason = _close_of(bridge.url.replace("http", "ws") + f"/agent/media?leg={leg}", ana,
                                 json.dumps({"event": "start", "leg": leg, "token": token}))
        assert (code, reason) == (1000, "call ended")
        assert state.session(session["id"])["status"] == "held"  # the grace runs; Kallglot did not end it
        assert state.call(BROWSER_LEG, leg)["state"] == "ended"
    finally:
        customer.release()
    client.close()
