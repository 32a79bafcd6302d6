"""The issue's "Done when", as README "Agents in the browser" tells a newcomer to try it: in the one-command demo,
``numbers set … --browser-agents`` and ``kallglot-simulate-call --listen 60`` from the demo's directory, then an
agent in Debian's headless chromium (a fake microphone playing a speech-like file) signs in with the banner's
password, takes the call on ``/admin/agent``, talks on it (the demo's emulator receives the agent's speech and
echoes it: it plays in the page), and hangs up: the agent's leg ends and — the profile's *When the agent hangs up,
end the whole call* being on by default — the whole call, once; the simulated caller is hung up."""
from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.support.browser import chromium, fake_microphone_flags, fill, find, wait_for
from tests.support.demo import demo_environment, run_demo, venv_workdir
from tests.test_agent_browser import speech_file

pytestmark = pytest.mark.e2e

NUMBER = "+15005550006"  # the demo's first Twilio number, as in the README
#: A `flask` process imports the whole app (slow on a loaded machine; see tests/test_demo.py).
CLI_TIMEOUT_SECONDS = 240
#: Bounds for what happens once the page is up, on a loaded 2-core machine.
CALL_TIMEOUT_SECONDS = 40.0


def test_the_readmes_demo_steps_let_an_agent_take_talk_on_and_end_a_call_in_the_browser(tmp_path: Path) -> None:
    workdir = venv_workdir(tmp_path)
    with run_demo(workdir, demo_environment()) as demo:
        settings, env = demo.settings, demo_environment()
        venv = workdir / ".venv" / "bin"
        done = subprocess.run([str(venv / "flask"), "--app", "app:create_app()", "numbers", "set", NUMBER,
                               "--source", "en", "--target", "es", "--browser-agents", "--browser-agent-wait", "60"],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)
        assert done.returncode == 0, done.stderr
        emulator_url = settings["KALLGLOT_API_URL"].removesuffix("/v1")

        def sessions() -> list[dict]:
            return requests.get(emulator_url + "/_emulator/sessions", timeout=5).json()["sessions"]

        with open(tmp_path / "caller.log", "wb") as caller_log:
            caller = subprocess.Popen([str(venv / "kallglot-simulate-call"), "--listen", "60"], cwd=workdir, env=env,
                                      stdout=caller_log, stderr=subprocess.STDOUT)
        try:
            with chromium(*fake_microphone_flags(_speech(tmp_path))) as browser:
                browser.get(demo.base_url + "/admin/agent")
                fill(browser, "name", "Demo Agent")
                fill(browser, "password", settings["ADMIN_PASSWORD"] + Keys.ENTER)
                wait_for(browser, lambda: browser.current_url.endswith("/admin/agent"), "the agent page")
                find(browser, By.CSS_SELECTOR, "#waiting-calls button.take")  # the caller's call, listed by itself
                (session,) = sessions()
                assert session["participants"] == [{"type": "customer", "language": "en"},
                                                   {"type": "agent", "language": "es"}]
                browser.find_element(By.CSS_SELECTOR,
                                     f"#waiting-calls tr[data-session='{session['id']}'] button.take").click()
                wait_for(browser, lambda: browser.execute_script("return window.kbAgent && window.kbAgent.state")
                         == "on call", "the page on the call", timeout=CALL_TIMEOUT_SECONDS)

                def agent_bytes() -> int:
                    record = requests.get(f"{emulator_url}/_emulator/sessions/{session['id']}", timeout=5).json()
                    return len(base64.b64decode(record["audio_received"].get("agent", "")))
                wait_for(browser, lambda: agent_bytes() >= 8000 * 2, "2 s of the agent's speech at the emulator",
                         timeout=CALL_TIMEOUT_SECONDS)
                # The demo's emulator echoes what it hears: the agent's own speech comes back and plays in the page.
                wait_for(browser, lambda: browser.execute_script("return window.kbAgent.peakLevel") > 0.02,
                         "Kallglot's audio playing in the page", timeout=CALL_TIMEOUT_SECONDS)

                browser.find_element(By.ID, "hangup").click()
                wait_for(browser, lambda: browser.execute_script("return window.kbAgent.closeCode") == 1000,
                         "the page's socket closed after Hang up", timeout=CALL_TIMEOUT_SECONDS)
                wait_for(browser, lambda: sessions()[0]["status"] == "ended", "the call ended with the agent's hang-up",
                         timeout=CALL_TIMEOUT_SECONDS)
                (session,) = sessions()
                assert session["end_calls"] == 1 and session["connections_live"] == 0
            # The caller was hung up long before its 60 s of listening were over.
            assert caller.wait(timeout=CALL_TIMEOUT_SECONDS) is not None, (tmp_path / "caller.log").read_text()
            assert "server closed first: True" in (tmp_path / "caller.log").read_text()
        finally:
            if caller.poll() is None:
                caller.terminate()
                caller.wait(timeout=30)
        assert "Traceback" not in demo.output()


def _speech(tmp_path: Path) -> Path:
    """The agent's fake microphone: the browser test's speech-like file."""
    path = tmp_path / "agent-speech.wav"
    speech_file(path)
    return path
