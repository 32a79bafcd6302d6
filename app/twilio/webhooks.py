"""Twilio's HTTP webhooks: voice (answer the call), call status, stream status, connect action, fallback."""
from __future__ import annotations

import logging
import re

import redis
from flask import Response, abort, request

from app.extensions import services
from app.kallglot.client import KallglotError
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.relay.tokens import RelayGrant
from app.twilio import bp, twiml
from app.twilio.signature import request_is_from_twilio

log = logging.getLogger(__name__)

CARRIER = "twilio"
#: Twilio call SIDs are "CA" + 32 hex digits; anything else is not a Twilio call.
CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
#: Final call states (A4): the leg is over.
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
STREAM_OVER_EVENTS = frozenset({"stream-stopped", "stream-error", "stream-failed"})


@bp.before_request
def require_twilio_signature() -> None:
    """Every Twilio route, the media socket upgrade included, must carry a valid signature (else 403)."""
    settings = services().settings
    if not request_is_from_twilio(settings, websocket=request.endpoint == "twilio.media_socket"):
        log.warning("twilio %s refused: missing or invalid X-Twilio-Signature", request.path)
        abort(403, description="invalid Twilio signature")


def _xml(body: str) -> Response:
    return Response(body, mimetype="text/xml")


def _call_sid() -> str:
    call_sid = request.values.get("CallSid", "")
    if not CALL_SID.match(call_sid):
        abort(400, description="CallSid missing or not a Twilio call SID")
    return call_sid


@bp.post("/voice")
def voice() -> Response:
    """A call came in: create (or idempotently re-find) its Kallglot session and connect the media stream."""
    call_sid = _call_sid()
    to_number, from_number = request.form.get("To", ""), request.form.get("From", "")
    svc = services()
    try:
        profile = svc.profiles.for_number(to_number)
        session = svc.kallglot.create_session(
            mode=profile.mode, source_language=profile.source_language or None,
            target_language=profile.target_language or None, phone_number=to_number or None,
            # Derived from the CallSid: a retried webhook replays the same session instead of creating one.
            idempotency_key=f"twilio-call-{call_sid}",
            metadata={"twilio_call_sid": call_sid, "from_number": from_number, "to_number": to_number})
        if session.stream is None:
            raise KallglotError("session has no stream", code="no_stream")
        svc.lifecycle.register_leg(session_id=session.id, carrier=CARRIER, call_id=call_sid,
                                   speaker=SPEAKER_CUSTOMER, from_number=from_number, to_number=to_number,
                                   mode=profile.mode)
    except (KallglotError, redis.RedisError) as exc:
        log.error("twilio call=%s to=%s could not start a session: %s", call_sid, to_number, exc)
        return _xml(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
    expires = session.stream.expires_at.timestamp() if session.stream.expires_at else None
    token = svc.relay_tokens.seal(RelayGrant(
        session_id=session.id, carrier=CARRIER, call_id=call_sid, speaker=SPEAKER_CUSTOMER,
        stream_url=session.stream.url, stream_token=session.stream.token, stream_expires_at=expires))
    log.info("twilio call=%s session=%s to=%s mode=%s answered", call_sid, session.id, to_number, profile.mode)
    return _xml(twiml.connect_stream(svc.settings, session_id=session.id, relay_token=token))


@bp.post("/status")
def call_status() -> tuple[str, int]:
    """Call status callback: record it; a final status ends the leg (and the session, exactly once)."""
    call_sid = _call_sid()
    status = request.form.get("CallStatus", "")
    lifecycle = services().lifecycle
    try:
        lifecycle.record_event(CARRIER, call_sid, "call-status", {
            "status": status, "sequence": request.form.get("SequenceNumber", ""),
            "duration": request.form.get("CallDuration", "")})
        if status in TERMINAL_CALL_STATUSES:
            lifecycle.leg_ended(CARRIER, call_sid, f"call_{status}")
    except redis.RedisError as exc:
        log.error("twilio call=%s status %s not recorded: %s", call_sid, status, exc)
        return "state store unavailable", 503
    return "", 204


@bp.post("/stream-status")
def stream_status() -> tuple[str, int]:
    """``<Stream statusCallback>``: record it; a stopped or failed stream ends the leg."""
    call_sid = _call_sid()
    event = request.form.get("StreamEvent", "")
    lifecycle = services().lifecycle
    try:
        lifecycle.record_event(CARRIER, call_sid, "stream-status", {
            "event": event, "stream_sid": request.form.get("StreamSid", ""),
            "error": request.form.get("StreamError", "")[:200]})
        if event in STREAM_OVER_EVENTS:
            lifecycle.leg_ended(CARRIER, call_sid, event.replace("-", "_"))
    except redis.RedisError as exc:
        log.error("twilio call=%s stream status %s not recorded: %s", call_sid, event, exc)
        return "state store unavailable", 503
    return "", 204


@bp.post("/connect-action")
def connect_action() -> Response:
    """The stream ended while the call is up (Kallglot ended or failed): say so and hang up, never silence."""
    call_sid = _call_sid()
    try:
        services().lifecycle.leg_ended(CARRIER, call_sid, "stream_closed")
    except redis.RedisError as exc:
        log.error("twilio call=%s connect action not recorded: %s", call_sid, exc)
    return _xml(twiml.say_and_hang_up(twiml.SESSION_OVER_MESSAGE))


@bp.post("/fallback")
def fallback() -> Response:
    """The number's ``VoiceFallbackUrl``: answers without touching Kallglot or Redis."""
    log.error("twilio call=%s fallback used (ErrorCode=%s)", request.form.get("CallSid", "?"),
              request.form.get("ErrorCode", "?"))
    return _xml(twiml.say_and_hang_up(twiml.UNAVAILABLE_MESSAGE))
