"""Local fakes of the Twilio and Telnyx number APIs that record every request.

Just enough of each API for the admin's "connect a number": list numbers (and Telnyx applications), update
them. Two ways to run them:

- alone, seeded by a test (``create_fake_twilio_app`` / ``create_fake_telnyx_app`` under gunicorn; control
  endpoints ``POST /_fake/reset`` with JSON seed data and ``GET /_fake/requests``);
- inside the demo's complete fake carriers, seeded with demo numbers: :func:`add_twilio_number_routes` is
  mounted on the fake Twilio REST API (``twilio_rest``, which also places calls) and
  :func:`create_fake_telnyx_api` adds the number routes to the fake Call Control API (``telnyx_api``).
"""
from __future__ import annotations

import base64
import os
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

TWILIO_FIELDS = {"VoiceUrl": "voice_url", "VoiceMethod": "voice_method", "VoiceFallbackUrl": "voice_fallback_url",
                 "StatusCallback": "status_callback", "StatusCallbackMethod": "status_callback_method",
                 "VoiceApplicationSid": "voice_application_sid"}
#: The demo's Call Control application id: the bridge dials outbound Telnyx legs through it
#: (``TELNYX_CONNECTION_ID``) and the fake's demo number routes through it.
DEMO_CALL_CONTROL_APP_ID = "demo-call-control-app"
DEMO_TEXML_APP_ID = "demo-texml-app"


def demo_twilio_numbers() -> list[dict[str, Any]]:
    """Two numbers in the demo's Twilio account, pointing nowhere yet (the admin's "Connect" fixes that)."""
    def number(sid_digit: str, phone: str, name: str) -> dict[str, Any]:
        return {"sid": "PN" + sid_digit * 32, "phone_number": phone, "friendly_name": name, "voice_url": None,
                "voice_method": "POST", "voice_fallback_url": None, "status_callback": None,
                "status_callback_method": "POST", "voice_application_sid": None}
    return [number("1", "+15005550006", "Demo front desk"), number("2", "+15005550007", "Demo support line")]


def demo_telnyx_seed(api_key: str) -> dict[str, Any]:
    """The demo's Telnyx account: a TeXML and a Call Control application, a number on each, one on neither."""
    return {
        "api_key": api_key,
        "phone_numbers": [
            {"id": "1", "phone_number": "+15005550106", "connection_id": DEMO_TEXML_APP_ID,
             "connection_name": "Demo TeXML app", "status": "active", "tags": []},
            {"id": "2", "phone_number": "+15005550107", "connection_id": DEMO_CALL_CONTROL_APP_ID,
             "connection_name": "Demo Call Control app", "status": "active", "tags": []},
            {"id": "3", "phone_number": "+15005550108", "connection_id": None, "status": "active", "tags": []},
        ],
        "texml_applications": [{"id": DEMO_TEXML_APP_ID, "friendly_name": "Demo TeXML app",
                                "voice_url": "https://example.invalid/texml", "voice_method": "post",
                                "status_callback": None}],
        "call_control_applications": [{"id": DEMO_CALL_CONTROL_APP_ID, "application_name": "Demo Call Control app",
                                       "webhook_event_url": "https://example.invalid/call-control",
                                       "webhook_api_version": "2"}],
    }


def _recording_app(name: str) -> tuple[Flask, dict[str, Any]]:
    app = Flask(name)
    state: dict[str, Any] = {"requests": [], "seed": {}}

    @app.before_request
    def record() -> None:
        if not request.path.startswith("/_fake"):
            state["requests"].append({"method": request.method, "path": request.path,
                                      "query": request.args.to_dict(), "form": request.form.to_dict(),
                                      "json": request.get_json(silent=True),
                                      "authorization": request.headers.get("Authorization", "")})

    @app.post("/_fake/reset")
    def reset() -> ResponseReturnValue:
        state["requests"].clear()
        state["seed"] = request.get_json()
        return jsonify(ok=True)

    @app.get("/_fake/requests")
    def requests_seen() -> ResponseReturnValue:
        return jsonify(requests=state["requests"])

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(ok=True)

    return app, state


