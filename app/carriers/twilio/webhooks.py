"""Twilio's HTTP webhooks: voice (answer the call), call status, stream status, connect action, fallback."""
from __future__ import annotations

import hashlib
import logging
import re
import time

import redis
from flask import Response, abort, request

from app import metrics
from app.extensions import Services, services
from app.calls.events import announce_fallback
from app.calls.legs import live_session, reattach_pin_wanted, start_inbound_leg
from app.calls.reasons import EndReason, kallglot_failed
from app.carriers.contract import TERMINAL_CALL_STATUSES
from app.calls.prompts import SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.kallglot.client import KallglotError, KallglotSession
from app.kallglot.stream_protocol import SPEAKER_AGENT, SPEAKER_CUSTOMER
from app.kallglot.telephony import direct_parameters, sip_uri
from app.logging_setup import bind_log_context
from app.profiles import TRANSPORT_DIRECT, TRANSPORT_RELAY, TRANSPORT_SIP, NumberProfile
from app.redis_keys import first_seen
from app.carriers.twilio import CARRIER, twiml
from app.carriers.twilio.blueprint import bp
from app.carriers.twilio.agent_unavailable import tell_customers_agent_unavailable
from app.carriers.twilio.signature import request_is_from_twilio
from twilio.twiml.voice_response import VoiceResponse

log = logging.getLogger(__name__)

#: Twilio call SIDs are "CA" + 32 hex digits; anything else is not a Twilio call.
CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
#: How often one call's media stream is restored after it dropped, before the caller gets the fallback.
MAX_STREAM_RESTARTS = 3


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


def _stream_twiml(svc: Services, session: KallglotSession, call_sid: str, profile: NumberProfile | None,
                  speaker: str = SPEAKER_CUSTOMER, transport: str = TRANSPORT_RELAY) -> str:
    """The answer that puts the call on ``session`` by the leg's ``transport`` (the greeting on a first answer):
    ``<Connect><Stream>`` to our relay with a fresh relay token, straight to Kallglot with the session's
    (fresh) stream token, or ``<Dial><Sip>`` to the session's SIP URI."""
    greeting = profile.greeting if profile else ""
    greeting_language = profile.greeting_language if profile else "en-US"
    if transport == TRANSPORT_SIP:
        return twiml.dial_sip(svc.settings, sip_uri=sip_uri(session.id, svc.settings.kallglot_sip_domain),
                              greeting=greeting, greeting_language=greeting_language)
    assert session.stream is not None
    if transport == TRANSPORT_DIRECT:
        return twiml.connect_direct(svc.settings, stream_url=session.stream.url,
                                    parameters=direct_parameters(session.id, session.stream),
                                    greeting=greeting, greeting_language=greeting_language)
    token = svc.relay_tokens.seal_stream(session.stream, session_id=session.id, carrier=CARRIER, call_id=call_sid,
                                         speaker=speaker)
    return twiml.connect_stream(svc.settings, session_id=session.id, relay_token=token, greeting=greeting,
                                greeting_language=greeting_language)


@bp.post("/voice")
def voice() -> Response:
    """A call came in: re-attach to the caller's held session, or create one, and connect the media stream."""
    return _answer_inbound(reattach_pin=None)


@bp.post("/reattach-pin")
def reattach_pin() -> Response:
    """The digits a returning caller keyed in (``caller_id_pin`` numbers): re-attach if they are the PIN,
    else a new session — never the held one."""
    return _answer_inbound(reattach_pin=request.form.get("Digits", "")[:16])


def _answer_inbound(reattach_pin: str | None) -> Response:
    call_sid = _call_sid()
    to_number, from_number = request.form.get("To", "")[:32], request.form.get("From", "")[:32]
    svc = services()
    try:
        profile = svc.profiles.for_number(to_number)
        if svc.lifecycle.call_record(CARRIER, call_sid).get("state") == "ended":
            # A replayed (signed) voice webhook of a call that is over must not start or join anything.
            log.warning("twilio call=%s voice webhook for a call already ended refused", call_sid)
            abort(409, description="this call has already ended")
        if reattach_pin is None and reattach_pin_wanted(svc, to_number=to_number, from_number=from_number):
            log.info("twilio call=%s to=%s returning caller asked for the re-attach PIN", call_sid, to_number)
            return _xml(twiml.ask_reattach_pin(svc.settings))
    except redis.RedisError as exc:
        log.error("twilio call=%s to=%s: Redis unreachable, fallback: %s", call_sid, to_number, exc)
        metrics.count_fallback(CARRIER, "redis_unavailable")
        return _xml(twiml.fallback(svc.profiles.default))
    try:
        started = start_inbound_leg(svc, carrier=CARRIER, call_id=call_sid, to_number=to_number,
                                    from_number=from_number, metadata={"twilio_call_sid": call_sid},
                                    reattach_pin=reattach_pin)
    except (KallglotError, redis.RedisError) as exc:
        log.error("twilio call=%s to=%s could not start a session, fallback: %s", call_sid, to_number, exc)
        metrics.count_fallback(CARRIER, "kallglot_unavailable" if isinstance(exc, KallglotError) else "redis_unavailable")
        return _xml(twiml.fallback(profile))
    session = started.session
    bind_log_context(session_id=session.id)
    metrics.count_call(CARRIER, "reattached" if started.reattached else "answered")
    log.info("twilio call=%s session=%s to=%s mode=%s answered%s", call_sid, session.id, to_number, profile.mode,
             " (re-attached)" if started.reattached else "")
    # A returning caller is not greeted twice.
    return _xml(_stream_twiml(svc, session, call_sid, None if started.reattached else profile,
                              transport=started.profile.transport))


