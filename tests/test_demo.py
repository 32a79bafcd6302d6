"""The one-command demo and what a newcomer meets first: the fallback store, the demo's settings file, the
profile CLI, the landing page, readiness on a store without Lua, and what the simulators print."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask

from app import create_app
from app.config import DEMO_TWILIO_AUTH_TOKEN
from app.devtools.localstack import free_port, port_is_free, wait_for_http
from app.devtools.simulator import __main__ as twilio_cli
from app.devtools.simulator.audio import speech_like_tone
from app.devtools.simulator.twilio import TwilioCallSimulator
from app.envfile import environment_with_demo, read_env_file, write_env_file
from tests.support.controls import EmulatorControl
from tests.support.settings import TWILIO_ACCOUNT_SID, bridge_config
from tests.support.demo import demo_environment, run_demo, venv_workdir
from tests.support.servers import RunningServer

PUBLIC_URL = "https://bridge.example.com"
#: A `flask` or demo process imports the whole app (the telnyx SDK alone took 27 s at load average 17 here).
CLI_TIMEOUT_SECONDS = 240


def _refuses_connections(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.ConnectionError:
        return True
    return False


def _wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# -- the demo, end to end ------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_demo_on_the_fallback_store_runs_a_whole_call_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    no_redis_server = tmp_path / "empty-bin"
    no_redis_server.mkdir()  # PATH without redis-server: the demo must fall back to fakeredis with Lua
    with run_demo(tmp_path, demo_environment(path=str(no_redis_server))) as demo:
        settings = demo.settings
        banner = demo.output()
        assert "embedded fakeredis" in banner
        assert len(settings["ADMIN_PASSWORD"]) >= 12 and f"password: {settings['ADMIN_PASSWORD']}" in banner
        for path in ("/admin", "/metrics", "/twilio/voice", "/telnyx/texml", "/telnyx/call-control"):
            assert f"{demo.base_url}{path}" in banner
        assert requests.get(demo.base_url + "/readyz", timeout=10).json()["status"] == "ready"

        result = TwilioCallSimulator(demo.base_url, DEMO_TWILIO_AUTH_TOKEN, timeout=10).place_call(
            "+15005550006", "+15551230000", speech_like_tone(1.0), pace=False, listen_seconds=1.5)
        assert result.stream_sid and result.heard_audio, result.timeline
        assert result.said == [], "the caller heard the apology: the store could not run the lifecycle"

        emulator_url = settings["KALLGLOT_API_URL"].removesuffix("/v1")
        sessions = lambda: requests.get(emulator_url + "/_emulator/sessions", timeout=5).json()["sessions"]  # noqa: E731
        assert _wait_until(lambda: bool(sessions()) and all(s["status"] == "ended" for s in sessions())), sessions()

        stand_ins = [emulator_url + "/_emulator/stats", settings["DEMO_FAKE_TWILIO_URL"] + "/healthz",
                     settings["DEMO_FAKE_TELNYX_URL"] + "/_fake/health"]
        assert demo.stop(signal.SIGTERM) == 0
        assert "Traceback" not in demo.output()
        assert not (tmp_path / ".demo" / "env").exists()
        assert port_is_free(demo.port)
        for url in stand_ins:
            assert _refuses_connections(url), f"{url} still answers after the demo stopped"


@pytest.mark.e2e
def test_demo_telnyx_outbound_call_and_profile_cli_use_the_demo_settings_and_sighup_stops_it(tmp_path: Path) -> None:
    with run_demo(venv_workdir(tmp_path), demo_environment()) as demo:
        settings = demo.settings
        answer = requests.post(demo.base_url + "/api/calls", timeout=20, json={
            "to": "+14155550100", "from": "+15005550107", "carrier": "telnyx"},
            headers={"Authorization": f"Bearer {settings['API_TOKEN']}"})
        assert answer.status_code == 201, answer.text
        commands = lambda: [c["action"] for c in requests.get(  # noqa: E731
            settings["DEMO_FAKE_TELNYX_URL"] + "/_fake/commands", timeout=5).json()["commands"]]
        assert _wait_until(lambda: "streaming_start" in commands()), commands()

        # The admin's "Connect a number" against the demo's fake carrier APIs, with the banner's password.
        admin = requests.Session()
        csrf = lambda page: re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # noqa: E731
        signed_in = admin.post(demo.base_url + "/admin/sign-in", timeout=20, data={
            "csrf_token": csrf(admin.get(demo.base_url + "/admin/sign-in", timeout=20).text),
            "password": settings["ADMIN_PASSWORD"], "name": "Ada"})
        assert signed_in.status_code == 200 and "/sign-in" not in signed_in.url
        page = admin.get(demo.base_url + "/admin/connect", timeout=30).text
        for number in ("+15005550006", "+15005550106", "+15005550107"):
            assert number in page
        connected = admin.post(demo.base_url + "/admin/connect/twilio/PN" + "1" * 32, data={"csrf_token": csrf(page)},
                               timeout=30)
        assert connected.status_code == 200
        listed = requests.get(f"{settings['DEMO_FAKE_TWILIO_URL']}/2010-04-01/Accounts/{settings['TWILIO_ACCOUNT_SID']}"
                              "/IncomingPhoneNumbers.json", auth=(settings["TWILIO_ACCOUNT_SID"],
                                                                  settings["TWILIO_AUTH_TOKEN"]), timeout=5).json()
        first = next(n for n in listed["incoming_phone_numbers"] if n["phone_number"] == "+15005550006")
        assert first["voice_url"] == demo.base_url + "/twilio/voice"

        # `flask numbers …` from the demo's directory, with no variables set: only .demo/env.
        flask = [str(tmp_path / ".venv" / "bin" / "flask"), "--app", "app:create_app()", "numbers"]
        env = demo_environment()
        set_ = subprocess.run([*flask, "set", "+15005550006", "--source", "en", "--target", "de"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)
        assert set_.returncode == 0, set_.stderr
        listed = subprocess.run([*flask, "list"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=CLI_TIMEOUT_SECONDS)
        assert "+15005550006: mode=bidirectional_translation source=en target=de" in listed.stdout, listed.stderr
        assert "DEMO MODE" not in listed.stderr + listed.stdout

        assert demo.stop(signal.SIGHUP) == 0
        assert "Traceback" not in demo.output()
        assert port_is_free(demo.port)


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_a_busy_port_is_reported_before_the_banner_with_the_port_hint(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "app.devtools.demo", "--port", str(port)], cwd=tmp_path,
                              env=demo_environment(), capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)
    assert done.returncode == 2
    assert f"--port {port + 1}" in done.stderr and "in use" in done.stderr
    assert "=====" not in done.stdout and "Traceback" not in done.stderr


# -- the profile CLI ---------------------------------------------------------------------------------------

def _flask(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    flask = Path(sys.executable).parent / "flask"
    return subprocess.run([str(flask), "--app", "app:create_app()", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_profile_commands_need_only_the_store(tmp_path: Path, redis_url: str, namespace: str) -> None:
    env = {**demo_environment(), "REDIS_URL": redis_url, "REDIS_NAMESPACE": namespace}
    done = _flask(tmp_path, env, "numbers", "set", "+14155550123", "--source", "en", "--target", "fr")
    assert done.returncode == 0, done.stderr
    assert "+14155550123: mode=bidirectional_translation source=en target=fr" in _flask(
        tmp_path, env, "numbers", "list").stdout


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_profile_commands_read_the_demo_settings_file(tmp_path: Path, redis_url: str, namespace: str) -> None:
    write_env_file({"REDIS_URL": redis_url, "REDIS_NAMESPACE": namespace}, tmp_path / ".demo" / "env")
    done = _flask(tmp_path, demo_environment(), "numbers", "set", "+14155550124", "--target", "it")
    assert done.returncode == 0, done.stderr
    assert "target=it" in _flask(tmp_path, demo_environment(), "numbers", "show", "+14155550124").stdout


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_a_configuration_error_in_the_cli_prints_sentences_not_a_traceback(tmp_path: Path) -> None:
    done = _flask(tmp_path, demo_environment(), "numbers", "list")
    assert done.returncode == 1
    assert "REDIS_URL is not set" in done.stderr and "KALLGLOT_API_KEY" not in done.stderr
    assert "Traceback" not in done.stderr
    other = _flask(tmp_path, {**demo_environment(), "REDIS_URL": "redis://127.0.0.1:1/0"}, "routes")
    assert other.returncode == 1 and "KALLGLOT_API_KEY is not set" in other.stderr
    assert "Traceback" not in other.stderr


def test_env_file_round_trips_and_the_environment_wins(tmp_path: Path) -> None:
    path = write_env_file({"A": "x y", "B": "it's", "C": ""}, tmp_path / "env", header="demo")
    assert read_env_file(path) == {"A": "x y", "B": "it's", "C": ""}
    assert path.stat().st_mode & 0o077 == 0
    assert environment_with_demo({"A": "mine"}, path) == {"A": "mine", "B": "it's", "C": ""}
    shell = subprocess.run(["sh", "-c", f"set -a; . {path}; printf %s \"$B\""], capture_output=True, text=True,
                           timeout=10)
    assert shell.stdout == "it's"


# -- landing page and readiness --------------------------------------------------------------------------------

def test_landing_page_lists_both_carriers_and_links_admin_and_metrics(make_admin_app: Callable[..., Flask]) -> None:
    page = make_admin_app(TELNYX_PUBLIC_KEY="x" * 44).test_client().get("/").get_data(as_text=True)
    for url in ("/twilio/voice", "/twilio/status", "/twilio/fallback", "/telnyx/texml", "/telnyx/texml/status",
                "/telnyx/call-control"):
        assert f"{PUBLIC_URL}{url}" in page
    assert 'href="/admin/"' in page and 'href="/metrics"' in page


@pytest.fixture
def redis_without_lua() -> Iterator[str]:
    """A real redis-server whose EVAL/EVALSHA are disabled: a store that cannot run the lifecycle's scripts."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--rename-command", "EVAL", "", "--rename-command", "EVALSHA",
                             ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_readyz_fails_when_the_store_cannot_run_lua(redis_without_lua: str, emulator: EmulatorControl,
                                                     namespace: str) -> None:
    app = create_app(bridge_config(redis_without_lua, emulator.api_url, namespace, PUBLIC_URL))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert any("Lua" in problem for problem in response.json["problems"]), response.json


