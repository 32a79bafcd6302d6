"""Local fakes of the Twilio and Telnyx number APIs that record every request (run under gunicorn by tests).

Just enough of each API for the admin's "connect a number": list numbers (and Telnyx applications), update
them. Control endpoints: ``POST /_fake/reset`` (JSON seed data) and ``GET /_fake/requests``.
"""
from __future__ import annotations

import base64
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

TWILIO_FIELDS = {"VoiceUrl": "voice_url", "VoiceMethod": "voice_method", "VoiceFallbackUrl": "voice_fallback_url",
                 "StatusCallback": "status_callback", "StatusCallbackMethod": "status_callback_method",
                 "VoiceApplicationSid": "voice_application_sid"}


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


def create_fake_twilio_app() -> Flask:
    """Twilio's IncomingPhoneNumbers list/update; seed: ``{"account_sid", "auth_token", "numbers": [...]}``."""
    app, state = _recording_app("fake_twilio")

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

    return app


def create_fake_telnyx_app() -> Flask:
    """Telnyx's phone numbers and TeXML / Call Control applications; seed: ``{"api_key", "phone_numbers",
    "texml_applications", "call_control_applications"}``."""
    app, state = _recording_app("fake_telnyx")

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

    return app
