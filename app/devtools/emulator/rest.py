"""REST side of the emulator: the ``/v1`` Kallglot API and the test-only ``/_emulator`` control API."""
from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .artifacts import ANALYSIS_TYPES, analysis_view, record_turn
from .errors import ApiError
from .state import (BEHAVIOURS, FAULT_ENDPOINTS, LANGUAGES, MODES, EmulatorState, Session, iso_utc,
                    random_id)

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def _invalid(code: str, message: str, param: str | None = None, status: int = 422) -> ApiError:
    # Field validation is the "pre-handler validation" the docs map to 422; malformed bodies get 400.
    return ApiError(status, "validation_error", code, message, param=param)


def _json_body() -> dict[str, Any]:
    """The request body, which must be a JSON object."""
    try:
        body = json.loads(request.get_data())
    except ValueError:
        raise _invalid("invalid_request", "Request body must be a JSON object.", status=400) from None
    if not isinstance(body, dict):
        raise _invalid("invalid_request", "Request body must be a JSON object.", status=400)
    return body


def validate_create(body: dict[str, Any]) -> dict[str, Any]:
    """Check a create body against the newer docs (create a session) and return the Session constructor fields."""
    if "provider" in body:
        raise _invalid("invalid_provider", "The provider object is no longer accepted; use routing.",
                       "provider", status=400)
    mode = body.get("mode")
    if mode is None:
        raise _invalid("missing_required_field", "mode is required.", "mode")
    if mode not in MODES:
        raise _invalid("invalid_mode", f"mode must be one of {sorted(MODES)}.", "mode")
    for name in ("source_language", "target_language"):
        if body.get(name) is not None and body[name] not in LANGUAGES:
            raise _invalid("invalid_language_code", f"{name} is not a supported ISO-639-1 code.", name)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("invalid_field_value", "metadata must be an object.", "metadata")
    participants = _validate_participants(body.get("participants"))
    routing = body.get("routing")
    provider = phone_number = None
    if routing is not None:
        if not isinstance(routing, dict):
            raise _invalid("invalid_field_value", "routing must be an object.", "routing")
        methods = [name for name in ("phone_number", "connection_id", "type") if routing.get(name) is not None]
        if len(methods) > 1:
            raise _invalid("invalid_field_value", "Supply one routing method only.", "routing")
        phone_number = routing.get("phone_number")
        if phone_number is not None and not (isinstance(phone_number, str) and E164.match(phone_number)):
            raise _invalid("invalid_field_value", "phone_number must be E.164.", "routing.phone_number")
        connection_id = routing.get("connection_id")
        if connection_id is not None and not (isinstance(connection_id, str) and connection_id):
            raise _invalid("invalid_field_value", "connection_id must be a string.", "routing.connection_id")
        if routing.get("type") not in (None, "sip"):
            raise _invalid("invalid_field_value", 'type must be "sip".', "routing.type")
        if routing.get("direction") not in (None, "inbound", "outbound"):
            raise _invalid("invalid_field_value", "direction must be inbound or outbound.", "routing.direction")
        if phone_number:
            provider = "twilio"  # the emulated org's managed numbers are Twilio numbers
        elif connection_id:
            provider = "telnyx" if "telnyx" in connection_id.lower() else "twilio"
        elif routing.get("type") == "sip":
            provider = "sip"
    return {"mode": mode, "source_language": body.get("source_language"),
            "target_language": body.get("target_language"), "routing": routing, "provider": provider,
            "phone_number": phone_number, "metadata": metadata, "participants": participants}


#: The participant types of Kallglot's multi-participant example (assumption 8 in app/kallglot/stream_protocol.py).
PARTICIPANT_TYPES = ("customer", "agent")


