"""``POST /api/calls``: start a session and dial a customer (callbacks), authenticated with ``API_TOKEN``."""
from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import replace
from typing import Any

import redis
from flask import Blueprint, abort, jsonify, request
from flask.typing import ResponseReturnValue

from app import metrics
from app.api.limits import (
    IDEMPOTENCY_TTL_SECONDS, body_fingerprint, digest, idempotency_conflict, live_api_calls, rate_limited,
    track_api_call,
)
from app.calls.destinations import DestinationDenied, DestinationRules
from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError, CarrierNotConfigured
from app.extensions import services
from app.redis_keys import as_text
from app.kallglot.client import KallglotError, customer_and_agent
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.profiles import E164, TRANSPORT_RELAY

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")
#: Longest ``Idempotency-Key`` accepted (it is hashed before use anywhere).
MAX_IDEMPOTENCY_KEY_LENGTH = 255


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

    The ``from`` number's profile chooses the mode and languages (and an agent leg once the customer answers);
    it must be a number configured here (its own profile), and ``to`` must pass the deployment's destination
    rules (:mod:`app.calls.destinations`). Per token: ``API_CALLS_PER_MINUTE`` and ``API_MAX_CONCURRENT_CALLS``.
    An ``Idempotency-Key`` header makes a retried request return the same session instead of dialling again;
    the same key with another body is refused with 422.
    """
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description="body must be a JSON object")
    svc = services()
    to_number, from_number = str(body.get("to", ""))[:32], str(body.get("from", ""))[:32]
    problems = {name: "must be an E.164 number like +14155551234" for name, value in
                (("to", to_number), ("from", from_number)) if not E164.match(value)}
    if body.get("carrier") and str(body["carrier"]) not in svc.carrier_controls:
        problems["carrier"] = f"must be one of {', '.join(sorted(svc.carrier_controls))}"
    raw_key = request.headers.get("Idempotency-Key", "")
    if len(raw_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        problems["Idempotency-Key"] = f"must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
    if problems:
        return jsonify(error="invalid request", problems=problems), 422
    token_hash = digest("api-token", svc.settings.api_token)
    try:
        profile = svc.profiles.for_number(from_number)
        carrier = str(body.get("carrier") or profile.carrier)
        if not profile.own:
            problems["from"] = "must be one of this service's configured numbers"
        try:
            DestinationRules.of(svc.settings.destination_countries).check(to_number)
        except DestinationDenied as exc:
            problems["to"] = str(exc)
            _refused(exc.reason, to_number, from_number)
        if problems:
            if "from" in problems:
                _refused("from_not_ours", to_number, from_number)
            return jsonify(error="invalid request", problems=problems), 422
        key_hash = digest("api-call", raw_key or str(uuid.uuid4()))
        if raw_key and idempotency_conflict(svc.redis, svc.keys, key_hash, body_fingerprint(body)):
            return jsonify(error="Idempotency-Key reused",
                           message="this Idempotency-Key was used with another request body"), 422
        dialled = svc.keys.seen("api-call", key_hash)
        if not raw_key or not svc.redis.exists(dialled):  # a replay of a dialled call is never refused
            if rate_limited(svc.redis, svc.keys, token_hash, svc.settings.api_calls_per_minute):
                _refused("rate_limited", to_number, from_number)
                return jsonify(error="too many calls", message="API_CALLS_PER_MINUTE reached"), 429, \
                    {"Retry-After": "60"}
            if live_api_calls(svc.redis, svc.keys, token_hash) >= svc.settings.api_max_concurrent_calls:
                _refused("concurrency", to_number, from_number)
                return jsonify(error="too many live calls", message="API_MAX_CONCURRENT_CALLS reached"), 429
        return _dial(svc, carrier, profile, key_hash, dialled, token_hash, to_number, from_number)
    except redis.RedisError as exc:
        log.error("api call: Redis unavailable: %s", exc)
        return jsonify(error="state store unavailable"), 503


def _refused(reason: str, to_number: str, from_number: str) -> None:
    """A metric (``kallglot_bridge_api_calls_refused_total``) and a log line an operator can alert on."""
    metrics.API_CALLS_REFUSED.labels(reason).inc()
    log.warning("api call REFUSED reason=%s to=%s from=%s", reason, to_number, from_number)


def _dial(svc: Any, carrier: str, profile: Any, key_hash: str, dialled: str, token_hash: str,
          to_number: str, from_number: str) -> ResponseReturnValue:
    """Create (or replay) the session and dial ``to_number`` once per idempotency key."""
    call_key = f"api-{key_hash}"
    try:
        session = svc.lifecycle.create_session(
            carrier=carrier, call_id=call_key, mode=profile.mode, source_language=profile.source_language or None,
            target_language=profile.target_language or None, phone_number=from_number,
            idempotency_key=f"api-call-{key_hash}",
            metadata={**profile.metadata, "direction": "outbound", "from_number": from_number,
                      "to_number": to_number},
            **({"participants": customer_and_agent(profile.source_language, profile.target_language)}
               if profile.has_agent else {}))
        if not svc.redis.set(dialled, "", nx=True, ex=IDEMPOTENCY_TTL_SECONDS):  # a retry: dial only once
            existing = as_text(svc.redis.get(dialled)) or None
            svc.lifecycle.confirm_create(carrier, call_key)
            return jsonify(session_id=session.id, call_id=existing, replayed=True), 200
        track_api_call(svc.redis, svc.keys, token_hash, session.id)
        try:
            call_id = svc.carrier_controls[carrier].dial(to=to_number, from_=from_number, session_id=session.id,
                                                         speaker=SPEAKER_CUSTOMER)
        except CarrierError:
            svc.redis.delete(dialled)
            raise
        svc.redis.set(dialled, call_id, ex=IDEMPOTENCY_TTL_SECONDS)
        # A call the bridge places streams through the relay whatever the number's transport (README "Transports").
        svc.lifecycle.register_leg(replace(LegSpec.from_profile(
            profile, carrier=carrier, call_id=call_id, speaker=SPEAKER_CUSTOMER, from_number=from_number,
            to_number=to_number, default_reconnect_window_seconds=svc.settings.reconnect_window_seconds),
            transport=TRANSPORT_RELAY), session_id=session.id)
        svc.lifecycle.confirm_create(carrier, call_key)
    except KallglotError as exc:
        log.error("api call to=%s: Kallglot refused the session: %s", to_number, exc)
        return jsonify(error="translation service unavailable", code=exc.code), 502
    except redis.RedisError:
        raise  # create_call answers 503
    except CarrierNotConfigured as exc:  # our own configuration, not the carrier, stopped the dial
        log.error("api call to=%s: %s is not configured for outbound calls: %s", to_number, carrier, exc)
        svc.lifecycle.confirm_create(carrier, call_key)
        svc.lifecycle.end_session(session.id, "dial_failed")
        return jsonify(error=f"outbound calls through {carrier} are not configured on this service",
                       detail=str(exc)[:200]), 503
    except CarrierError as exc:  # the carrier refused the dial
        log.error("api call to=%s: dialling through %s failed: %s", to_number, carrier, exc)
        svc.lifecycle.confirm_create(carrier, call_key)
        svc.lifecycle.end_session(session.id, "dial_failed")
        return jsonify(error="the carrier refused the call", detail=str(exc)[:200]), 502
    log.info("api call %s call=%s session=%s dialled %s", carrier, call_id, session.id, to_number)
    return jsonify(session_id=session.id, call_id=call_id), 201
