"""``POST /api/calls``: start a session and dial a customer (callbacks), authenticated with ``API_TOKEN``."""
from __future__ import annotations

import hmac
import logging
import uuid
from typing import Any

import redis
from flask import Blueprint, abort, jsonify, request
from flask.typing import ResponseReturnValue

from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError
from app.extensions import services
from app.redis_keys import as_text
from app.kallglot.client import KallglotError
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.profiles import E164

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")
#: Like Kallglot's own idempotency keys, a retried request is recognised for a day.
IDEMPOTENCY_TTL_SECONDS = 24 * 3600


@bp.before_request
def require_token() -> None:
    """``Authorization: Bearer <API_TOKEN>``, compared in constant time; the API is 404 when no token is set."""
    token = services().settings.api_token
    if not token:
        abort(404, description="the outbound-call API is disabled (set API_TOKEN)")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        abort(401, description="missing or invalid bearer token")


@bp.post("/calls")
def create_call() -> ResponseReturnValue:
    """Body ``{"to": customer E.164, "from": one of our numbers, "carrier": "twilio"|"telnyx"}``.

    The ``from`` number's profile chooses the mode and languages (and an agent leg once the customer answers).
    An ``Idempotency-Key`` header makes a retried request return the same session instead of dialling again.
    """
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description="body must be a JSON object")
    to_number, from_number = str(body.get("to", "")), str(body.get("from", ""))
    problems = {name: "must be an E.164 number like +14155551234" for name, value in
                (("to", to_number), ("from", from_number)) if not E164.match(value)}
    svc = services()
    carrier = str(body.get("carrier") or svc.profiles.default.carrier)
    if carrier not in svc.carrier_controls:
        problems["carrier"] = f"must be one of {', '.join(sorted(svc.carrier_controls))}"
    if problems:
        return jsonify(error="invalid request", problems=problems), 422
    key = request.headers.get("Idempotency-Key") or str(uuid.uuid4())
    try:
        profile = svc.profiles.for_number(from_number)
        session = svc.lifecycle.create_session(
            carrier=carrier, call_id=f"api-{key}", mode=profile.mode, source_language=profile.source_language or None,
            target_language=profile.target_language or None, phone_number=from_number,
            idempotency_key=f"api-call-{key}"[:200],
            metadata={**profile.metadata, "direction": "outbound", "from_number": from_number,
                      "to_number": to_number})
        dialled = svc.keys.seen("api-call", key)
        if not svc.redis.set(dialled, "", nx=True, ex=IDEMPOTENCY_TTL_SECONDS):  # a retry: dial only once
            existing = as_text(svc.redis.get(dialled)) or None
            svc.lifecycle.confirm_create(carrier, f"api-{key}")
            return jsonify(session_id=session.id, call_id=existing, replayed=True), 200
        try:
            call_id = svc.carrier_controls[carrier].dial(to=to_number, from_=from_number, session_id=session.id,
                                                         speaker=SPEAKER_CUSTOMER)
        except CarrierError:
            svc.redis.delete(dialled)
            raise
        svc.redis.set(dialled, call_id, ex=IDEMPOTENCY_TTL_SECONDS)
        svc.lifecycle.register_leg(LegSpec.from_profile(
            profile, carrier=carrier, call_id=call_id, speaker=SPEAKER_CUSTOMER, from_number=from_number,
            to_number=to_number, default_reconnect_window_seconds=svc.settings.reconnect_window_seconds),
            session_id=session.id)
        svc.lifecycle.confirm_create(carrier, f"api-{key}")
    except KallglotError as exc:
        log.error("api call to=%s: Kallglot refused the session: %s", to_number, exc)
        return jsonify(error="translation service unavailable", code=exc.code), 502
    except redis.RedisError as exc:
        log.error("api call to=%s: Redis unavailable: %s", to_number, exc)
        return jsonify(error="state store unavailable"), 503
    except CarrierError as exc:  # the carrier refused the dial
        log.error("api call to=%s: dialling through %s failed: %s", to_number, carrier, exc)
        svc.lifecycle.confirm_create(carrier, f"api-{key}")
        svc.lifecycle.end_session(session.id, "dial_failed")
        return jsonify(error="the carrier refused the call", detail=str(exc)[:200]), 502
    log.info("api call %s call=%s session=%s dialled %s", carrier, call_id, session.id, to_number)
    return jsonify(session_id=session.id, call_id=call_id), 201
