"""The admin in a real browser: Debian's headless chromium driven by Selenium through the system chromedriver.

An admin signs in, creates a profile, points the number here, a simulated Twilio call to it shows on the
live-calls page and then in the call log. Each page is screenshotted: into ``$ADMIN_SCREENSHOT_DIR`` when
set (``ADMIN_SCREENSHOT_DIR=docs`` refreshes the README's screenshots), else into the test's temp folder.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.browser import PAGE_TIMEOUT_SECONDS, click, fill, find, wait_for
from tests.support.controls import EmulatorControl
from tests.support.settings import (
    ADMIN_PASSWORD, TELNYX_API_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config,
)
from tests.support.servers import RunningServer, free_port, run_gunicorn

pytestmark = pytest.mark.e2e

NUMBER, CALLER = "+14155550123", "+15551230000"
NUMBER_SID = "PN" + "d" * 32
CALL_HOLD_SECONDS = 30.0


@pytest.fixture(scope="module")
def admin_bridge(redis_url: str, emulator_server: RunningServer, fake_twilio_server: RunningServer,
                 fake_telnyx_server: RunningServer) -> Iterator[RunningServer]:
    """The bridge under gunicorn + gevent with the admin enabled and the carrier APIs pointed at the fakes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", f"browser-{port}", url),
           "ADMIN_PASSWORD": ADMIN_PASSWORD, "TWILIO_API_URL": fake_twilio_server.url,
           "TELNYX_API_KEY": TELNYX_API_KEY, "TELNYX_API_URL": fake_telnyx_server.url + "/v2"}
    with run_gunicorn("app:create_app()", env, workers=2, port=port) as server:
        yield server


def seed_fakes(twilio: RunningServer, telnyx: RunningServer) -> None:
    """One Twilio number (not yet pointed here) and one Telnyx number on a TeXML application."""
    requests.post(twilio.url + "/_fake/reset", timeout=5, json={
        "account_sid": TWILIO_ACCOUNT_SID, "auth_token": TWILIO_AUTH_TOKEN, "numbers": [
            {"sid": NUMBER_SID, "phone_number": NUMBER, "friendly_name": "Front desk", "voice_method": "POST",
             "voice_url": "https://demo.twilio.com/welcome/voice/", "voice_fallback_url": None,
             "status_callback": None, "status_callback_method": "POST", "voice_application_sid": None}]},
    ).raise_for_status()
    requests.post(telnyx.url + "/_fake/reset", timeout=5, json={
        "api_key": TELNYX_API_KEY,
        "phone_numbers": [{"id": "1", "phone_number": "+14155550456", "connection_id": "texml-1",
                           "connection_name": "Support line", "status": "active", "tags": []}],
        "texml_applications": [{"id": "texml-1", "friendly_name": "Support line", "voice_url": None}],
        "call_control_applications": []},
    ).raise_for_status()


