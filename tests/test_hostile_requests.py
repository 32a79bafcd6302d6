"""Issue 13, in-process: bounded bodies, the call API's toll-fraud rules and limits, re-attach rules, single-use
relay tokens, ids in URL paths, config refusals. Real Redis and the Kallglot emulator; no mocks."""
from __future__ import annotations

import http.server
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.calls.destinations import DestinationDenied, DestinationRules
from app.calls.reattach import caller_id_withheld
from app.config import DEMO_SECRET_KEY, DEMO_TWILIO_AUTH_TOKEN, ConfigError, Settings
from app.extensions import services
from app.kallglot.client import KallglotClient, KallglotValidationError
from app.profiles import NumberProfile, ProfileError
from app.redis_keys import RedisKeys
from app.relay.tokens import RelayGrant, RelayGuard, RelayTokenSealer
from tests.support.controls import EmulatorControl
from tests.support.settings import PUBLIC_URL, TWILIO_ACCOUNT_SID, bridge_config, twilio_signature

OURS, CUSTOMER = "+15005550006", "+14155550123"
API_TOKEN = "api-token-for-hostile-tests"


@pytest.fixture
def make_app(redis_url: str, emulator: EmulatorControl, namespace: str) -> Callable[..., Flask]:
    def build(**overrides: str) -> Flask:
        built = create_app({**bridge_config(redis_url, emulator.api_url, namespace, PUBLIC_URL), **overrides})
        built.testing = True
        return built
    return build


# -- 1. bodies -------------------------------------------------------------------------------------------------

