"""Admin sign-in, sessions, CSRF and sign-in throttling (Flask test client, real Redis)."""
from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app.admin.throttle import MAX_ATTEMPTS_PER_MINUTE, MAX_DELAY_SECONDS, MAX_FAILURES_PER_CLIENT, SignInDelay
from app.extensions import services
from tests.support.admin import admin_post, admin_sign_in, csrf_token_in
from tests.support.settings import ADMIN_PASSWORD
from tests.support.controls import EmulatorControl
from tests.support.servers import free_port, run_gunicorn
from tests.support.settings import bridge_config

ADMIN_PAGES = ["/admin/", "/admin/numbers", "/admin/numbers/new", "/admin/numbers/export", "/admin/audit",
               "/admin/connect", "/admin/live", "/admin/calls"]
ADMIN_POSTS = ["/admin/numbers/new", "/admin/numbers/+14155550100/delete", "/admin/numbers/import",
               "/admin/connect/twilio/PN123", "/admin/connect/telnyx/texml/1", "/admin/live/ses_1/end",
               "/admin/sign-out"]


def client_from(app: Flask, address: str) -> FlaskClient:
    """A test client whose requests come from ``address``."""
    test_client = app.test_client()
    test_client.environ_base["REMOTE_ADDR"] = address
    return test_client


def test_admin_is_disabled_without_a_password(client: FlaskClient) -> None:
    for path in ["/admin/sign-in", *ADMIN_PAGES]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert "ADMIN_PASSWORD" in response.get_data(as_text=True)
    assert client.post("/admin/sign-in", data={"password": ""}).status_code == 404


@pytest.mark.parametrize("path", ADMIN_PAGES)
def test_every_page_needs_a_session(admin_app: Flask, path: str) -> None:
    response = admin_app.test_client().get(path)
    assert response.status_code == 302
    assert response.location.startswith("/admin/sign-in?next=")


@pytest.mark.parametrize("path", ADMIN_POSTS)
def test_every_action_needs_a_session(admin_app: Flask, path: str) -> None:
    client = admin_app.test_client()
    token = csrf_token_in(client.get("/admin/sign-in").get_data(as_text=True))
    response = client.post(path, data={"csrf_token": token, "number": "+14155550100"})
    assert response.status_code == 302 and response.location.startswith("/admin/sign-in")
    with admin_app.app_context():
        assert services().profiles.all() == {}


def test_webhooks_and_health_need_no_session(admin_app: Flask) -> None:
    client = admin_app.test_client()
    assert client.get("/healthz").status_code == 200
    # Unsigned, so refused by the signature check (403), not redirected to the admin sign-in.
    assert client.post("/twilio/voice", data={"CallSid": "CA1"}).status_code == 403


def test_sign_in_sets_a_hardened_session_cookie_and_redirects(admin_app: Flask) -> None:
    client = admin_app.test_client()
    response = admin_sign_in(client)
    assert response.status_code == 302 and response.location == "/admin/numbers"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie
    assert client.get("/admin/numbers").status_code == 200


def test_session_cookie_is_not_secure_on_plain_http(make_admin_app: Callable[..., Flask]) -> None:
    client = make_admin_app(PUBLIC_URL="http://127.0.0.1:5000").test_client()
    assert "Secure" not in admin_sign_in(client).headers["Set-Cookie"]


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(admin_app: Flask) -> None:
    for next_url, expected in [("/admin/live", "/admin/live"), ("https://evil.example/admin/", "/admin/numbers"),
                               ("//evil.example/admin/", "/admin/numbers"), ("/healthz", "/admin/numbers")]:
        client = admin_app.test_client()
        token = csrf_token_in(client.get("/admin/sign-in").get_data(as_text=True))
        response = client.post("/admin/sign-in", data={"csrf_token": token, "password": ADMIN_PASSWORD,
                                                        "next": next_url})
        assert response.location == expected, next_url


def test_wrong_password_is_refused_and_shown(admin_app: Flask) -> None:
    client = admin_app.test_client()
    response = admin_sign_in(client, password="nope", name="Mallory")
    assert response.status_code == 401
    html = response.get_data(as_text=True)
    assert "Wrong password." in html and 'value="Mallory"' in html  # the name is kept
    assert client.get("/admin/numbers").status_code == 302