def test_admin_configures_a_number_and_watches_its_call(
        admin_bridge: RunningServer, browser: WebDriver, emulator: EmulatorControl,
        fake_twilio_server: RunningServer, fake_telnyx_server: RunningServer,
        screenshot: Callable[[WebDriver, str], Path]) -> None:
    seed_fakes(fake_twilio_server, fake_telnyx_server)
    base = admin_bridge.url

    # Sign in (keyboard only: type and press Enter).
    browser.get(base + "/admin/numbers")
    assert "/admin/sign-in" in browser.current_url
    fill(browser, "name", "Grace")
    screenshot(browser, "sign-in")
    fill(browser, "password", ADMIN_PASSWORD + Keys.ENTER)
    wait_for(browser, lambda: browser.current_url.endswith("/admin/numbers"), "the numbers page")

    # Create a profile; a bad value first comes back with the error next to the field and values kept.
    find(browser, By.LINK_TEXT, "Add a number").click()
    fill(browser, "number", NUMBER)
    browser.find_element(By.CSS_SELECTOR, "#mode option[value='assistive_translation']").click()
    fill(browser, "source_language", "de")
    fill(browser, "target_language", "fr")
    fill(browser, "greeting", "Willkommen beim Support")
    fill(browser, "reconnect_window_seconds", "900")
    fill(browser, "metadata_key_1", "team")
    fill(browser, "metadata_value_1", "support-berlin")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]:not(.link)").click()
    error = find(browser, By.ID, "reconnect_window_seconds-error")
    assert "between 0 and 300" in error.text
    assert browser.find_element(By.ID, "number").get_attribute("value") == NUMBER
    assert browser.find_element(By.ID, "metadata_value_1").get_attribute("value") == "support-berlin"
    screenshot(browser, "number-form-errors")
    fill(browser, "reconnect_window_seconds", "120")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]:not(.link)").click()
    wait_for(browser, lambda: f"Saved {NUMBER}" in browser.page_source, "the saved notice")
    assert "team=support-berlin" in browser.page_source
    screenshot(browser, "numbers")

    # Point the Twilio number here with one button.
    find(browser, By.LINK_TEXT, "Connect a number").click()
    find(browser, By.CSS_SELECTOR, f"button[aria-label='Point {NUMBER} at this service']").click()
    wait_for(browser, lambda: f"{NUMBER} now points at this service." in browser.page_source, "connected")
    screenshot(browser, "connect")
    updates = [r for r in requests.get(fake_twilio_server.url + "/_fake/requests", timeout=5).json()["requests"]
               if r["method"] == "POST"]
    assert updates and updates[-1]["form"]["VoiceUrl"] == base + "/twilio/voice"

    # A call to the number, held open while the admin watches it live.
    on_call, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def hold(stream: SimulatedStream) -> None:
        on_call.set()
        release.wait(CALL_HOLD_SECONDS)

    def call() -> None:
        simulator = TwilioCallSimulator(base, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
        outcome["result"] = simulator.place_call(NUMBER, CALLER, b"\xff" * 1600, pace=False, listen_seconds=0.2,
                                                 hold_open=hold)

    caller = threading.Thread(target=call, name="simulated-call", daemon=True)
    caller.start()
    try:
        assert on_call.wait(PAGE_TIMEOUT_SECONDS), "the simulated call never reached its media stream"
        (session,) = [s for s in emulator.sessions() if s["routing"] == {"phone_number": NUMBER}]
        assert (session["mode"], session["source_language"], session["target_language"]) == \
            ("assistive_translation", "de", "fr")
        find(browser, By.LINK_TEXT, "Live calls").click()
        wait_for(browser, lambda: session["id"] in browser.page_source and "relay ok" in browser.page_source,
                 "the call on the live page with its relay beating", reload=True)
        row_text = live_row_text(browser, session["id"])
        assert f"{CALLER} → {NUMBER}" in row_text and "twilio" in row_text and "live" in row_text
        assert "relay ok" in row_text  # the media socket is up and its relay beats
        screenshot(browser, "live")
    finally:
        release.set()
        caller.join(PAGE_TIMEOUT_SECONDS)
    assert not caller.is_alive(), "the simulated call did not finish"
    assert outcome["result"].protocol_errors == []

    # Then in the call log, filtered by the number.
    find(browser, By.LINK_TEXT, "Call log").click()
    fill(browser, "number", NUMBER + Keys.ENTER)
    # (The filter's GET navigates asynchronously after Enter: wait for the filtered page, not the unfiltered one.)
    wait_for(browser, lambda: "number=" in browser.current_url and "ended cleanly" in browser.page_source,
             "the ended call in the filtered log", reload=True)
    assert session["id"] in browser.page_source
    click(browser, By.CSS_SELECTOR, "#call-log details summary")  # show the recorded events (the filtered page)
    screenshot(browser, "calls")

    find(browser, By.LINK_TEXT, "Audit").click()
    wait_for(browser, lambda: browser.current_url.endswith("/admin/audit"), "the audit page")
    for text in ("create profile", "connect twilio number", "Grace"):
        assert text in find(browser, By.TAG_NAME, "table").text
    screenshot(browser, "audit")

    # Readable on a phone: nothing overflows the viewport sideways except inside scrollable tables.
    browser.set_window_size(390, 844)
    find(browser, By.LINK_TEXT, "Numbers").click()
    wait_for(browser, lambda: browser.current_url.endswith("/admin/numbers"), "the numbers page")
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    screenshot(browser, "numbers-phone")


def live_row_text(browser: WebDriver, session_id: str) -> str:
    """The text of the session's row on the live page. The page replaces rows as Server-Sent Events arrive, so a
    row found a moment ago can be gone when it is read (StaleElementReferenceException): find it again."""
    xpath = f"//table[@id='live-sessions']//tr[.//code[text()='{session_id}']]"
    for _ in range(50):
        try:
            return browser.find_element(By.XPATH, xpath).text
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"the live row of {session_id} kept being replaced")
