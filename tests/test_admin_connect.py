"""Admin "connect a number": the twilio and telnyx SDKs against local fakes that record the requests."""
from __future__ import annotations

import base64
import html
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from tests.support.admin import admin_post, admin_sign_in
from tests.support.settings import PUBLIC_URL, TELNYX_API_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN
from tests.support.servers import RunningServer

PN_NEW, PN_DONE = "PN" + "a" * 32, "PN" + "b" * 32
TWILIO_BASE = f"/2010-04-01/Accounts/{TWILIO_ACCOUNT_SID}/IncomingPhoneNumbers"


def seed(server: RunningServer, data: dict[str, Any]) -> None:
    requests.post(server.url + "/_fake/reset", json=data, timeout=5).raise_for_status()


def recorded(server: RunningServer, method: str | None = None) -> list[dict[str, Any]]:
    seen = requests.get(server.url + "/_fake/requests", timeout=5).json()["requests"]
    return [r for r in seen if method is None or r["method"] == method]


def twilio_number(sid: str, number: str, **fields: str | None) -> dict[str, Any]:
    return {"sid": sid, "phone_number": number, "friendly_name": f"Line {number[-4:]}", "voice_url": None,
            "voice_method": "POST", "voice_fallback_url": None, "status_callback": None,
            "status_callback_method": "POST", "voice_application_sid": None, **fields}


@pytest.fixture
def fake_twilio(fake_twilio_server: RunningServer) -> RunningServer:
    seed(fake_twilio_server, {"account_sid": TWILIO_ACCOUNT_SID, "auth_token": TWILIO_AUTH_TOKEN, "numbers": [
        twilio_number(PN_NEW, "+14155550101", voice_url="https://old.example.com/voice",
                      voice_application_sid="AP" + "c" * 32),
        twilio_number(PN_DONE, "+14155550102", voice_url=PUBLIC_URL + "/twilio/voice",
                      voice_fallback_url=PUBLIC_URL + "/twilio/fallback", status_callback=PUBLIC_URL + "/twilio/status"),
    ]})
    return fake_twilio_server


@pytest.fixture
def fake_telnyx(fake_telnyx_server: RunningServer) -> RunningServer:
    seed(fake_telnyx_server, {
        "api_key": TELNYX_API_KEY,
        "phone_numbers": [
            {"id": "1", "phone_number": "+14155550201", "connection_id": "texml-1", "connection_name": "TeXML app",
             "status": "active", "tags": []},
            {"id": "2", "phone_number": "+14155550202", "connection_id": "cc-1", "connection_name": "CC app",
             "status": "active", "tags": []},
            {"id": "3", "phone_number": "+14155550203", "connection_id": None, "status": "active", "tags": []},
        ],
        "texml_applications": [{"id": "texml-1", "friendly_name": "Front desk", "voice_url": "https://old/texml",
                                "voice_method": "get", "status_callback": None}],
        "call_control_applications": [{"id": "cc-1", "application_name": "Support",
                                       "webhook_event_url": "https://old/cc", "webhook_api_version": "2"}],
    })
    return fake_telnyx_server


@pytest.fixture
def connect_client(make_admin_app: Callable[..., Flask], fake_twilio: RunningServer,
                   fake_telnyx: RunningServer) -> FlaskClient:
    app = make_admin_app(TWILIO_API_URL=fake_twilio.url, TELNYX_API_KEY=TELNYX_API_KEY,
                         TELNYX_API_URL=fake_telnyx.url + "/v2")
    client = app.test_client()
    admin_sign_in(client)
    return client


def test_lists_twilio_numbers_and_whether_they_point_here(connect_client: FlaskClient,
                                                          fake_twilio: RunningServer) -> None:
    page = html.unescape(connect_client.get("/admin/connect").get_data(as_text=True))
    assert "+14155550101" in page and "+14155550102" in page
    assert "https://old.example.com/voice" in page and f"(should be {PUBLIC_URL}/twilio/voice)" in page
    assert "overrides these URLs" in page  # the TwiML app would win over the URLs
    assert page.count("Point here</button>") == 3  # +14155550101 and the two Telnyx applications
    assert '<strong class="ok">Yes</strong>' in page  # +14155550102 is already done
    (listing,) = recorded(fake_twilio, "GET")
    assert listing["path"] == TWILIO_BASE + ".json"
    expected = base64.b64encode(f"{TWILIO_ACCOUNT_SID}:{TWILIO_AUTH_TOKEN}".encode()).decode()
    assert listing["authorization"] == f"Basic {expected}"


