"""Debian's firefox-esr, headless, without WebDriver (there is no geckodriver here): a fresh profile whose
``user.js`` gives a fake microphone (a tone) without a permission prompt and lets audio play without a user
gesture, started at one URL. Web Audio needs an output device to run at all (without one Firefox's
AudioContext stays "suspended"), so a private PulseAudio with a null sink runs beside it. Tests observe what the page does from the server side (Redis, the emulator)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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


class RunningFirefox:
    """A started Firefox and where its output (the page's console included) goes."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process, self.log_path = process, log_path

    def output(self, tail: int = 4000) -> str:
        """The end of Firefox's output so far, for a failing test's message."""
        return self.log_path.read_bytes()[-tail:].decode("utf-8", "replace")


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
    process = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile), url],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield RunningFirefox(process, profile / "firefox.log")
    finally:
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