def _validate_participants(raw: Any) -> list[dict[str, str]] | None:
    """``participants``: a list of 1–10 objects ``{"type": "customer"|"agent", "language"?: <code>}``, one
    customer at most; anything else is refused as Kallglot refuses invalid fields (422)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not 1 <= len(raw) <= 10:
        raise _invalid("invalid_field_value", "participants must be a list of 1 to 10 objects.", "participants")
    for index, item in enumerate(raw):
        param = f"participants[{index}]"
        if not isinstance(item, dict) or set(item) - {"type", "language"}:
            raise _invalid("invalid_field_value", "a participant is an object with type and language only.", param)
        if item.get("type") not in PARTICIPANT_TYPES:
            raise _invalid("invalid_field_value", f"type must be one of {list(PARTICIPANT_TYPES)}.", param + ".type")
        if "language" in item and item["language"] not in LANGUAGES:
            raise _invalid("invalid_language_code", "language is not a supported ISO-639-1 code.",
                           param + ".language")
    if sum(item["type"] == "customer" for item in raw) > 1:
        raise _invalid("invalid_field_value", "a session has one customer.", "participants")
    return [dict(item) for item in raw]


def normalise_fault(raw: Any) -> dict[str, Any]:
    """Fill in a fault's defaults; reject unknown endpoints and non-integer statuses."""
    if not isinstance(raw, dict) or raw.get("endpoint") not in FAULT_ENDPOINTS:
        raise _invalid("invalid_field_value", f"endpoint must be one of {sorted(FAULT_ENDPOINTS)}.",
                       "faults", status=400)
    if not isinstance(raw.get("status"), (int, type(None))):
        raise _invalid("invalid_field_value", "status must be an HTTP status code.", "faults", status=400)
    return {"endpoint": raw["endpoint"], "status": raw.get("status"),
            "code": raw.get("code") or "service_unavailable", "type": raw.get("type") or "api_error",
            "message": raw.get("message") or "Injected fault.", "times": int(raw.get("times") or 1),
            "retry_after": raw.get("retry_after"), "delay_seconds": float(raw.get("delay_seconds") or 0),
            # Optional: only requests about this session (get, end, connect) take the fault, so one test's
            # fault is not consumed by another server's background work against the same emulator.
            "session_id": raw.get("session_id"),
            # Optional: an outage at Kallglot's edge, answered before the idempotency check, so even a replay
            # of a remembered request fails (a plain fault is taken after it: a replay is answered as before).
            "outage": bool(raw.get("outage"))}