# -- what the simulators and the emulator print ----------------------------------------------------------------

@pytest.mark.e2e
def test_simulator_hides_relay_tokens_and_names_the_setting_behind_a_403(
        bridge_server: RunningServer, emulator: EmulatorControl, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    args = ["--base-url", bridge_server.url, "--public-url", bridge_server.url, "--account-sid", TWILIO_ACCOUNT_SID,
            "--no-pace", "--listen", "0.5", "--out", str(tmp_path / "heard.wav")]
    assert twilio_cli.main([*args, "--auth-token", "test-twilio-auth-token"]) == 0
    printed = capsys.readouterr().out
    assert "relay_token" in printed and "<redacted>" in printed
    assert not re.findall(r"[A-Za-z0-9_-]{80,}", printed), "a sealed token was printed"

    assert twilio_cli.main([*args, "--auth-token", "not-the-token"]) == 1
    assert "TWILIO_AUTH_TOKEN" in capsys.readouterr().err


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_emulator_access_log_is_json_without_query_strings(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "emulator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.devtools.emulator", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_emulator/stats", proc=proc)
        requests.get(f"http://127.0.0.1:{port}/_emulator/stats?token=very-secret", timeout=5)
        assert _wait_until(lambda: "very-secret" in log_path.read_text() or
                           log_path.read_text().count("/_emulator/stats") >= 2, 5)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = log_path.read_text()
    assert "very-secret" not in text and "token=" not in text
    access = [json.loads(line) for line in text.splitlines() if line.startswith("{") and "/_emulator/stats" in line]
    assert access and all(entry["logger"].endswith("access") for entry in access)


def test_an_outbound_call_refused_by_local_configuration_says_so(make_admin_app: Callable[..., Flask],
                                                                  emulator: EmulatorControl) -> None:
    app = make_admin_app(API_TOKEN="t" * 20, TELNYX_API_KEY="KEY_x", TELNYX_PUBLIC_KEY="x" * 44)  # no connection id
    with app.app_context():
        from app.extensions import services
        from app.profiles.store import NumberProfile
        services().profiles.set("+15005550107", NumberProfile(carrier="telnyx"))  # "from" must be one of ours
    response = app.test_client().post("/api/calls", headers={"Authorization": "Bearer " + "t" * 20}, json={
        "to": "+14155550100", "from": "+15005550107", "carrier": "telnyx"})
    assert response.status_code == 503
    assert "not configured" in response.json["error"] and "TELNYX_CONNECTION_ID" in response.json["detail"]
    assert "carrier refused" not in response.get_data(as_text=True)
    sessions = emulator.sessions()
    assert sessions and all(session["status"] == "ended" for session in sessions)


@pytest.mark.e2e  # starts the product in a process of its own (seconds each): not in the fast loop
def test_a_stopped_demos_settings_file_gives_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    write_env_file({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path / ".demo" / "env")
    done = _flask(tmp_path, demo_environment(), "numbers", "list")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot be reached" in done.stderr and "still running" in done.stderr
