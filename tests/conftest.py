"""Shared fixtures: a real Redis, the Kallglot emulator and the bridge under gunicorn + gevent."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tests.support.admin import admin_post, admin_sign_in, csrf_token_in
from tests.support.bridge_state import BridgeState
from tests.support.browser import browser, screenshot  # noqa: F401  (fixtures for the browser tests)
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.numbers import CallNumbers, new_numbers
from tests.support.redis_server import PersistentRedis
from tests.support.servers import RunningServer, free_port, run_gunicorn, run_redis
from tests.support.settings import (
    ADMIN_PASSWORD, E2E_GRACEFUL_TIMEOUT_SECONDS, E2E_HEARTBEAT_TIMEOUT_SECONDS, E2E_RECONNECT_WINDOW_SECONDS,
    EMULATOR_API_KEY, PUBLIC_URL, SECRET_KEY, TELNYX_API_KEY, TELNYX_CONNECTION_ID, TELNYX_TEST_API_KEY,
    TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config, e2e_bridge_env, telnyx_config, twilio_signature,
)

# Re-exported for test modules that still import these from here; new code imports from tests.support.
__all__ = [
    "ADMIN_PASSWORD", "E2E_HEARTBEAT_TIMEOUT_SECONDS", "E2E_RECONNECT_WINDOW_SECONDS", "EMULATOR_API_KEY",
    "PUBLIC_URL", "SECRET_KEY", "TELNYX_API_KEY", "TELNYX_CONNECTION_ID", "TELNYX_TEST_API_KEY",
    "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "EmulatorControl", "FakeCallControl", "admin_post",
    "admin_sign_in", "bridge_config", "csrf_token_in", "telnyx_config", "twilio_signature",
]

#: Fixtures that start a server (gunicorn + gevent): a test that uses one, directly or not, is marked ``e2e``.
SERVER_FIXTURES = frozenset({
    "emulator_server", "bridge_server", "telnyx_bridge_server", "fake_call_control_server", "fake_twilio_server",
    "fake_telnyx_server",
})
#: The Redis namespaces of the session-wide bridges, flushed before each test that uses them.
SHARED_BRIDGE_NAMESPACES = {"bridge_server": "e2e", "telnyx_bridge_server": "e2e-telnyx"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a server ``e2e``, so ``-m "not e2e"`` is the fast loop."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


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
                      ready_path="/_emulator/stats", graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_shared_bridge_state(request: pytest.FixtureRequest) -> None:
    """Before a test that uses a session-wide bridge, delete its Redis keys: no held session or live leg of an
    earlier test is reaped (or re-attached to) during this one."""
    for fixture, namespace in SHARED_BRIDGE_NAMESPACES.items():
        if fixture in request.fixturenames:
            client = redis_lib.Redis.from_url(request.getfixturevalue("redis_url"), socket_timeout=5)
            try:
                BridgeState(client, namespace).flush()
            finally:
                client.close()


@pytest.fixture
def numbers() -> CallNumbers:
    """Phone numbers of this test's own (see tests/support/numbers.py)."""
    return new_numbers()


@pytest.fixture
def bridge_state(redis_client: redis_lib.Redis) -> BridgeState:
    """The Redis state of the session-wide Twilio bridge (:func:`bridge_server`)."""
    return BridgeState(redis_client, SHARED_BRIDGE_NAMESPACES["bridge_server"])


@pytest.fixture
def emulator(emulator_server: RunningServer) -> Iterator[EmulatorControl]:
    """The emulator, reset before the test."""
    control = EmulatorControl(emulator_server.url)
    control.reset()
    yield control


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


@pytest.fixture(scope="session")
def bridge_server(redis_url: str, emulator_server: RunningServer) -> Iterator[RunningServer]:
    """The bridge under gunicorn + gevent (two workers), reachable at its PUBLIC_URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = e2e_bridge_env(redis_url, emulator_server.url + "/v1", SHARED_BRIDGE_NAMESPACES["bridge_server"], url)
    with run_gunicorn("app:create_app()", env, workers=2, port=port,
                      graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server


# -- admin UI --------------------------------------------------------------------------------------------------

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


@pytest.fixture
def admin_client(admin_app: Flask) -> FlaskClient:
    """A test client signed in to the admin as "Ada"."""
    test_client = admin_app.test_client()
    assert admin_sign_in(test_client).status_code == 302
    return test_client


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
@pytest.fixture(scope="session")
def telnyx_signer():
    """A real Ed25519 key pair generated for this run; the bridge trusts its public key (TELNYX_PUBLIC_KEY)."""
    import nacl.signing

    from app.devtools.simulator.telnyx import TelnyxSigner

    return TelnyxSigner(nacl.signing.SigningKey.generate())


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
    env = {**telnyx_config(e2e_bridge_env(redis_url, emulator_server.url + "/v1",
                                          SHARED_BRIDGE_NAMESPACES["telnyx_bridge_server"], url),
                           telnyx_signer.public_key, fake_call_control_server.url + "/v2"),
           "TELNYX_CONNECTION_ID": TELNYX_CONNECTION_ID}
    with run_gunicorn("app:create_app()", env, workers=2, port=telnyx_bridge_port,
                      graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server


@pytest.fixture
def stoppable_redis() -> Iterator[PersistentRedis]:
    """A private Redis this test takes down and brings back (its data kept, as a managed Redis restarting)."""
    redis = PersistentRedis()
    redis.start()
    yield redis
    redis.stop()
