"""The supervisor console end to end, across two bridge instances sharing one Redis.

Instance A (the suite's ``bridge_server``) relays a simulated Twilio call; instance B (``console``, the admin
enabled) serves the pages. Both under real gunicorn + gevent. Then Debian's headless chromium follows a call
on B's live pages (Server-Sent Events, no reload), reads the after-call transcript and plays the recording.
Screenshots go to ``$ADMIN_SCREENSHOT_DIR`` (``docs`` refreshes the README's) or the test's temp folder.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.settings import ADMIN_PASSWORD, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config
from tests.support.servers import RunningServer, run_gunicorn
from tests.support.browser import fill, find, wait_for

pytestmark = pytest.mark.e2e

# The live console's speed target (a transcript line on screen within 1 s of Kallglot sending it) is a figure for
# a measurement run, not a timed assertion here: these tests check that each line arrives, in order, complete.
TO, HOLD_SECONDS, STEP_TIMEOUT = "+14155550199", 60.0, 20.0


@pytest.fixture(scope="module")
def console(redis_url: str, emulator_server: RunningServer, bridge_server: RunningServer) -> Iterator[RunningServer]:
    """A second bridge instance, admin enabled, on the same Redis namespace as ``bridge_server``."""
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", "e2e", bridge_server.url),
           "ADMIN_PASSWORD": ADMIN_PASSWORD}
    with run_gunicorn("app:create_app()", env, workers=1) as server:
        yield server


class HeldCall:
    """A simulated call placed on ``bridge`` that stays connected until :meth:`hang_up`."""

    def __init__(self, bridge: RunningServer, emulator: EmulatorControl, caller: str, audio: bytes) -> None:
        self._on_call, self._release = threading.Event(), threading.Event()
        self.result: Any = None
        simulator = TwilioCallSimulator(bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)

        def hold(stream: SimulatedStream) -> None:
            self._on_call.set()
            self._release.wait(HOLD_SECONDS)

        def run() -> None:
            self.result = simulator.place_call(TO, caller, audio, pace=False, listen_seconds=0.2, hold_open=hold)

        self._thread = threading.Thread(target=run, name="held-call", daemon=True)
        self._thread.start()
        assert self._on_call.wait(STEP_TIMEOUT), "the simulated call never reached its media stream"
        (session,) = [s for s in emulator.sessions() if s["status"] != "ended"]  # the emulator was reset
        self.session_id = session["id"]

    def hang_up(self) -> None:
        self._release.set()
        self._thread.join(STEP_TIMEOUT)
        assert not self._thread.is_alive(), "the simulated call did not finish"
        assert self.result.protocol_errors == []


def signed_in(server: RunningServer) -> requests.Session:
    """A requests session signed in to the admin of ``server``."""
    http = requests.Session()
    page = http.get(server.url + "/admin/sign-in", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    response = http.post(server.url + "/admin/sign-in", timeout=10, allow_redirects=False,
                         data={"csrf_token": token, "password": ADMIN_PASSWORD, "name": "Sam"})
    assert response.status_code == 302
    return http


def sse(http: requests.Session, url: str) -> Iterator[tuple[str, dict[str, Any] | list[Any]]]:
    """(event, data) of an SSE stream as they arrive (each socket read bounded)."""
    response = http.get(url, stream=True, timeout=(5, 20), headers={"Accept": "text/event-stream"})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    buffer = ""
    try:
        for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
                if "data" in fields:
                    yield fields.get("event", "message"), json.loads(fields["data"])
    finally:
        response.close()


def test_sse_follows_a_leg_relayed_by_another_instance(console: RunningServer, bridge_server: RunningServer,
                                                       emulator: EmulatorControl) -> None:
    http = signed_in(console)
    live_list = sse(http, console.url + "/admin/live/events")
    call = HeldCall(bridge_server, emulator, "+15557770001", b"\xff" * 1600)
    try:
        # The list on B learns of the call relayed by A (snapshot, or a row soon after).
        deadline, seen = time.monotonic() + STEP_TIMEOUT, False
        while not seen and time.monotonic() < deadline:
            kind, data = next(live_list)
            rows = data if kind == "snapshot" else [data] if kind == "row" else []
            seen = any(r["id"] == call.session_id and any(leg["state"] == "live" for leg in r["legs"]) for r in rows)
        assert seen, "the live list on the console instance never showed the call"

        session_stream = sse(http, f"{console.url}/admin/live/events?session={call.session_id}")
        kind, data = next(session_stream)  # the leg's "started", written by instance A
        assert (kind, data["state"], data["speaker"]) == ("leg", "started", "customer")
        assert emulator.send(call.session_id, {
            "type": "transcript.final", "id": "t-1", "speaker": "customer", "language": "en", "text": "Good morning",
            "translation": {"language": "es", "text": "Buenos días"}}) == 1
        kind, data = next(e for e in session_stream if e[0] == "transcript")
        assert (data["text"], data["translation"], data["final"]) == ("Good morning", "Buenos días", True)
    finally:
        call.hang_up()
    deadline = time.monotonic() + STEP_TIMEOUT
    for kind, data in live_list:
        if kind == "gone" and data == {"id": call.session_id}:
            break
        assert time.monotonic() < deadline, "the ended call never left the live list"


def test_browser_follows_a_call_live_then_reads_and_plays_it_after(
        console: RunningServer, bridge_server: RunningServer, emulator: EmulatorControl, browser: WebDriver,  # noqa: F811
        screenshot: Callable[[WebDriver, str], Path]) -> None:  # noqa: F811
    base = console.url
    browser.get(base + "/admin/live")
    fill(browser, "name", "Sam")
    fill(browser, "password", ADMIN_PASSWORD + Keys.ENTER)
    wait_for(browser, lambda: browser.current_url.endswith("/admin/live")
             and browser.execute_script("return document.documentElement.dataset.live") == "following",
             "the live page following its event stream")

    # 2 s of caller audio: the emulator answers with transcript lines of its own, and records it.
    call = HeldCall(bridge_server, emulator, "+15557770002", bytes(range(0x10, 0x70)) * 160)
    try:
        row_xpath = f"//table[@id='live-sessions']//tr[@data-session='{call.session_id}']"
        wait_for(browser, lambda: bool(browser.find_elements(By.XPATH, row_xpath)), "the call appearing, no reload")
        screenshot(browser, "live-console")
        find(browser, By.XPATH, row_xpath + "//a").click()
        wait_for(browser, lambda: browser.execute_script("return document.documentElement.dataset.live") == "following",
                 "the session page following its events")
        lines = [("customer", "I ordered a blue jacket", "Pedí una chaqueta azul"),
                 ("agent", "Let me check that for you", "Déjeme comprobarlo"),
                 ("customer", "It has not arrived yet", "Todavía no ha llegado")]
        for n, (speaker, text, translation) in enumerate(lines, start=1):
            emulator.send(call.session_id, {"type": "transcript.partial", "id": f"b-{n}", "speaker": speaker,
                                            "language": "en", "text": text.split()[0] + " …"})
            emulator.send(call.session_id, {"type": "transcript.final", "id": f"b-{n}", "speaker": speaker,
                                            "language": "en", "text": text,
                                            "translation": {"language": "es", "text": translation}})
            xpath = f"//table[@id='live-transcript']//tr[contains(@class,'final')][td[1][contains(., '{text}')]]"
            wait_for(browser, lambda: bool(browser.find_elements(By.XPATH, xpath)), f"line {n} on the live page",
                     timeout=5)
            row = browser.find_element(By.XPATH, xpath)
            assert translation in row.text and speaker in row.text and row.get_attribute("data-received-at")
        # Each final replaced its partial: no italic leftovers for these lines.
        assert not browser.find_elements(By.XPATH, "//tr[contains(@class,'partial')][@data-slot='b-1']")
        screenshot(browser, "live-transcript")
        browser.back()
        wait_for(browser, lambda: bool(browser.find_elements(By.XPATH, row_xpath)), "the call back on the list")
        wait_for(browser, lambda: browser.execute_script("return document.documentElement.dataset.live") == "following",
                 "the list following again")
    finally:
        call.hang_up()
    wait_for(browser, lambda: not browser.find_elements(By.XPATH, row_xpath), "the ended call leaving, no reload")

    # After the call: the call log links the transcript; the recording plays through the admin.
    browser.get(base + "/admin/calls?number=%2B14155550199")
    link = f"//a[@class='transcript-link'][contains(@href, '{call.session_id}')]"
    wait_for(browser, lambda: bool(browser.find_elements(By.XPATH, link)), "the transcript link", reload=True)
    find(browser, By.XPATH, link).click()
    wait_for(browser, lambda: "I ordered a blue jacket" in browser.page_source, "the after-call transcript",
             reload=True)
    assert "Pedí una chaqueta azul" in browser.page_source and "(emulated utterance 1)" in browser.page_source
    audio = find(browser, By.CSS_SELECTOR, "#recordings audio")
    played = browser.execute_async_script(
        "const [audio, done] = arguments; audio.muted = true;"
        "audio.addEventListener('error', () => done('error ' + (audio.error && audio.error.code)));"
        "audio.addEventListener('timeupdate', () => { if (audio.currentTime > 0.3) done('played ' + audio.duration); });"
        "audio.play().catch(e => done('refused ' + e));", audio)
    assert played.startswith("played"), played
    assert float(played.split()[1]) > 1.5  # the 2 s the caller said (MP3 duration, approximately)
    # Kallglot's analysis, on request (it costs a credit): shown on the same page once complete.
    find(browser, By.XPATH, "//button[text()='Ask Kallglot to analyse this call']").click()
    wait_for(browser, lambda: "completed" in find(browser, By.ID, "analysis").text, "the analysis", reload=True)
    assert "4 turns between agent and customer" in find(browser, By.ID, "analysis").text
    screenshot(browser, "transcript")
    find(browser, By.LINK_TEXT, "Usage").click()
    wait_for(browser, lambda: "+14155550199" in browser.page_source, "the number's billed minutes")
    screenshot(browser, "usage")
