"""Shared fixtures: a real Redis, the Kallglot emulator and the bridge under gunicorn + gevent."""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib
import requests
from flask import Flask
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator

from app import create_app
from tests.support.servers import RunningServer, free_port, run_gunicorn, run_redis

TWILIO_AUTH_TOKEN = "test-twilio-auth-token"
TWILIO_ACCOUNT_SID = "AC" + "1" * 32
EMULATOR_API_KEY = "sk_test_emulator"
SECRET_KEY = "test-secret-key-0123456789abcdef"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` if set, else a private redis-server for this test run."""
    with run_redis() as url:
        yield url


@pytest.fixture
def namespace() -> str:
    """A Redis key namespace of this test's own, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A client on the test Redis."""
    client = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[RunningServer]:
    """The Kallglot emulator under gunicorn + gevent (one worker: its state is in memory)."""
    with run_gunicorn("app.devtools.emulator:create_emulator_app()", {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_API_KEY},
                      ready_path="/_emulator/stats") as server:
        yield server


@pytest.fixture
def emulator(emulator_server: RunningServer) -> Iterator[EmulatorControl]:
    """The emulator, reset before the test."""
    control = EmulatorControl(emulator_server.url)
    control.reset()
    yield control


class EmulatorControl:
    """Test-side handle on the emulator's control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.api_url = url + "/v1"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(method, self.url + path, timeout=5, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def reset(self) -> None:
        """Forget all sessions, idempotency keys and faults."""
        self._call("POST", "/_emulator/reset")

    def sessions(self) -> list[dict[str, Any]]:
        """Every session the emulator knows, with what it received."""
        return self._call("GET", "/_emulator/sessions")["sessions"]

    def session(self, session_id: str) -> dict[str, Any]:
        """One session's record."""
        return self._call("GET", f"/_emulator/sessions/{session_id}")

    def stats(self) -> dict[str, Any]:
        """Totals: created, ended, end_calls, double_end_calls, connections_live…"""
        return self._call("GET", "/_emulator/stats")

    def fault(self, **fault: Any) -> None:
        """Queue one fault (endpoint, status, times, retry_after, delay_seconds)."""
        self._call("POST", "/_emulator/faults", json={"faults": [fault]})

    def behaviour(self, behaviour: str) -> None:
        """``echo`` or ``silent``."""
        self._call("POST", "/_emulator/behaviour", json={"behaviour": behaviour})

    def send(self, session_id: str, *messages: dict[str, Any]) -> int:
        """Push raw messages to the session's live stream connections; returns how many got them."""
        return int(self._call("POST", f"/_emulator/sessions/{session_id}/send",
                              json={"messages": list(messages)})["connections"])


def bridge_config(redis_url: str, kallglot_api_url: str, namespace: str, public_url: str) -> dict[str, str]:
    """Settings for a bridge under test, as environment-variable names."""
    return {
        "KALLGLOT_API_URL": kallglot_api_url,
        "KALLGLOT_API_KEY": EMULATOR_API_KEY,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": namespace,
        "PUBLIC_URL": public_url,
        "SECRET_KEY": SECRET_KEY,
        "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
        "DEFAULT_MODE": "bidirectional_translation",
        "DEFAULT_SOURCE_LANGUAGE": "en",
        "DEFAULT_TARGET_LANGUAGE": "es",
    }


PUBLIC_URL = "https://bridge.example.com"
E2E_RECONNECT_WINDOW_SECONDS = 2
E2E_HEARTBEAT_TIMEOUT_SECONDS = 3


@pytest.fixture
def app(redis_url: str, emulator: EmulatorControl, namespace: str) -> Flask:
    """The bridge app in-process (for request tests), talking to the emulator and the test Redis."""
    app = create_app(bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL))
    app.testing = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask test client of :func:`app`."""
    return app.test_client()


def twilio_signature(url: str, params: dict[str, str], token: str = TWILIO_AUTH_TOKEN) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``."""
    return RequestValidator(token).compute_signature(url, params)


@pytest.fixture(scope="session")
def bridge_server(redis_url: str, emulator_server: RunningServer) -> Iterator[RunningServer]:
    """The bridge under gunicorn + gevent (two workers), reachable at its PUBLIC_URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Short windows so holds, heartbeat losses and their ends happen within a test.
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", "e2e", url),
           "RECONNECT_WINDOW_SECONDS": str(E2E_RECONNECT_WINDOW_SECONDS),
           "HEARTBEAT_TIMEOUT_SECONDS": str(E2E_HEARTBEAT_TIMEOUT_SECONDS)}
    with run_gunicorn("app:create_app()", env, workers=2, port=port) as server:
        yield server


# -- admin UI --------------------------------------------------------------------------------------------------

ADMIN_PASSWORD = "test-admin-password"
TELNYX_API_KEY = "KEY_test_telnyx"


@pytest.fixture
def make_admin_app(redis_url: str, emulator: EmulatorControl, namespace: str) -> Callable[..., Flask]:
    """Build the bridge app with the admin enabled; keyword arguments override settings (env-var names)."""
    def build(**overrides: str) -> Flask:
        config = {**bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                  "ADMIN_PASSWORD": ADMIN_PASSWORD, **overrides}
        admin_app = create_app(config)
        admin_app.testing = True
        return admin_app
    return build


@pytest.fixture
def admin_app(make_admin_app: Callable[..., Flask]) -> Flask:
    """The bridge app with ``ADMIN_PASSWORD`` set."""
    return make_admin_app()


def csrf_token_in(html: str) -> str:
    """The CSRF token of the first form on an admin page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def admin_sign_in(client: FlaskClient, password: str = ADMIN_PASSWORD, name: str = "Ada") -> Any:
    """Sign ``client`` in to the admin; returns the sign-in POST's response."""
    token = csrf_token_in(client.get("/admin/sign-in").get_data(as_text=True))
    return client.post("/admin/sign-in", data={"csrf_token": token, "password": password, "name": name})


@pytest.fixture
def admin_client(admin_app: Flask) -> FlaskClient:
    """A test client signed in to the admin as "Ada"."""
    test_client = admin_app.test_client()
    assert admin_sign_in(test_client).status_code == 302
    return test_client


def admin_post(client: FlaskClient, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """POST an admin form with the session's CSRF token."""
    token = csrf_token_in(client.get("/admin/numbers").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **(data or {})}, **kwargs)


@pytest.fixture(scope="session")
def fake_twilio_server() -> Iterator[RunningServer]:
    """A local fake of Twilio's number API (records requests)."""
    with run_gunicorn("app.devtools.simulator.number_apis:create_fake_twilio_app()") as server:
        yield server


@pytest.fixture(scope="session")
def fake_telnyx_server() -> Iterator[RunningServer]:
    """A local fake of Telnyx's number and application API (records requests)."""
    with run_gunicorn("app.devtools.simulator.number_apis:create_fake_telnyx_app()") as server:
        yield server


# -- Telnyx ------------------------------------------------------------------------------------------------------
TELNYX_TEST_API_KEY = "KEY-test-telnyx-call-control"
TELNYX_CONNECTION_ID = "1494404757140276705"


@pytest.fixture(scope="session")
def telnyx_signer():
    """A real Ed25519 key pair generated for this run; the bridge trusts its public key (TELNYX_PUBLIC_KEY)."""
    import nacl.signing

    from app.devtools.simulator.telnyx import TelnyxSigner

    return TelnyxSigner(nacl.signing.SigningKey.generate())


def telnyx_config(base: dict[str, str], public_key: str, api_url: str) -> dict[str, str]:
    """``base`` (see :func:`bridge_config`) plus the Telnyx settings."""
    return {**base, "TELNYX_PUBLIC_KEY": public_key, "TELNYX_API_KEY": TELNYX_TEST_API_KEY, "TELNYX_API_URL": api_url}


@pytest.fixture
def telnyx_app(redis_url: str, emulator: EmulatorControl, namespace: str, telnyx_signer,
               fake_call_control: FakeCallControl) -> Flask:
    """The bridge in-process with Telnyx enabled; its Telnyx REST API is the fake (which records commands)."""
    app = create_app(telnyx_config(bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL),
                                   telnyx_signer.public_key, fake_call_control.api_url))
    app.testing = True
    return app


@pytest.fixture(scope="session")
def telnyx_bridge_port() -> int:
    """The Telnyx-enabled bridge's port, chosen before the fake Telnyx starts (it posts webhooks there)."""
    return free_port()


@pytest.fixture(scope="session")
def fake_call_control_server(telnyx_signer, telnyx_bridge_port: int) -> Iterator[RunningServer]:
    """The fake Telnyx (REST API + call side; one worker, state in memory) under gunicorn + gevent."""
    env = {"FAKE_TELNYX_WEBHOOK_URL": f"http://127.0.0.1:{telnyx_bridge_port}/telnyx/call-control",
           "FAKE_TELNYX_SIGNING_SEED": telnyx_signer.seed_b64, "FAKE_TELNYX_API_KEY": TELNYX_TEST_API_KEY}
    with run_gunicorn("app.devtools.simulator.telnyx_api:create_fake_call_control_app()", env, ready_path="/_fake/health") as server:
        yield server


class FakeCallControl:
    """Test-side handle on the fake Telnyx's control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.api_url = url + "/v2"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(method, self.url + path, timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Forget all calls and commands."""
        self._call("POST", "/_fake/reset")

    def commands(self, action: str | None = None) -> list[dict[str, Any]]:
        """Commands received (optionally only ``action``), oldest first."""
        return [c for c in self._call("GET", "/_fake/commands")["commands"] if action in (None, c["action"])]

    def place_call(self, **scenario: Any) -> str:
        """Place an inbound Call Control call; returns its call_control_id."""
        return str(self._call("POST", "/_fake/calls", json=scenario)["call_control_id"])

    def call(self, call_control_id: str) -> dict[str, Any]:
        """What the fake saw of one call."""
        return self._call("GET", f"/_fake/calls/{call_control_id}")


@pytest.fixture
def fake_call_control(fake_call_control_server: RunningServer) -> FakeCallControl:
    """The fake Telnyx, reset before the test."""
    control = FakeCallControl(fake_call_control_server.url)
    control.reset()
    return control


@pytest.fixture(scope="session")
def telnyx_bridge_server(redis_url: str, emulator_server: RunningServer, telnyx_signer, telnyx_bridge_port: int,
                         fake_call_control_server: RunningServer) -> Iterator[RunningServer]:
    """A Telnyx-enabled bridge under gunicorn + gevent (two workers), its Telnyx API being the fake."""
    url = f"http://127.0.0.1:{telnyx_bridge_port}"
    env = {**telnyx_config(bridge_config(redis_url, emulator_server.url + "/v1", "e2e-telnyx", url),
                           telnyx_signer.public_key, fake_call_control_server.url + "/v2"),
           "RECONNECT_WINDOW_SECONDS": str(E2E_RECONNECT_WINDOW_SECONDS),
           "HEARTBEAT_TIMEOUT_SECONDS": str(E2E_HEARTBEAT_TIMEOUT_SECONDS),
           "TELNYX_CONNECTION_ID": TELNYX_CONNECTION_ID}
    with run_gunicorn("app:create_app()", env, workers=2, port=telnyx_bridge_port) as server:
        yield server
