"""Browser tests' shared parts: headless Debian chromium through the system chromedriver (never a downloaded
one), full-page screenshots, and bounded waits. The fixtures reach every test module through tests/conftest.py."""
from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_SECONDS = 20.0


@contextmanager
def chromium(*extra_flags: str) -> Iterator[WebDriver]:
    """Headless chromium with a fresh profile and ``extra_flags`` (skips only when chromium or its driver is not
    installed)."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are not installed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="kb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900", *extra_flags]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_TIMEOUT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def fake_microphone_flags(wav: Path) -> tuple[str, ...]:
    """Chromium flags for a microphone that plays ``wav`` (looped), granted without a prompt, and audio that
    plays without a user gesture."""
    return ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless chromium with a fresh profile (skips only when chromium or its driver is not installed)."""
    with chromium() as driver:
        yield driver


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[[WebDriver, str], Path]:
    """Save a full-page PNG of the current page as ``admin-<name>.png``."""
    folder = Path(os.environ.get("ADMIN_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def save(driver: WebDriver, name: str) -> Path:
        # Chromium's own full-page capture (a window resize races with layout in headless mode).
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path = folder / f"admin-{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
    return save


def wait_for(driver: WebDriver, check: Callable[[], bool], what: str, *, reload: bool = False,
             timeout: float = PAGE_TIMEOUT_SECONDS) -> None:
    """Poll ``check`` (reloading the page each time when ``reload``) until true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; page:\n{driver.page_source[:3000]}")
        time.sleep(0.2)
        if reload:
            driver.refresh()


def find(driver: WebDriver, by: str, value: str) -> WebElement:
    """The element, waiting (bounded) for it: a click that submits a form returns before the next page loads."""
    return WebDriverWait(driver, PAGE_TIMEOUT_SECONDS).until(lambda d: d.find_element(by, value))


def click(driver: WebDriver, by: str, value: str) -> None:
    """Click the element, finding it again (bounded) if the page was replaced between finding and clicking: a form
    submitted with Enter navigates asynchronously, so an element of the old page can go stale under the click."""
    def clicked(d: WebDriver) -> bool:
        try:
            d.find_element(by, value).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    WebDriverWait(driver, PAGE_TIMEOUT_SECONDS).until(clicked)


def fill(driver: WebDriver, field_id: str, value: str) -> None:
    element = find(driver, By.ID, field_id)
    element.clear()
    element.send_keys(value)