def test_bodies_over_the_limit_are_refused_before_they_are_read(make_app: Callable[..., Flask]) -> None:
    app = make_app(MAX_BODY_BYTES="65536", API_TOKEN=API_TOKEN)
    client = app.test_client()
    big = b"x" * 70_000
    assert client.post("/api/calls", data=big, content_type="application/json",
                       headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 413
    assert client.post("/kallglot/webhooks", data=big, content_type="application/json").status_code == 413
    default = make_app().test_client()  # the webhook's own, smaller limit applies under a larger global one
    assert default.post("/kallglot/webhooks", data=b"x" * 300_000,
                        content_type="application/json").status_code == 413
    # Chunked bodies (no Content-Length) under gunicorn: tests/test_hostile_sockets.py.


def test_deeply_nested_json_is_a_client_error_not_a_crash(make_app: Callable[..., Flask]) -> None:
    client = make_app(API_TOKEN=API_TOKEN).test_client()
    nested = "[" * 200_000
    # The request hook no longer parses every body: a route that takes none answers without reading it.
    assert client.post("/healthz", data=nested, content_type="application/json").status_code == 405
    response = client.post("/api/calls", data=nested, content_type="application/json",
                           headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code == 400


# -- 3. no call-outs on unauthenticated requests; bounded Redis pool; /metrics token -----------------------------

class _CountingHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.heads += 1  # type: ignore[attr-defined]
        time.sleep(0.3)  # a slow Kallglot: concurrent /readyz requests overlap the probe
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_kallglot() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    server.heads = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_concurrent_readyz_probe_kallglot_once(make_app: Callable[..., Flask],
                                               counting_kallglot: http.server.ThreadingHTTPServer) -> None:
    app = make_app(KALLGLOT_API_URL=f"http://127.0.0.1:{counting_kallglot.server_port}/v1")
    statuses: list[int] = []

    def probe() -> None:
        statuses.append(app.test_client().get("/readyz").status_code)

    threads = [threading.Thread(target=probe) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(statuses) == 20 and set(statuses) == {200}
    assert counting_kallglot.heads == 1  # type: ignore[attr-defined]


def test_metrics_token_and_bounded_redis_pool(make_app: Callable[..., Flask]) -> None:
    app = make_app(METRICS_TOKEN="scrape-secret", REDIS_MAX_CONNECTIONS="7")
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200
    with app.app_context():
        pool = services().redis.connection_pool
        assert isinstance(pool, redis_lib.BlockingConnectionPool) and pool.max_connections == 7


# -- 4. toll fraud ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number, reason", [
    ("+19005551234", "premium-rate"), ("+881612345678", "non-geographic"), ("+15005550006", "personal-number"),
    ("+447400123456", "country"), ("+18765551234", "country"), ("+15557770000", "invalid"),
])
def test_destination_rules_deny_premium_special_and_foreign(number: str, reason: str) -> None:
    with pytest.raises(DestinationDenied) as denied:
        DestinationRules.of(["US", "CA"]).check(number)
    assert denied.value.reason == reason


def test_destination_rules_allow_ordinary_numbers_of_allowed_countries() -> None:
    rules = DestinationRules.of(["US", "CA", "GB"])
    for number in ("+14155550123", "+16135550123", "+447400123456"):
        rules.check(number)


def api_post(client: FlaskClient, body: object, key: str | None = None) -> object:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    if key:
        headers["Idempotency-Key"] = key
    return client.post("/api/calls", json=body, headers=headers)


@pytest.fixture
def api_app(make_app: Callable[..., Flask]) -> Flask:
    app = make_app(API_TOKEN=API_TOKEN, API_CALLS_PER_MINUTE="2", API_MAX_CONCURRENT_CALLS="1",
                   TWILIO_API_URL="http://127.0.0.1:9")  # nothing listens: a dial fails fast, never reaches Twilio
    with app.app_context():
        services().profiles.set(OURS, NumberProfile())
    return app


def test_api_refuses_foreign_from_and_forbidden_destinations(api_app: Flask) -> None:
    client = api_app.test_client()
    not_ours = api_post(client, {"to": CUSTOMER, "from": "+14155550999"})
    assert not_ours.status_code == 422 and set(not_ours.json["problems"]) == {"from"}
    premium = api_post(client, {"to": "+19005551234", "from": OURS})
    assert premium.status_code == 422 and "premium" in premium.json["problems"]["to"]
    satellite = api_post(client, {"to": "+881612345678", "from": OURS})
    assert satellite.status_code == 422 and set(satellite.json["problems"]) == {"to"}
    exposition = client.get("/metrics").get_data(as_text=True)
    assert 'kallglot_bridge_api_calls_refused_total{reason="premium-rate"}' in exposition
    assert 'kallglot_bridge_api_calls_refused_total{reason="from_not_ours"}' in exposition


def test_api_rate_and_concurrency_limits_per_token(api_app: Flask) -> None:
    client = api_app.test_client()
    with api_app.app_context():
        svc = services()
        from app.api.limits import digest, track_api_call
        token_hash = digest("api-token", API_TOKEN)
        svc.redis.zadd(svc.keys.live_sessions(svc.keys.shard_of("sess_live_one")), {"sess_live_one": time.time()})
        track_api_call(svc.redis, svc.keys, token_hash, "sess_live_one")
    busy = api_post(client, {"to": CUSTOMER, "from": OURS})
    assert busy.status_code == 429 and "CONCURRENT" in busy.json["message"]
    with api_app.app_context():
        svc.redis.zrem(svc.keys.live_sessions(svc.keys.shard_of("sess_live_one")), "sess_live_one")  # it ended
    assert api_post(client, {"to": CUSTOMER, "from": OURS}).status_code == 502  # dialled (and the fake failed)
    limited = api_post(client, {"to": CUSTOMER, "from": OURS})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "60"


def test_idempotency_key_reused_with_another_body_is_422(api_app: Flask, emulator: EmulatorControl) -> None:
    client = api_app.test_client()
    key = str(uuid.uuid4())
    assert api_post(client, {"to": CUSTOMER, "from": OURS}, key=key).status_code == 502
    reused = api_post(client, {"to": "+14155550124", "from": OURS}, key=key)
    assert reused.status_code == 422 and "Idempotency-Key" in reused.json["error"]
    # Kallglot saw a hash of the key, never the client's raw value.
    assert all(key not in s["idempotency_key"] for s in emulator.sessions())


def test_profiles_agent_and_fallback_numbers_follow_the_destination_rules(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    with app.app_context():
        store = services().profiles
        with pytest.raises(ProfileError) as refused:
            store.set(OURS, NumberProfile(agent_number="+19005551234", fallback_number="+881612345678"))
        assert set(refused.value.problems) == {"agent_number", "fallback_number"}
        store.set(OURS, NumberProfile(agent_number="+14155550199"))


# -- 5. re-attach -----------------------------------------------------------------------------------------------

def voice(client: FlaskClient, call_sid: str, from_number: str, path: str = "/twilio/voice",
          **extra: str) -> object:
    params = {"CallSid": call_sid, "AccountSid": TWILIO_ACCOUNT_SID, "From": from_number, "To": OURS,
              "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", **extra}
    return client.post(path, data=params, headers={"X-Twilio-Signature": twilio_signature(PUBLIC_URL + path, params)})


def hold_first_call(app: Flask, client: FlaskClient, from_number: str) -> str:
    """Answer a call from ``from_number`` and lose its leg, so its session is held for a returning caller."""
    call_sid = "CA" + uuid.uuid4().hex
    assert voice(client, call_sid, from_number).status_code == 200
    with app.app_context():
        svc = services()
        svc.lifecycle.leg_ended("twilio", call_sid, "relay_carrier_lost", clean=False)
        held = svc.lifecycle.held_session_for(OURS, from_number)
    assert held
    return held


def session_of(response: object) -> str:
    root = ET.fromstring(response.data)  # type: ignore[attr-defined]
    return {p.get("name"): p.get("value") for p in root.iter("Parameter")}["session_id"]


@pytest.mark.parametrize("withheld", ["+266696687", "anonymous", "+7378742833"])
def test_withheld_callers_never_reattach(make_app: Callable[..., Flask], emulator: EmulatorControl,
                                         withheld: str) -> None:
    app = make_app()
    client = app.test_client()
    held = hold_first_call(app, client, withheld)
    second = voice(client, "CA" + uuid.uuid4().hex, withheld)
    assert second.status_code == 200 and session_of(second) != held
    assert len(emulator.sessions()) == 2
    assert caller_id_withheld(withheld)


def test_reattach_policy_off_and_pin(make_app: Callable[..., Flask], emulator: EmulatorControl) -> None:
    app = make_app()
    client = app.test_client()
    caller = "+14155550188"
    with app.app_context():
        services().profiles.set(OURS, NumberProfile(reattach="off"))
    held = hold_first_call(app, client, caller)
    assert session_of(voice(client, "CA" + uuid.uuid4().hex, caller)) != held

    with app.app_context():
        services().profiles.set(OURS, NumberProfile(reattach="caller_id_pin").with_reattach_pin("4321"))
    held = hold_first_call(app, client, caller)
    call_sid = "CA" + uuid.uuid4().hex
    asked = voice(client, call_sid, caller)
    assert asked.status_code == 200 and ET.fromstring(asked.data).find("Gather") is not None
    wrong = voice(client, call_sid, caller, path="/twilio/reattach-pin", Digits="1234")
    assert session_of(wrong) != held
    held = hold_first_call(app, client, caller)
    call_sid = "CA" + uuid.uuid4().hex
    voice(client, call_sid, caller)
    right = voice(client, call_sid, caller, path="/twilio/reattach-pin", Digits="4321")
    assert session_of(right) == held
    with app.app_context():
        stored = services().redis.get(services().keys.profile(OURS)).decode()
    assert "4321" not in stored  # only the salted hash of the PIN is stored


# -- 6. single-use relay tokens; ended calls ----------------------------------------------------------------------

def test_relay_token_is_single_use_and_a_leg_has_one_relay(redis_client: redis_lib.Redis, namespace: str) -> None:
    sealer = RelayTokenSealer("k" * 32)
    grant = RelayGrant(session_id="sess_1", carrier="twilio", call_id="CA" + "a" * 32, speaker="customer",
                       stream_url="wss://k/s", stream_token="kst", stream_expires_at=None)
    token = sealer.seal(grant)
    guard = RelayGuard(redis_client, RedisKeys(namespace), lease_seconds=5)
    first = sealer.open(token, carrier="twilio", call_id=grant.call_id)
    assert guard.consume(first) and guard.claim_leg(first)
    assert not guard.consume(sealer.open(token, carrier="twilio", call_id=grant.call_id))  # replayed token
    second = sealer.open(sealer.seal(grant), carrier="twilio", call_id=grant.call_id)  # a fresh, valid token
    assert guard.consume(second) and not guard.claim_leg(second)  # the leg's relay is live
    guard.release_leg(second)  # not its lease: nothing released
    assert not guard.claim_leg(second)
    guard.release_leg(first)
    assert guard.claim_leg(second)


def test_voice_webhook_for_an_ended_call_is_refused(make_app: Callable[..., Flask],
                                                    emulator: EmulatorControl) -> None:
    app = make_app()
    client = app.test_client()
    call_sid = "CA" + uuid.uuid4().hex
    assert voice(client, call_sid, "+14155550177").status_code == 200
    with app.app_context():
        services().lifecycle.leg_ended("twilio", call_sid, "call_completed", clean=True)
    assert voice(client, call_sid, "+14155550177").status_code == 409
    assert len(emulator.sessions()) == 1


# -- 8. ids, config -----------------------------------------------------------------------------------------------

def test_ids_never_change_a_url_path() -> None:
    client = KallglotClient("http://127.0.0.1:9/v1", "sk_test_x")
    for bad in ("x%3FFriendlyName=1", "../admin", "a/b", "x?y=1", "s" * 65):
        with pytest.raises(KallglotValidationError):
            client.get_session(bad)


def test_production_refuses_the_published_demo_secrets(redis_url: str) -> None:
    base = bridge_config(redis_url, "http://127.0.0.1:9/v1", "ns", PUBLIC_URL)
    for name, value in (("SECRET_KEY", DEMO_SECRET_KEY), ("TWILIO_AUTH_TOKEN", DEMO_TWILIO_AUTH_TOKEN)):
        with pytest.raises(ConfigError, match=name):
            Settings.from_mapping({**base, name: value}).validate()
        Settings.from_mapping({**base, name: value, "DEMO_MODE": "1"}).validate()


def test_profile_import_takes_a_plain_pin_and_stores_only_its_hash(make_app: Callable[..., Flask]) -> None:
    from app.profiles.transfer import import_profiles

    app = make_app()
    with app.app_context():
        store = services().profiles
        import_profiles(store, {"profiles": {OURS: {"reattach": "caller_id_pin", "reattach_pin": "975310"}}})
        profile = store.for_number(OURS)
        assert profile.reattach == "caller_id_pin" and profile.reattach_pin_matches("975310")
        assert "975310" not in services().redis.get(services().keys.profile(OURS)).decode()
        with pytest.raises(Exception):
            import_profiles(store, {"profiles": {OURS: {"reattach": "caller_id_pin", "reattach_pin": "12"}}})