def test_failed_sign_ins_are_throttled_per_client(admin_app: Flask) -> None:
    attacker = admin_app.test_client()
    for attempt in range(MAX_FAILURES_PER_CLIENT):  # a new name each time: the per-address limit alone
        assert admin_sign_in(attacker, password="guess", name=f"guesser {attempt}").status_code == 401
    blocked = admin_sign_in(attacker)  # even the right password is not checked now
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 15 * 60
    assert "Too many failed attempts" in blocked.get_data(as_text=True)
    assert attacker.get("/admin/numbers").status_code == 302
    # Another address is not locked out by the attacker's failures.
    other = client_from(admin_app, "198.51.100.7")
    assert admin_sign_in(other).status_code == 302


def sign_in_via(client: FlaskClient, forwarded_for: str, password: str, name: str) -> int:
    """Sign in with an ``X-Forwarded-For`` header; returns the status code."""
    token = csrf_token_in(client.get("/admin/sign-in").get_data(as_text=True))
    return client.post("/admin/sign-in", data={"csrf_token": token, "password": password, "name": name},
                       headers={"X-Forwarded-For": forwarded_for}).status_code


@pytest.mark.parametrize("hops, attacker_chain, admin_chain", [
    # Nothing in front: the header is the client's own invention and is ignored.
    ("0", "10.0.{i}.1", "10.9.9.9"),
    # One router in front: only the entry it appended (the last) is the client's address.
    ("1", "10.0.{i}.1, 203.0.113.9", "198.51.100.7"),
])
def test_rotating_x_forwarded_for_neither_dodges_the_limit_nor_locks_out_the_admin(
        make_admin_app: Callable[..., Flask], hops: str, attacker_chain: str, admin_chain: str) -> None:
    admin_app = make_admin_app(TRUSTED_PROXY_HOPS=hops)
    attacker = client_from(admin_app, "203.0.113.9" if hops == "0" else "10.1.1.1")
    statuses = [sign_in_via(attacker, attacker_chain.format(i=i), "guess", name="Ada") if i % 2 else
                sign_in_via(attacker, attacker_chain.format(i=i), "guess", name=f"guesser {i}") for i in range(60)]
    assert statuses.count(401) <= MAX_FAILURES_PER_CLIENT and statuses[-20:] == [429] * 20
    # The real admin, at another address, using the same name as the attacker: never locked out.
    admin = client_from(admin_app, "198.51.100.7" if hops == "0" else "10.1.1.1")
    assert sign_in_via(admin, admin_chain, ADMIN_PASSWORD, name="Ada") == 302


def test_each_failure_doubles_the_wait_of_that_name_and_address(admin_app: Flask) -> None:
    with admin_app.app_context():
        svc = services()
        delay = SignInDelay(svc.redis, svc.keys)
        waits = []
        for _ in range(12):
            delay.failed("Ada", "192.0.2.1")
            waits.append(delay.wait_seconds("Ada", "192.0.2.1", now=time.time()))
        assert waits[:5] == [1, 2, 4, 8, 16] and waits[-1] == MAX_DELAY_SECONDS
        assert delay.wait_seconds("ada ", "192.0.2.1") > 0  # the same name, however it is typed
        assert delay.wait_seconds("Ada", "192.0.2.2") == 0 and delay.wait_seconds("Bob", "192.0.2.1") == 0
        delay.succeeded("Ada", "192.0.2.1")
        assert delay.wait_seconds("Ada", "192.0.2.1") == 0


def test_a_retry_inside_the_delay_is_refused_without_checking_the_password(admin_app: Flask) -> None:
    client = admin_app.test_client()
    assert admin_sign_in(client, password="guess", name="Ada").status_code == 401
    refused = admin_sign_in(client, name="Ada")  # the right password, too soon after a failure
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 2
    assert "second(s)" in refused.get_data(as_text=True)
    assert admin_sign_in(client, password="guess", name="Bob").status_code == 401  # another pair: no delay


def test_a_successful_sign_in_clears_the_delay(admin_app: Flask) -> None:
    client = admin_app.test_client()
    assert admin_sign_in(client, password="guess", name="Ada").status_code == 401
    with admin_app.app_context():  # let the one-second wait pass without sleeping
        svc = services()
        for key in svc.redis.scan_iter(svc.keys.admin_signin_delay("*")):
            svc.redis.hset(key, "last", time.time() - 5)
    assert admin_sign_in(client, name="Ada").status_code == 302
    assert admin_sign_in(admin_app.test_client(), password="guess", name="Ada").status_code == 401  # not 429


