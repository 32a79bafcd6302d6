"""Admin sign-in, sessions, CSRF and sign-in throttling (Flask test client, real Redis)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.admin.auth import MAX_FAILURES_PER_CLIENT, MAX_FAILURES_TOTAL
from app.extensions import services
from tests.support.admin import admin_post, admin_sign_in, csrf_token_in
from tests.support.settings import ADMIN_PASSWORD

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
    for _ in range(MAX_FAILURES_PER_CLIENT):
        assert admin_sign_in(attacker, password="guess").status_code == 401
    blocked = admin_sign_in(attacker)  # even the right password is not checked now
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 15 * 60
    assert "Too many failed attempts" in blocked.get_data(as_text=True)
    assert attacker.get("/admin/numbers").status_code == 302
    # Another address is not locked out by the attacker's failures.
    other = client_from(admin_app, "198.51.100.7")
    assert admin_sign_in(other).status_code == 302


def test_the_total_limit_holds_against_many_addresses(admin_app: Flask) -> None:
    with admin_app.app_context():
        svc = services()
        svc.redis.set(svc.keys.admin_signin_failures("*"), MAX_FAILURES_TOTAL, ex=60)
    fresh = client_from(admin_app, "203.0.113.9")
    assert admin_sign_in(fresh).status_code == 429


def test_a_successful_sign_in_clears_the_clients_failures(admin_app: Flask) -> None:
    client = admin_app.test_client()
    for _ in range(MAX_FAILURES_PER_CLIENT - 1):
        admin_sign_in(client, password="guess")
    assert admin_sign_in(client).status_code == 302
    assert admin_sign_in(admin_app.test_client(), password="guess").status_code == 401  # not 429


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
