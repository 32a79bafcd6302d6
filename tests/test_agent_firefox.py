"""The agent's pages in Firefox: Debian's headless firefox-esr (no geckodriver here: the test speaks WebDriver BiDi,
which Firefox serves by itself) on a fresh profile with Firefox's fake microphone (a tone) and no permission
prompt, the bridge under gunicorn + gevent, a simulated Twilio customer, the Kallglot emulator.

The test signs in over HTTP and hands that admin session to Firefox through a single-use login URL of a test-only
wrapper app (:mod:`tests.support.one_use_login`) that lands on the Agent page. The customer calls; the page's own
refresh lists the call; Take call (pressed through BiDi) opens the call page. Checked on the server side: the
page's AudioWorklet sent μ-law frames over ``/agent/media`` (through the CSP's ``connect-src 'self'``, which
Firefox applies to ``ws:``) and the emulator received them as ``speaker: agent`` with the tone's energy; audio the
emulator sends for the agent played in the page — its jitter buffer reached the relay's mark in real time and
echoed it. Then the page itself, asked through BiDi: its analyser saw that audio, ``audio.clear`` silences 40 s of
it at once, Mute sends μ-law silence, and Hang up ends the agent's leg cleanly and, by the profile, the call once.
"""
from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from app.calls.agent_queue import BROWSER_LEG
from app.calls.events import SessionEventLog
from app.redis_keys import RedisKeys
from app.relay.audio import audioop
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl
from tests.support.firefox import RunningFirefox, firefox_at
from tests.support.one_use_login import hand_over
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import ADMIN_PASSWORD, bridge_config
from tests.support.waiting import wait_until
from tests.support.agent_calls import MUTE_SETTLE_BYTES, WaitingCustomer, set_browser_profile, signed_in

pytestmark = pytest.mark.e2e

#: Firefox starts slowly on a loaded 2-core machine: bounds for what the page does once it is up.
FIREFOX_TIMEOUT_SECONDS = 60.0
#: Silence after ``audio.clear`` must come long before the 40 s of tone queued in the page would end.
CLEAR_TIMEOUT_SECONDS = 10.0