def add_twilio_number_routes(app: Flask, state: dict[str, Any]) -> None:
    """Twilio's IncomingPhoneNumbers list/update on ``app``; ``state["seed"]``: account_sid, auth_token, numbers."""

    def authorized(account: str) -> bool:
        seed = state["seed"]
        expected = base64.b64encode(f"{seed.get('account_sid')}:{seed.get('auth_token')}".encode()).decode()
        return account == seed.get("account_sid") and request.headers.get("Authorization") == f"Basic {expected}"

    def denied() -> ResponseReturnValue:
        return jsonify(code=20003, message="Authentication Error - invalid username", status=401), 401

    @app.get("/2010-04-01/Accounts/<account>/IncomingPhoneNumbers.json")
    def list_numbers(account: str) -> ResponseReturnValue:
        if not authorized(account):
            return denied()
        return jsonify(incoming_phone_numbers=state["seed"]["numbers"], next_page_uri=None, page=0,
                       page_size=50, first_page_uri=request.path, previous_page_uri=None, start=0, end=0,
                       uri=request.path)

    @app.post("/2010-04-01/Accounts/<account>/IncomingPhoneNumbers/<sid>.json")
    def update_number(account: str, sid: str) -> ResponseReturnValue:
        if not authorized(account):
            return denied()
        for number in state["seed"]["numbers"]:
            if number["sid"] == sid:
                number.update({TWILIO_FIELDS[k]: v or None for k, v in request.form.items() if k in TWILIO_FIELDS})
                return jsonify(number)
        return jsonify(code=20404, message="The requested resource was not found", status=404), 404


def add_telnyx_number_routes(app: Flask, state: dict[str, Any]) -> None:
    """Telnyx's phone numbers and TeXML / Call Control applications on ``app``; ``state["seed"]``: api_key,
    phone_numbers, texml_applications, call_control_applications."""

    @app.before_request
    def authorize() -> ResponseReturnValue | None:
        if request.path.startswith("/v2/") and \
                request.headers.get("Authorization") != f"Bearer {state['seed'].get('api_key')}":
            return jsonify(errors=[{"code": "10009", "title": "Authentication failed"}]), 401
        return None

    def page(items: list[dict[str, Any]]) -> ResponseReturnValue:
        return jsonify(data=items, meta={"page_number": 1, "page_size": 250, "total_pages": 1,
                                         "total_results": len(items)})

    @app.get("/v2/phone_numbers")
    def phone_numbers() -> ResponseReturnValue:
        return page(state["seed"]["phone_numbers"])

    @app.get("/v2/<any(texml_applications, call_control_applications):kind>")
    def applications(kind: str) -> ResponseReturnValue:
        return page(state["seed"][kind])

    @app.route("/v2/<any(texml_applications, call_control_applications):kind>/<app_id>", methods=["GET", "PATCH"])
    def application(kind: str, app_id: str) -> ResponseReturnValue:
        for item in state["seed"][kind]:
            if item["id"] == app_id:
                if request.method == "PATCH":
                    item.update(request.get_json())
                return jsonify(data=item)
        return jsonify(errors=[{"code": "10005", "title": "Resource not found"}]), 404


def create_fake_twilio_app() -> Flask:
    """Twilio's IncomingPhoneNumbers list/update; seed: ``{"account_sid", "auth_token", "numbers": [...]}``."""
    app, state = _recording_app("fake_twilio")
    add_twilio_number_routes(app, state)
    return app


def create_fake_telnyx_app() -> Flask:
    """Telnyx's phone numbers and TeXML / Call Control applications; seed: ``{"api_key", "phone_numbers",
    "texml_applications", "call_control_applications"}``."""
    app, state = _recording_app("fake_telnyx")
    add_telnyx_number_routes(app, state)
    return app


def create_fake_telnyx_api(config: dict[str, str] | None = None) -> Flask:
    """The demo's whole fake Telnyx: the Call Control API and Telnyx's side of calls
    (:func:`~app.devtools.simulator.telnyx_api.create_fake_call_control_app`, same ``FAKE_TELNYX_*`` settings)
    plus the number and application routes, seeded with :func:`demo_telnyx_seed`.

    Run as ONE process: ``gunicorn -k gevent -w 1 'app.devtools.simulator.number_apis:create_fake_telnyx_api()'``.
    """
    from app.devtools.simulator.telnyx_api import create_fake_call_control_app

    settings = {"FAKE_TELNYX_API_KEY": os.environ.get("FAKE_TELNYX_API_KEY", ""), **(config or {})}
    app = create_fake_call_control_app(settings)
    add_telnyx_number_routes(app, {"seed": demo_telnyx_seed(settings["FAKE_TELNYX_API_KEY"])})
    return app