def test_point_a_twilio_number_here(connect_client: FlaskClient, fake_twilio: RunningServer) -> None:
    response = admin_post(connect_client, f"/admin/connect/twilio/{PN_NEW}", {"number": "+14155550101"})
    assert response.status_code == 302 and response.location == "/admin/connect"
    (update,) = recorded(fake_twilio, "POST")
    assert update["path"] == f"{TWILIO_BASE}/{PN_NEW}.json"
    assert update["form"] == {"VoiceUrl": PUBLIC_URL + "/twilio/voice", "VoiceMethod": "POST",
                              "VoiceFallbackUrl": PUBLIC_URL + "/twilio/fallback",
                              "StatusCallback": PUBLIC_URL + "/twilio/status", "StatusCallbackMethod": "POST",
                              "VoiceApplicationSid": ""}
    page = connect_client.get("/admin/connect").get_data(as_text=True)
    assert "+14155550101 now points at this service." in page
    assert page.count('<strong class="ok">Yes</strong>') == 2
    audit = connect_client.get("/admin/audit").get_data(as_text=True)
    assert "connect twilio number" in audit and "+14155550101" in audit


def test_lists_telnyx_numbers_by_application(connect_client: FlaskClient, fake_telnyx: RunningServer) -> None:
    page = html.unescape(connect_client.get("/admin/connect").get_data(as_text=True))
    assert "Front desk (texml)" in page and "Support (call-control)" in page
    assert f"(should be {PUBLIC_URL}/telnyx/texml)" in page and f"(should be {PUBLIC_URL}/telnyx/call-control)" in page
    assert "+14155550203" in page and "assign one in the Telnyx portal" in page
    paths = {r["path"] for r in recorded(fake_telnyx)}
    assert paths == {"/v2/phone_numbers", "/v2/texml_applications", "/v2/call_control_applications"}
    assert all(r["authorization"] == f"Bearer {TELNYX_API_KEY}" for r in recorded(fake_telnyx))


def test_point_a_telnyx_texml_application_here(connect_client: FlaskClient, fake_telnyx: RunningServer) -> None:
    response = admin_post(connect_client, "/admin/connect/telnyx/texml/texml-1", {"number": "+14155550201"})
    assert response.status_code == 302
    (patch,) = recorded(fake_telnyx, "PATCH")
    assert patch["path"] == "/v2/texml_applications/texml-1"
    assert patch["json"] == {"friendly_name": "Front desk", "voice_url": PUBLIC_URL + "/telnyx/texml",
                             "voice_method": "post", "status_callback": PUBLIC_URL + "/telnyx/texml/status",
                             "status_callback_method": "post"}
    assert "+14155550201 now points at this service." in connect_client.get("/admin/connect").get_data(as_text=True)


def test_point_a_telnyx_call_control_application_here(connect_client: FlaskClient,
                                                      fake_telnyx: RunningServer) -> None:
    admin_post(connect_client, "/admin/connect/telnyx/call-control/cc-1", {"number": "+14155550202"})
    (patch,) = recorded(fake_telnyx, "PATCH")
    assert patch["path"] == "/v2/call_control_applications/cc-1"
    assert patch["json"] == {"application_name": "Support", "webhook_event_url": PUBLIC_URL + "/telnyx/call-control",
                             "webhook_api_version": "2"}
    page = connect_client.get("/admin/connect").get_data(as_text=True)
    assert page.count('<strong class="ok">Yes</strong>') == 2  # the Twilio one and this one


def test_carrier_errors_are_shown_not_raised(make_admin_app: Callable[..., Flask], fake_twilio: RunningServer,
                                             fake_telnyx: RunningServer) -> None:
    app = make_admin_app(TWILIO_API_URL=fake_twilio.url, TWILIO_AUTH_TOKEN="wrong-token",
                         TELNYX_API_KEY="KEY_wrong", TELNYX_API_URL=fake_telnyx.url + "/v2")
    client = app.test_client()
    admin_sign_in(client)
    page = client.get("/admin/connect").get_data(as_text=True)
    assert "Twilio: " in page and "Authentication Error" in page
    assert "Telnyx: " in page and "Authentication failed" in page
    response = admin_post(client, f"/admin/connect/twilio/{PN_NEW}", {"number": "+14155550101"})
    assert response.status_code == 302
    assert "Could not connect +14155550101: Twilio" in client.get("/admin/connect").get_data(as_text=True)


def test_unconfigured_accounts_say_what_to_set(admin_client: FlaskClient) -> None:
    page = admin_client.get("/admin/connect").get_data(as_text=True)
    assert "set TELNYX_API_KEY" in page
