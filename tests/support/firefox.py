"""Debian's firefox-esr, headless, without geckodriver (there is none here): a fresh profile whose ``user.js``
gives a fake microphone (a tone) without a permission prompt and lets audio play without a user gesture, started
at one URL. Web Audio needs an output device to run at all (without one Firefox's AudioContext stays "suspended"),
so a private PulseAudio with a null sink runs beside it. Tests observe what the page does from the server side
(Redis, the emulator), and ask the page itself through WebDriver BiDi, which Firefox serves by itself on
``--remote-debugging-port`` (:meth:`RunningFirefox.evaluate`: read ``window.kbAgent``, press a button)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import json
import time
from collections.abc import Iterator
from typing import Any
from contextlib import contextmanager
from pathlib import Path

import pytest
import websocket  # websocket-client: selenium's own dependency

from tests.support.servers import free_port

FIREFOX, PULSEAUDIO = "/usr/bin/firefox-esr", "/usr/bin/pulseaudio"

#: Preferences of the test profile: fake media devices, no prompts, autoplay allowed, nothing phoning home.
PREFERENCES = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "media.autoplay.block-webaudio": False,
    "media.autoplay.enabled.user-gestures-needed": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.auto": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "extensions.update.enabled": False,
    "browser.tabs.warnOnClose": False,
    # The page's console (errors included) goes to Firefox's output, which a failing test shows.
    "devtools.console.stdout.content": True,
    "browser.dom.window.dump.enabled": True,
}


def _pref(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Firefox starts slowly on a loaded 2-core machine; each BiDi command answers within this.
BIDI_TIMEOUT_SECONDS = 60.0


class RunningFirefox:
    """A started Firefox, where its output (the page's console included) goes, and its WebDriver BiDi port."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, bidi_port: int) -> None:
        self.process, self.log_path, self.bidi_port = process, log_path, bidi_port
        self._bidi: websocket.WebSocket | None = None
        self._context = ""
        self._next_id = 0

    def output(self, tail: int = 4000) -> str:
        """The end of Firefox's output so far, for a failing test's message."""
        return self.log_path.read_bytes()[-tail:].decode("utf-8", "replace")

    def evaluate(self, expression: str) -> Any:
        """The value of the JavaScript ``expression`` in the tab's page (as JSON), through WebDriver BiDi; a
        thrown exception fails the test with its message."""
        if self._bidi is None:
            self._connect()
        reply = self._command("script.evaluate", {
            "expression": f"JSON.stringify({expression})", "target": {"context": self._context},
            "awaitPromise": False})
        if reply.get("type") == "exception":
            raise AssertionError(f"{expression} threw in Firefox: {reply.get('exceptionDetails')}")
        value = reply.get("result", {}).get("value")
        return None if value is None else json.loads(value)

    def close(self) -> None:
        """Close the BiDi connection (Firefox itself is stopped by :func:`firefox_at`)."""
        if self._bidi is not None:
            self._bidi.close()
            self._bidi = None

    def _connect(self) -> None:
        deadline = time.monotonic() + BIDI_TIMEOUT_SECONDS
        while b"WebDriver BiDi listening" not in self.log_path.read_bytes():
            assert self.process.poll() is None and time.monotonic() < deadline, \
                f"Firefox's WebDriver BiDi did not start: {self.output()}"
            time.sleep(0.2)
        # No Origin header: Firefox refuses BiDi connections from web pages (an Origin) unless allowed.
        self._bidi = websocket.create_connection(f"ws://127.0.0.1:{self.bidi_port}/session",
                                                 timeout=BIDI_TIMEOUT_SECONDS, suppress_origin=True)
        self._command("session.new", {"capabilities": {}})
        self._context = self._command("browsingContext.getTree", {"maxDepth": 0})["contexts"][0]["context"]

    def _command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._bidi is not None
        self._next_id += 1
        self._bidi.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:  # events (none subscribed) and nothing else may come first
            message = json.loads(self._bidi.recv())
            if message.get("id") == self._next_id:
                assert message.get("type") == "success", f"BiDi {method} failed: {message}"
                return dict(message["result"])


@contextmanager
def firefox_at(url: str) -> Iterator[RunningFirefox]:
    """Headless firefox-esr on a temporary profile, opened at ``url`` until the block exits (skips when
    firefox-esr or pulseaudio is not installed: ``apt-get install firefox-esr pulseaudio``)."""
    if not (shutil.which(FIREFOX) and shutil.which(PULSEAUDIO)):
        pytest.skip(f"{FIREFOX} and {PULSEAUDIO} are not installed (apt-get install firefox-esr pulseaudio)")
    profile = Path(tempfile.mkdtemp(prefix="kb-firefox-"))
    with _null_sound_server(profile / "pulse") as pulse_server:
        yield from _firefox(profile, url, pulse_server)


@contextmanager
def _null_sound_server(home: Path) -> Iterator[str]:
    """A private PulseAudio whose only output is a null sink (audio plays, unheard); yields its address."""
    (home / "run").mkdir(parents=True, mode=0o700)
    socket_path = home / "native"
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run")}
    errors = (home / "pulseaudio.log").open("wb")
    process = subprocess.Popen(
        [PULSEAUDIO, "-n", "--daemonize=no", "--exit-idle-time=-1", "--disable-shm=yes", "-L", "module-null-sink",
         "-L", f"module-native-protocol-unix socket={socket_path} auth-anonymous=1"],
        stdout=subprocess.DEVNULL, stderr=errors, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert process.poll() is None and time.monotonic() < deadline, \
                "pulseaudio did not start: " + (home / "pulseaudio.log").read_text()
            time.sleep(0.05)
        yield f"unix:{socket_path}"
    finally:
        _stop(process)
        errors.close()


def _firefox(profile: Path, url: str, pulse_server: str) -> Iterator[RunningFirefox]:
    (profile / "user.js").write_text("".join(f'user_pref("{name}", {_pref(value)});\n'
                                             for name, value in PREFERENCES.items()))
    log = open(profile / "firefox.log", "wb")  # noqa: SIM115 - closed below, after the process
    env = {**os.environ, "HOME": str(profile), "MOZ_HEADLESS": "1", "MOZ_CRASHREPORTER_DISABLE": "1",
           "PULSE_SERVER": pulse_server}
    bidi_port = free_port()
    process = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                                f"--remote-debugging-port={bidi_port}", url],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    running = RunningFirefox(process, profile / "firefox.log", bidi_port)
    try:
        yield running
    finally:
        running.close()
        _stop(process)
        log.close()
        if os.environ.get("KB_FIREFOX_LOG"):  # keep Firefox's whole output for a look after the test
            shutil.copy(profile / "firefox.log", os.environ["KB_FIREFOX_LOG"])
        shutil.rmtree(profile, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a process this module started and its children (Firefox's content processes are in the session it
    was started in: that group, this test's own)."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait(10)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