@pytest.fixture(scope="module")
def firefox_bridge(redis_url: str, emulator_server: RunningServer,
                   fake_twilio_server: RunningServer) -> Iterator[tuple[RunningServer, str]]:
    """The bridge with the admin enabled, behind the test-only single-use login route."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    namespace = f"firefox-{port}"
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", namespace, url),
           "ADMIN_PASSWORD": ADMIN_PASSWORD, "TWILIO_API_URL": fake_twilio_server.url}
    with run_gunicorn("tests.support.one_use_login:create_app()", env, workers=2, port=port) as server:
        yield server, namespace


def _agent_audio(emulator: EmulatorControl, session_id: str) -> bytes:
    return base64.b64decode(emulator.session(session_id)["audio_received"].get("agent", ""))


def _rms(mulaw: bytes) -> float:
    pcm = audioop.ulaw2lin(mulaw, 2)
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    return math.sqrt(sum(x * x for x in samples) / len(samples)) if samples else 0.0


def _agent_playback_lags(client: redis_lib.Redis, keys: RedisKeys, session_id: str) -> list[int]:
    return [int(e.data["playback_lag_ms"]) for e in SessionEventLog(client, keys).latest(session_id, 200)
            if e.kind == "relay" and e.data.get("speaker") == "agent" and "playback_lag_ms" in e.data]


def _ask(firefox: RunningFirefox, expression: str) -> Any:
    """``expression`` in the page, or None while there is none to ask (the tab is between two pages)."""
    try:
        return firefox.evaluate(expression)
    except AssertionError:
        return None


def test_firefox_takes_the_call_its_microphone_reaches_kallglot_and_kallglots_audio_plays(
        firefox_bridge: tuple[RunningServer, str], emulator: EmulatorControl, redis_url: str) -> None:
    bridge, namespace = firefox_bridge
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    state, keys = BridgeState(client, namespace), RedisKeys(namespace)
    set_browser_profile(client, keys)
    emulator.behaviour("silent")  # what plays in the page is only what the test sends for the agent
    ana = signed_in(bridge.url, "Firefox Ana")
    # The page is served under the admin's CSP: its socket may only go to this origin.
    csp = ana.head(bridge.url + "/admin/agent", timeout=10).headers["Content-Security-Policy"]
    assert "connect-src 'self'" in csp and "default-src 'none'" in csp
    login = hand_over(client, namespace, [(c.name, c.value) for c in ana.cookies], "/admin/agent")
    with firefox_at(bridge.url + login) as firefox:
        # Firefox on the Agent page; the customer calls; the page's own refresh lists the call; Take call.
        assert wait_until(lambda: _ask(firefox, "location.pathname === '/admin/agent' && document.readyState")
                          == "complete",
                          timeout=FIREFOX_TIMEOUT_SECONDS), f"Firefox never showed the Agent page: {firefox.output()}"
        customer = WaitingCustomer(bridge)
        try:
            assert customer.on_call.wait(FIREFOX_TIMEOUT_SECONDS), "the customer's call never reached its stream"
            (session,) = emulator.sessions()
            session_id = session["id"]
            take = f"document.querySelector(\"#waiting-calls tr[data-session='{session_id}'] button.take\")"
            assert wait_until(lambda: firefox.evaluate(f"!!{take}"), timeout=FIREFOX_TIMEOUT_SECONDS), \
                "the waiting call never appeared on Firefox's Agent page"
            firefox.evaluate(f"{take}.click()")
            assert wait_until(lambda: str(_ask(firefox, "location.pathname")).startswith("/admin/agent/call/agt_"),
                              timeout=FIREFOX_TIMEOUT_SECONDS), "Take call did not open the call page"
            leg_id = firefox.evaluate("location.pathname").rsplit("/", 1)[1]

            # Firefox's fake microphone (a tone) reaches Kallglot as the agent, through the worklet's μ-law frames.
            assert wait_until(lambda: len(_agent_audio(emulator, session_id)) >= 8000 * 3,
                              timeout=FIREFOX_TIMEOUT_SECONDS), \
                f"no agent audio from Firefox reached Kallglot; Firefox said:\n{firefox.output()}"
            assert client.exists(f"{namespace}:test-only:login:{login.rsplit('/', 1)[1]}") == 0  # used once
            heard = _agent_audio(emulator, session_id)[8000:]  # past the first second (audio start-up)
            assert _rms(heard) > 500, f"the agent's audio at Kallglot is silent (RMS {_rms(heard):.0f})"
            assert len(heard) % 160 == 0  # whole 20 ms frames
            assert state.call(BROWSER_LEG, leg_id)["state"] == "live"
            assert state.has_live_heartbeat(BROWSER_LEG, leg_id)
            assert emulator.session(session_id)["connections_live"] == 2

            # Kallglot's audio for the agent: 1.5 s of a 440 Hz tone, sent at once (faster than it plays). The
            # relay marks the utterance's end; the page echoes the mark only when its jitter buffer has played up
            # to it, so the lag it reports is about the tone's length.
            tone = audioop.lin2ulaw(struct.pack("<12000h", *(int(8000 * math.sin(2 * math.pi * 440 * i / 8000))
                                                            for i in range(12000))), 2)
            messages: list[dict[str, Any]] = [
                {"type": "audio.output", "sequence": n, "audio": {
                    "encoding": "mulaw", "sample_rate_hz": 8000,
                    "payload": base64.b64encode(tone[n * 800:(n + 1) * 800]).decode()}} for n in range(15)]
            assert emulator.send(session_id, *messages) == 2  # the customer's and the agent's connections
            lags = wait_until(lambda: _agent_playback_lags(client, keys, session_id),
                              timeout=FIREFOX_TIMEOUT_SECONDS)
            assert lags, f"the page never echoed the mark (Kallglot's audio did not play): {firefox.output()}"
            assert lags[0] >= 1000, f"the mark was echoed {lags[0]} ms after sending: before 1.5 s had played"

            # The page itself, asked through WebDriver BiDi: its analyser (after the jitter buffer) saw the tone.
            assert firefox.evaluate("window.kbAgent.peakLevel") > 0.05, firefox.output()
            # Barge-in: 40 s of tone sent at once plays, and Kallglot's audio.clear silences it at once.
            emulator.send(session_id, *[
                {"type": "audio.output", "sequence": 100 + n, "audio": {
                    "encoding": "mulaw", "sample_rate_hz": 8000,
                    "payload": base64.b64encode((tone[:8000] * 40)[n * 800:(n + 1) * 800]).decode()}}
                for n in range(400)])
            assert wait_until(lambda: firefox.evaluate("window.kbAgent.level()") > 0.05,
                              timeout=FIREFOX_TIMEOUT_SECONDS), "the 40 s of tone did not play"
            emulator.send(session_id, {"type": "audio.clear"})
            assert wait_until(lambda: firefox.evaluate("window.kbAgent.clears === 1 && window.kbAgent.level() < 0.005"),
                              timeout=CLEAR_TIMEOUT_SECONDS), "audio.clear did not stop the playback"

            # Mute: frames go on, as μ-law silence (nothing of the microphone leaves the page).
            firefox.evaluate("document.getElementById('mute').click()")
            assert firefox.evaluate("window.kbAgent.muted") is True
            muted_from = len(_agent_audio(emulator, session_id)) + MUTE_SETTLE_BYTES
            assert wait_until(lambda: len(_agent_audio(emulator, session_id)) >= muted_from + 8000 * 2,
                              timeout=FIREFOX_TIMEOUT_SECONDS), "no frames while muted"
            assert set(_agent_audio(emulator, session_id)[muted_from:muted_from + 8000 * 2]) == {0xFF}

            # Hang up from the page: the agent's leg ends cleanly and, by the profile, the whole call.
            firefox.evaluate("document.getElementById('hangup').click()")
            assert wait_until(lambda: state.call(BROWSER_LEG, leg_id).get("state") == "ended",
                              timeout=FIREFOX_TIMEOUT_SECONDS), "Hang up did not end the agent's leg"
            assert state.call(BROWSER_LEG, leg_id)["end_reason"] == "relay_carrier_stop"
            assert wait_until(lambda: state.settled_ended(session_id), timeout=FIREFOX_TIMEOUT_SECONDS)
            assert wait_until(lambda: firefox.evaluate("window.kbAgent.closeCode") == 1000,
                              timeout=FIREFOX_TIMEOUT_SECONDS), "the page's socket was not closed after Hang up"
        finally:
            customer.release()  # the customer's simulator stops (it was hung up by the agent's Hang up)
    assert wait_until(lambda: state.settled_ended(session_id), timeout=FIREFOX_TIMEOUT_SECONDS)
    assert state.call(BROWSER_LEG, leg_id).get("state") == "ended"
    assert emulator.session(session_id)["end_calls"] == 1
    client.close()