@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_posts_without_the_sessions_csrf_token_are_refused(admin_client: FlaskClient, admin_app: Flask,
                                                           token: str | None) -> None:
    data = {"number": "+14155550100", "carrier": "twilio", "mode": "ai_agent", "greeting_language": "en-US",
            "fallback_language": "en-US"}
    if token is not None:
        data["csrf_token"] = token
    response = admin_client.post("/admin/numbers/new", data=data)
    assert response.status_code == 400 and "Form expired" in response.get_data(as_text=True)
    with admin_app.app_context():
        assert services().profiles.all() == {}


def test_sign_in_itself_needs_the_csrf_token(admin_app: Flask) -> None:
    client = admin_app.test_client()
    client.get("/admin/sign-in")
    assert client.post("/admin/sign-in", data={"password": ADMIN_PASSWORD}).status_code == 400


def test_sign_out_ends_the_session(admin_client: FlaskClient) -> None:
    response = admin_post(admin_client, "/admin/sign-out")
    assert response.status_code == 302 and response.location == "/admin/sign-in"
    assert admin_client.get("/admin/numbers").status_code == 302


def test_changing_the_password_signs_everyone_out(admin_client: FlaskClient,
                                                  make_admin_app: Callable[..., Flask]) -> None:
    cookie = admin_client.get_cookie("session")
    assert cookie is not None
    other = make_admin_app(ADMIN_PASSWORD="a-new-password").test_client()
    other.set_cookie("session", cookie.value)
    assert other.get("/admin/numbers").status_code == 302


def test_a_session_cookie_replayed_after_sign_out_is_refused(admin_client: FlaskClient, admin_app: Flask) -> None:
    stolen = admin_client.get_cookie("session")
    assert stolen is not None
    assert admin_post(admin_client, "/admin/sign-out").status_code == 302
    thief = admin_app.test_client()
    thief.set_cookie("session", stolen.value)
    assert thief.get("/admin/numbers").status_code == 302


def test_signing_out_one_session_keeps_the_others(admin_client: FlaskClient, admin_app: Flask) -> None:
    other = admin_app.test_client()
    assert admin_sign_in(other, name="Grace").status_code == 302
    admin_post(admin_client, "/admin/sign-out")
    assert other.get("/admin/numbers").status_code == 200