def _first_delivery(svc: Services) -> bool:
    """False for a repeated delivery of a callback already handled.

    The key is the hash of what ``X-Twilio-Signature`` covers — the path and every POST parameter (a retry
    repeats them exactly, ``Timestamp``/``SequenceNumber`` included) — never the unsigned
    ``I-Twilio-Idempotency-Token`` header, which a replay can simply change.
    """
    params = sorted(request.form.items(multi=True))
    signed = "\0".join([request.path, *(f"{k}={v}" for k, v in params)])
    return first_seen(svc.redis, svc.keys.seen(CARRIER, hashlib.sha256(signed.encode()).hexdigest()))


@bp.post("/status")
def call_status() -> tuple[str, int]:
    """Call status callback: record it; a final status ends the leg (and the session, exactly once)."""
    call_sid = _call_sid()
    status = request.form.get("CallStatus", "")
    svc = services()
    lifecycle = svc.lifecycle
    try:
        if not _first_delivery(svc):
            return "", 204
        lifecycle.record_event(CARRIER, call_sid, "call-status", {
            "status": status, "sequence": request.form.get("SequenceNumber", ""),
            "duration": request.form.get("CallDuration", "")})
        if status in TERMINAL_CALL_STATUSES:
            # An agent leg that was busy, not answered or failed hung up on nobody: not a clean end, so the
            # lifecycle does not hang up the customer with it (issue 12 item 10).
            call = lifecycle.call_record(CARRIER, call_sid)
            agent_never_answered = status != "completed" and call.get("speaker") == SPEAKER_AGENT
            lifecycle.leg_ended(CARRIER, call_sid, f"call_{status}", clean=not agent_never_answered)
            if agent_never_answered and call.get("session_id"):
                tell_customers_agent_unavailable(svc, call["session_id"], agent_call=call_sid, status=status)
    except redis.RedisError as exc:
        log.error("twilio call=%s status %s not recorded: %s", call_sid, status, exc)
        return "state store unavailable", 503
    return "", 204


@bp.post("/stream-status")
def stream_status() -> tuple[str, int]:
    """``<Stream statusCallback>``: recorded. The relay and the call status decide what a stop means."""
    call_sid = _call_sid()
    event = request.form.get("StreamEvent", "")
    svc = services()
    try:
        if not _first_delivery(svc):
            return "", 204
        svc.lifecycle.record_event(CARRIER, call_sid, "stream-status", {
            "event": event, "stream_sid": request.form.get("StreamSid", ""),
            "error": request.form.get("StreamError", "")[:200]})
    except redis.RedisError as exc:
        log.error("twilio call=%s stream status %s not recorded: %s", call_sid, event, exc)
        return "state store unavailable", 503
    return "", 204


@bp.post("/connect-action")
def connect_action() -> Response:
    """The media stream ended while the call is up: restore it, or say why not — never leave silence."""
    call_sid = _call_sid()
    svc = services()
    try:
        call = svc.lifecycle.call_record(CARRIER, call_sid)
        reason = call.get("end_reason", "") if call.get("state") == "ended" else ""
        status = request.form.get("CallStatus", "")
        if status in TERMINAL_CALL_STATUSES or reason.startswith("call_"):
            # The call itself is over (this request, or its status callback, says so): nothing to restore, and
            # re-attaching would revive a leg whose caller is gone and hold its session open.
            if call.get("session_id") and not reason:
                svc.lifecycle.leg_ended(CARRIER, call_sid, f"call_{status}", clean=True)
            return _xml(str(VoiceResponse()))
        profile = svc.profiles.for_number(call.get("to", request.form.get("To", "")))
        session_id = call.get("session_id")
        if not session_id or reason == EndReason.RELAY_KALLGLOT_ENDED:
            svc.lifecycle.leg_ended(CARRIER, call_sid, EndReason.STREAM_CLOSED)
            return _xml(twiml.say_and_hang_up(SESSION_OVER_MESSAGE))
        if kallglot_failed(reason) or int(call.get("stream_restarts") or 0) >= MAX_STREAM_RESTARTS:
            svc.lifecycle.leg_ended(CARRIER, call_sid, reason or EndReason.STREAM_RESTARTS_EXHAUSTED, clean=False)
            announce_fallback(svc.redis, svc.keys, session_id, carrier=CARRIER, call_id=call_sid,
                              speaker=call.get("speaker", ""), why=reason or EndReason.STREAM_RESTARTS_EXHAUSTED.value)
            return _xml(twiml.fallback(profile))
        session = live_session(svc, session_id)
        if session is None:  # Kallglot has no live session (it ended it, e.g. a direct stream's end): no end call
            svc.lifecycle.ended_by_kallglot(session_id, "stream_closed")
        if session is None or not svc.lifecycle.reattach_leg(CARRIER, call_sid):
            svc.lifecycle.leg_ended(CARRIER, call_sid, EndReason.STREAM_CLOSED)
            return _xml(twiml.say_and_hang_up(SESSION_OVER_MESSAGE))
        # Twilio asks for <Connect action> only once the stream is over: the old relay's lease (a killed
        # worker's lingers until it lapses) must not refuse the restored stream.
        svc.relay_guard.forget_leg(CARRIER, call_sid)
    except (KallglotError, redis.RedisError) as exc:
        log.error("twilio call=%s stream could not be restored, fallback: %s", call_sid, exc)
        return _xml(twiml.fallback(NumberProfile()))
    log.info("twilio call=%s session=%s restoring the media stream (%s)", call_sid, session_id,
             reason or "relay gone")
    # A direct stream is restored straight to Kallglot with the token the GET above just gave (5-minute tokens).
    return _xml(_stream_twiml(svc, session, call_sid, None, transport=call.get("transport") or TRANSPORT_RELAY))