def register_rest_routes(app: Flask, state: EmulatorState, on_ended: Callable[[str], None] | None = None) -> None:
    """Attach the ``/v1`` API, the control API and the JSON error handling to ``app``; ``on_ended(session_id)``
    runs when a REST ``end`` ends a session (the after-call webhooks)."""

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = random_id("req_", 24)

    @app.after_request
    def add_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    app.register_error_handler(ApiError, lambda error: error.response())

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = "not_found" if error.code == 404 else (error.name or "error").lower().replace(" ", "_")
        return ApiError(error.code or 500, "invalid_request_error", code, error.description or "").response()

    def authenticate() -> str:
        bearer = request.headers.get("Authorization", "")
        key = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("X-API-Key", "")
        if not key or not hmac.compare_digest(key.encode(), state.api_key.encode()):
            raise ApiError(401, "authentication_error", "invalid_api_key", "Invalid or missing API key.")
        return key

    def apply_fault(endpoint: str, *, outage_only: bool = False) -> Response | None:
        fault = state.take_fault(endpoint, (request.view_args or {}).get("session_id"), outage_only=outage_only)
        if fault is None:
            return None
        generation = state.generation
        state.pause(fault["delay_seconds"])  # cooperative under gevent's monkey patching
        if state.generation != generation:  # reset meanwhile: this request belongs to a state that is gone
            return ApiError(503, "api_error", "emulator_reset",
                            "The emulator was reset while this request waited out its injected delay.").response()
        if fault["status"] is None:
            return None  # a pure delay: carry on normally
        return ApiError(fault["status"], fault["type"], fault["code"], fault["message"],
                        retry_after=fault["retry_after"]).response()

    def run_idempotent(api_key: str, endpoint: str, produce: Callable[[], Response]) -> Response:
        """Run ``produce`` once per Idempotency-Key; injected faults and 5xx are not remembered."""
        idempotency_key = request.headers.get("Idempotency-Key")
        if not idempotency_key:
            fault = apply_fault(endpoint)
            return fault if fault is not None else produce()
        outage = apply_fault(endpoint, outage_only=True)
        if outage is not None:
            return outage
        raw = request.get_data()
        try:
            canonical = json.dumps(json.loads(raw), sort_keys=True) if raw.strip() else ""
        except ValueError:
            canonical = raw.decode("latin-1")
        scope = (api_key, idempotency_key)  # keys are scoped to the org, i.e. the API key
        claim = state.idempotency_begin(scope, f"{request.method} {request.path}\n{canonical}")
        if claim == "mismatch":
            raise ApiError(400, "invalid_request_error", "idempotency_mismatch",
                           "This Idempotency-Key was used with a different request.")
        if claim == "conflict":
            raise ApiError(409, "invalid_request_error", "idempotency_conflict",
                           "A request with this Idempotency-Key is still being processed.", retry_after=1)
        if isinstance(claim, tuple):
            replay = Response(claim[1], status=claim[0], mimetype="application/json")
            replay.headers["Idempotent-Replayed"] = "true"
            return replay
        remembered: tuple[int, bytes] | None = None
        try:
            response = apply_fault(endpoint)
            if response is None:
                try:
                    response = produce()
                except ApiError as error:
                    response = error.response()
                if response.status_code < 500:
                    remembered = (response.status_code, response.get_data())
            return response
        finally:
            state.idempotency_finish(scope, remembered)

    def stream_view(session: Session) -> dict[str, Any]:
        token, expires_at = state.mint_token(session)
        if state.public_url:
            base = re.sub(r"^http", "ws", state.public_url)
        else:
            base = f"{'wss' if request.scheme == 'https' else 'ws'}://{request.host}"
        return {"url": f"{base}/v1/sessions/{session.id}/connect", "token": token, "expires_at": iso_utc(expires_at)}

    def find_session(session_id: str) -> Session:
        session = state.get_session(session_id)
        if session is None:
            raise ApiError(404, "invalid_request_error", "not_found", f"No session {session_id}.")
        return session

    # --- /v1 ----------------------------------------------------------------------------------------
    @app.post("/v1/sessions")
    def create_session() -> Response:
        api_key = authenticate()

        def produce() -> Response:
            fields = validate_create(_json_body())
            session = state.add_session(Session(**fields, idempotency_key=request.headers.get("Idempotency-Key")))
            response = jsonify(session.public_view(stream=stream_view(session), with_times=False))
            response.status_code = 201
            return response

        return run_idempotent(api_key, "create", produce)

    @app.get("/v1/sessions/<session_id>")
    def retrieve_session(session_id: str) -> Response:
        authenticate()
        fault = apply_fault("get")
        if fault is not None:
            return fault
        session = find_session(session_id)
        # Assumption 4 (app.kallglot.stream_protocol): while the session is not ended, a GET mints a fresh token.
        return jsonify(session.public_view(stream=stream_view(session) if session.status != "ended" else None))

    @app.post("/v1/sessions/<session_id>/end")
    def end_session(session_id: str) -> Response:
        api_key = authenticate()
        state.count_end_call(session_id)  # every call counts, replays and faulted ones included

        def produce() -> Response:
            outcome = state.end(session_id, "api_end")
            if outcome is None:
                raise ApiError(404, "invalid_request_error", "not_found", f"No session {session_id}.")
            summary, connections = outcome
            if on_ended is not None:
                on_ended(session_id)
            for conn in connections:
                conn.send({"type": "session.ended", "session_id": session_id, "reason": "api_end"})
                conn.close(1000, "session ended")
            return jsonify(summary)

        return run_idempotent(api_key, "end", produce)

    @app.post("/v1/sessions/<session_id>/analysis")
    def create_analysis(session_id: str) -> Response:
        api_key = authenticate()

        def produce() -> Response:
            session = find_session(session_id)
            body = _json_body() if request.get_data().strip() else {}
            kind = body.get("type", "default")
            if kind not in ANALYSIS_TYPES:
                raise _invalid("invalid_field_value", f"type must be one of {list(ANALYSIS_TYPES)}.", "type")
            analysis = state.add_analysis(session, kind)
            response = jsonify(analysis_view(state, analysis))
            response.status_code = 202
            return response

        return run_idempotent(api_key, "analysis", produce)

    @app.get("/v1/analyses/<analysis_id>")
    def retrieve_analysis(analysis_id: str) -> Response:
        authenticate()
        with state.lock:
            analysis = state.analyses.get(analysis_id)
        if analysis is None:
            raise ApiError(404, "invalid_request_error", "not_found", f"No analysis {analysis_id}.")
        return jsonify(analysis_view(state, analysis))

    # --- /_emulator control API (no auth; test-only) ------------------------------------------------
    @app.get("/_emulator/sessions")
    def control_sessions() -> Response:
        with state.lock:
            return jsonify({"sessions": [s.control_view() for s in state.sessions.values()]})

    @app.get("/_emulator/sessions/<session_id>")
    def control_session_detail(session_id: str) -> Response:
        session = find_session(session_id)
        with state.lock:
            return jsonify(session.control_view())

    @app.get("/_emulator/stats")
    def control_stats() -> Response:
        return jsonify(state.stats())

    @app.post("/_emulator/reset")
    def control_reset() -> Response:
        for conn in state.reset():
            conn.close(1001, "emulator reset")
        return jsonify({"reset": True})

    @app.post("/_emulator/behaviour")
    def control_behaviour() -> Response:
        behaviour = _json_body().get("behaviour")
        if behaviour not in BEHAVIOURS:
            raise _invalid("invalid_field_value", f"behaviour must be one of {sorted(BEHAVIOURS)}.",
                           "behaviour", status=400)
        with state.lock:
            state.behaviour = behaviour
        return jsonify({"behaviour": behaviour})

    @app.route("/_emulator/faults", methods=["GET", "POST", "DELETE"])
    def control_faults() -> Response:
        if request.method == "POST":
            raw_faults = _json_body().get("faults")
            if not isinstance(raw_faults, list):
                raise _invalid("invalid_field_value", "faults must be a list.", "faults", status=400)
            state.add_faults([normalise_fault(raw) for raw in raw_faults])
        elif request.method == "DELETE":
            with state.lock:
                state.faults.clear()
        with state.lock:
            return jsonify({"faults": [dict(fault) for fault in state.faults]})

    @app.post("/_emulator/sessions/<session_id>/send")
    def control_send(session_id: str) -> Response:
        session = find_session(session_id)
        messages = _json_body().get("messages")
        if not isinstance(messages, list):
            raise _invalid("invalid_field_value", "messages must be a list.", "messages", status=400)
        with state.lock:
            connections = session.live_connections()
        # A string message is sent verbatim, so tests can also push invalid JSON.
        for message in messages:
            if isinstance(message, dict) and message.get("type") == "transcript.final":
                record_turn(state, session_id, message)
        delivered = sum(all([conn.send(message) for message in messages]) for conn in connections)
        return jsonify({"connections": delivered})

    @app.post("/_emulator/sessions/<session_id>/drop")
    def control_drop(session_id: str) -> Response:
        session = find_session(session_id)
        with state.lock:
            connections = session.live_connections()
        for conn in connections:
            conn.drop()
        return jsonify({"dropped": len(connections)})