def test_redis_holds_no_session_nonce(admin_client: FlaskClient, admin_app: Flask) -> None:
    from flask.sessions import SecureCookieSessionInterface
    cookie = admin_client.get_cookie("session")
    assert cookie is not None
    serializer = SecureCookieSessionInterface().get_signing_serializer(admin_app)
    assert serializer is not None
    nonce = serializer.loads(cookie.value)["admin_nonce"]
    with admin_app.app_context():
        svc = services()
        stored = [k.decode() for k in svc.redis.scan_iter(svc.keys.admin_session("*"))]
    assert len(stored) == 1 and nonce not in stored[0]


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@pytest.mark.parametrize("path", ["/admin/sign-in", *ADMIN_PAGES])
def test_admin_pages_carry_security_headers(admin_client: FlaskClient, path: str) -> None:
    response = admin_client.get(path)
    assert response.status_code in (200, 302)
    assert {name: response.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS
    policy = {part.split()[0]: part.split()[1:] for part in response.headers["Content-Security-Policy"].split("; ")}
    assert policy["default-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["style-src"] == ["'self'"] and "'unsafe-inline'" not in response.headers["Content-Security-Policy"]


def test_refusals_and_the_disabled_admin_carry_them_too(admin_app: Flask, client: FlaskClient) -> None:
    anonymous = admin_app.test_client()
    for response in (anonymous.get("/admin/numbers"), anonymous.post("/admin/sign-in", data={}),
                     client.get("/admin/numbers")):
        assert response.status_code in (302, 400, 404)
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_the_export_is_never_cached(admin_client: FlaskClient) -> None:
    response = admin_client.get("/admin/numbers/export")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_admin_templates_need_no_inline_script_or_style() -> None:
    from pathlib import Path
    templates = Path(__file__).resolve().parent.parent / "templates" / "admin"
    inline_script = re.compile(r"<script(?![^>]*\bsrc=)")  # <script src="…static…"> is allowed: script-src 'self'
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not inline_script.search(text), f"{template.name} has an inline <script>: the CSP would block it"
        for forbidden in ("<style", " style=", " onclick=", " onsubmit=", " onload=", "javascript:"):
            assert forbidden not in text, f"{template.name} has {forbidden!r}: the CSP would block it"


@pytest.mark.e2e
def test_throttle_and_sign_out_hold_across_gunicorn_workers(redis_url: str, emulator: EmulatorControl) -> None:
    """Two gevent workers behind one (pretend) router: limits and revoked sessions live in Redis, not a worker."""
    port = free_port()
    env = {**bridge_config(redis_url, emulator.api_url, "admin-e2e", f"http://127.0.0.1:{port}"),
           "ADMIN_PASSWORD": ADMIN_PASSWORD, "TRUSTED_PROXY_HOPS": "1"}
    with run_gunicorn("app:create_app()", env, workers=2, port=port) as server:
        def attempt(browser: requests.Session, forwarded_for: str, password: str, name: str) -> requests.Response:
            page = browser.get(server.url + "/admin/sign-in", timeout=5, headers={"Connection": "close"})
            return browser.post(server.url + "/admin/sign-in", timeout=5, allow_redirects=False,
                                headers={"X-Forwarded-For": forwarded_for, "Connection": "close"},
                                data={"csrf_token": csrf_token_in(page.text), "password": password, "name": name})

        attacker = requests.Session()
        statuses = [attempt(attacker, f"10.0.{i}.1, 203.0.113.9", "guess", f"guesser {i}").status_code
                    for i in range(MAX_FAILURES_PER_CLIENT + 3)]
        assert statuses == [401] * MAX_FAILURES_PER_CLIENT + [429] * 3
        admin = requests.Session()
        assert attempt(admin, "198.51.100.7", ADMIN_PASSWORD, "Ada").status_code == 302
        assert admin.get(server.url + "/admin/numbers", timeout=5, allow_redirects=False).status_code == 200
        stolen = dict(admin.cookies)
        page = admin.get(server.url + "/admin/numbers", timeout=5)
        assert admin.post(server.url + "/admin/sign-out", data={"csrf_token": csrf_token_in(page.text)},
                          timeout=5, allow_redirects=False).status_code == 302
        replayed = requests.get(server.url + "/admin/numbers", cookies=stolen, timeout=5, allow_redirects=False)
        assert replayed.status_code == 302 and "/admin/sign-in" in replayed.headers["Location"]


def test_every_sign_in_post_counts_on_arrival_so_bursts_cannot_outrun_the_failure_count(admin_app: Flask) -> None:
    client = admin_app.test_client()
    client.get("/admin/sign-in")
    # Refused before any password check (no CSRF token), so no failure is ever counted: only the arrival limit.
    statuses = [client.post("/admin/sign-in", data={"password": "guess"}).status_code
                for _ in range(MAX_ATTEMPTS_PER_MINUTE + 2)]
    assert statuses == [400] * MAX_ATTEMPTS_PER_MINUTE + [429, 429]
    assert 0 < int(client.post("/admin/sign-in", data={}).headers["Retry-After"]) <= 60


def test_over_https_a_form_must_come_from_this_site(admin_app: Flask) -> None:
    client = admin_app.test_client()
    base = "https://bridge.example.com"
    token = csrf_token_in(client.get("/admin/sign-in", base_url=base).get_data(as_text=True))
    data = {"csrf_token": token, "password": ADMIN_PASSWORD, "name": "Ada"}
    for referer in (None, "https://evil.example/admin/sign-in"):
        headers = {"Referer": referer} if referer else {}
        response = client.post("/admin/sign-in", base_url=base, data=data, headers=headers)
        assert response.status_code == 400 and "Form expired" in response.get_data(as_text=True), referer
    response = client.post("/admin/sign-in", base_url=base, data=data,
                           headers={"Referer": f"{base}/admin/sign-in"})
    assert response.status_code == 302


def test_static_assets_may_be_cached_but_carry_the_other_headers(admin_app: Flask) -> None:
    with admin_app.test_client().get("/admin/static/admin.css") as response:
        assert response.status_code == 200 and response.headers.get("Cache-Control") != "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