@bp.post("/dial-action")
def dial_action() -> Response:
    """``<Dial action>`` of a ``sip`` call: the dial to Kallglot's SIP endpoint ended, so the leg did.

    A completed dial hangs up; a dial Kallglot never took (``busy``, ``failed``, ``no-answer``) gives the caller
    the number's fallback rather than silence. ``CallStatus`` says whether the caller is
    still there to hear anything.
    """
    call_sid = _call_sid()
    dial_status = request.form.get("DialCallStatus", "")
    svc = services()
    try:
        if not _first_delivery(svc):
            return _xml(str(VoiceResponse()))
        svc.lifecycle.record_event(CARRIER, call_sid, "dial-status", {
            "status": dial_status, "sip_response": request.form.get("DialSipResponseCode", "")[:8],
            "duration": request.form.get("DialCallDuration", "")})
        completed = dial_status in ("completed", "answered")
        # Clean either way: the carrier says the dial is over, and a refused dial is not a lost caller to hold for.
        svc.lifecycle.leg_ended(CARRIER, call_sid, f"dial_{dial_status or 'unknown'}"[:40], clean=True)
        call = svc.lifecycle.call_record(CARRIER, call_sid)
        profile = svc.profiles.for_number(call.get("to", request.form.get("To", "")))
    except redis.RedisError as exc:
        log.error("twilio call=%s dial status %s not recorded: %s", call_sid, dial_status, exc)
        return _xml(twiml.fallback(NumberProfile()))
    if completed or request.form.get("CallStatus", "") in TERMINAL_CALL_STATUSES:
        response = VoiceResponse()
        response.hangup()
        return _xml(str(response))
    log.warning("twilio call=%s SIP dial to Kallglot ended %s (SIP %s): fallback", call_sid, dial_status,
                request.form.get("DialSipResponseCode", "?"))
    metrics.count_fallback(CARRIER, "sip_dial_failed")
    return _xml(twiml.fallback(profile))


@bp.post("/outbound-answer")
def outbound_answer() -> Response:
    """A call we dialled (agent leg, or a callback to a customer) was answered: stream it into its session."""
    call_sid = _call_sid()
    svc = services()
    try:
        call = _wait_for_leg(svc, call_sid)
        session = live_session(svc, call["session_id"]) if call else None
        if call is None or session is None:
            log.warning("twilio call=%s answered but has no live session", call_sid)
            if call:
                svc.lifecycle.leg_ended(CARRIER, call_sid, EndReason.SESSION_GONE)
            return _xml(twiml.say_and_hang_up(SESSION_OVER_MESSAGE))
    except (KallglotError, redis.RedisError) as exc:
        log.error("twilio call=%s outbound answer failed, fallback: %s", call_sid, exc)
        return _xml(twiml.fallback(NumberProfile()))
    log.info("twilio call=%s session=%s outbound leg answered (%s)", call_sid, session.id, call["speaker"])
    return _xml(_stream_twiml(svc, session, call_sid, None, speaker=call["speaker"]))


def _wait_for_leg(svc: Services, call_sid: str, timeout: float = 2.0) -> dict[str, str] | None:
    """The leg's record; Twilio may request the answer URL a moment before ``dial`` returned and registered it."""
    deadline = time.monotonic() + timeout
    while True:
        call = svc.lifecycle.call_record(CARRIER, call_sid)
        if call.get("session_id"):
            return call
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


@bp.post("/fallback")
def fallback() -> Response:
    """The number's ``VoiceFallbackUrl``: answers without touching Kallglot or Redis."""
    metrics.count_fallback(CARRIER, "voice_fallback_url")
    log.error("twilio call=%s fallback used (ErrorCode=%s)", request.form.get("CallSid", "?"),
              request.form.get("ErrorCode", "?"))
    return _xml(twiml.say_and_hang_up(UNAVAILABLE_MESSAGE))
