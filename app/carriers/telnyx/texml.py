"""TeXML: the voice webhook (answer with ``<Connect><Stream>``) and the call/stream status callback.

Bodies are form-encoded like Twilio's, signed with Ed25519 over the raw body (checked before any parsing,
see :mod:`app.carriers.telnyx.signature`); fields are read with ``urllib.parse`` from that same raw body.

TeXML is built with the standard library's ElementTree rather than the twilio library's ``VoiceResponse``:
there is no Telnyx TeXML builder, and Telnyx-only attributes (``bidirectionalMode``, ``bidirectionalCodec``)
are clearer spelled out than smuggled through Twilio's keyword conversion.
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlencode

import redis
from flask import Response, abort, request

from app.config import Settings
from app.extensions import services
from app.kallglot.client import KallglotError
from app.kallglot.telephony import direct_parameters, sip_uri
from app.profiles import TRANSPORT_DIRECT, TRANSPORT_SIP, NumberProfile
from app.carriers.contract import TERMINAL_CALL_STATUSES
from app.calls.prompts import UNAVAILABLE_MESSAGE
from app.relay.tokens import RELAY_TOKEN_PARAMETER, SESSION_PARAMETER
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.codec import FLOW_PARAMETER, FLOW_TEXML
from app.carriers.telnyx.session import start_leg

log = logging.getLogger(__name__)

#: call_control_ids look like ``v3:T02llQxIy…``; accept that alphabet, bounded, and nothing else.
CALL_CONTROL_ID = re.compile(r"^[A-Za-z0-9:_\-]{8,256}$")
#: Hang-up causes of an ordinary end; any other cause is a loss the lifecycle may hold for a reconnect.
CLEAN_HANGUP_CAUSES = frozenset({"normal_clearing", "originator_cancel"})


def xml(root: ET.Element) -> Response:
    """A TeXML document as the response."""
    return Response(ET.tostring(root, encoding="unicode", xml_declaration=True), mimetype="text/xml")


def connect_stream(settings: Settings, *, session_id: str, relay_token: str,
                   profile: NumberProfile | None = None) -> ET.Element:
    """``<Connect><Stream>`` to our relay (bidirectional RTP, PCMU back), then ``<Redirect>`` to
    ``/telnyx/texml/stream-ended`` (:mod:`app.carriers.telnyx.texml_restore`).

    ``bidirectionalMode="rtp"``: in the default ``mp3`` mode Telnyx silently drops raw return audio.
    ``codec="PCMU"``: Telnyx transcodes the caller's leg to μ-law where it can (PCMU↔PCMA only).
    The relay token travels twice: in the URL's query (the ``url`` attribute is documented; the page documents no
    ``<Parameter>`` child) and as a ``<Parameter>`` (TwiML-compatible); the relay accepts either.
    ``<Connect>`` waits until the stream stops, so the verbs after it run only when the stream ended with the
    caller still on the line (Kallglot ended or failed, or the relay's worker died): the redirect restores the
    stream or says why not — never dead air.
    """
    root = ET.Element("Response")
    if profile is not None and profile.greeting:  # said before the stream connects, as on Twilio
        ET.SubElement(root, "Say", {"language": profile.greeting_language or "en-US"}).text = profile.greeting
    connect = ET.SubElement(root, "Connect")
    stream = ET.SubElement(connect, "Stream", {
        "url": settings.public_ws("/telnyx/media") + "?" + urlencode({RELAY_TOKEN_PARAMETER: relay_token}),
        "track": "inbound_track", "codec": "PCMU", "bidirectionalMode": "rtp", "bidirectionalCodec": "PCMU",
        "statusCallback": settings.public("/telnyx/texml/status"), "statusCallbackMethod": "POST"})
    for name, value in ((SESSION_PARAMETER, session_id), (RELAY_TOKEN_PARAMETER, relay_token),
                        (FLOW_PARAMETER, FLOW_TEXML)):
        ET.SubElement(stream, "Parameter", {"name": name, "value": value})
    ET.SubElement(root, "Redirect", {"method": "POST"}).text = settings.public("/telnyx/texml/stream-ended")
    return root


def connect_direct(settings: Settings, *, stream_url: str, parameters: dict[str, str],
                   profile: NumberProfile | None = None) -> ET.Element:
    """``<Connect><Stream>`` straight to Kallglot's ``stream.url`` with Kallglot's own ``<Parameter>`` pair (token,
    session id) — the ``direct`` transport — then, as on the relay, ``<Redirect>`` to ``/telnyx/texml/stream-ended``
    for when the stream ends with the caller still on: restored with a fresh token while the session runs, else a
    goodbye (:mod:`app.carriers.telnyx.texml_restore`) — never dead air, and a dropped stream does not end the call.

    As Kallglot's Telnyx example, except ``track``: ``inbound_track`` with ``bidirectionalMode="rtp"`` and PCMU
    both ways, so Kallglot receives the caller alone (its example's ``both_tracks`` would send it its own
    translation back) in the only encoding it accepts (μ-law 8 kHz; Telnyx transcodes a PCMA leg).
    """
    root = ET.Element("Response")
    if profile is not None and profile.greeting:
        ET.SubElement(root, "Say", {"language": profile.greeting_language or "en-US"}).text = profile.greeting
    connect = ET.SubElement(root, "Connect")
    stream = ET.SubElement(connect, "Stream", {
        "url": stream_url, "track": "inbound_track", "codec": "PCMU", "bidirectionalMode": "rtp",
        "bidirectionalCodec": "PCMU", "statusCallback": settings.public("/telnyx/texml/status"),
        "statusCallbackMethod": "POST"})
    for name, value in parameters.items():
        ET.SubElement(stream, "Parameter", {"name": name, "value": value})
    ET.SubElement(root, "Redirect", {"method": "POST"}).text = settings.public("/telnyx/texml/stream-ended")
    return root


def dial_sip(settings: Settings, *, sip_uri: str, profile: NumberProfile | None = None) -> ET.Element:
    """``<Dial><Sip>`` to the session's Kallglot SIP URI (the ``sip`` transport); ``<Dial action>`` reports how
    the dial ended and answers with a hang-up or the fallback, never silence."""
    root = ET.Element("Response")
    if profile is not None and profile.greeting:
        ET.SubElement(root, "Say", {"language": profile.greeting_language or "en-US"}).text = profile.greeting
    dial = ET.SubElement(root, "Dial", {"action": settings.public("/telnyx/texml/dial-action"), "method": "POST"})
    ET.SubElement(dial, "Sip").text = sip_uri
    return root


def fallback(profile: NumberProfile) -> ET.Element:
    """Kallglot cannot take the call: the profile's message in its language, then ``<Dial>`` its fallback
    number or hang up (as Twilio's :func:`app.carriers.twilio.twiml.fallback`)."""
    root = ET.Element("Response")
    ET.SubElement(root, "Say", {"language": profile.fallback_language or "en-US"}).text = \
        profile.fallback_message or UNAVAILABLE_MESSAGE
    if profile.fallback_number:
        ET.SubElement(root, "Dial").text = profile.fallback_number
    else:
        ET.SubElement(root, "Hangup")
    return root


def say_and_hang_up(root: ET.Element, message: str) -> ET.Element:
    """Append ``<Say>message</Say><Hangup/>`` to ``root``."""
    ET.SubElement(root, "Say", {"language": "en-US"}).text = message
    ET.SubElement(root, "Hangup")
    return root


def texml_form() -> dict[str, str]:
    """The verified raw body as form fields; 400 for a body that is not a form of single-valued fields."""
    try:
        fields = parse_qs(request.get_data(as_text=True), keep_blank_values=True, max_num_fields=200)
    except ValueError:  # more than max_num_fields
        abort(400, description="body is not a form Telnyx would send")
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        abort(400, description=f"fields given more than once: {', '.join(repeated)[:200]}")
    return {name: values[0] for name, values in fields.items()}


def call_id_of(form: dict[str, str]) -> str:
    """The form's ``CallSid`` (a call_control_id), or 400."""
    call_id = form.get("CallSid", "")
    if not CALL_CONTROL_ID.match(call_id):
        abort(400, description="CallSid missing or not a Telnyx call_control_id")
    return call_id


@bp.post("/texml")
def texml_voice() -> Response:
    """A call came in on the TeXML application: create its session and connect the media stream."""
    form = texml_form()
    call_id = call_id_of(form)
    to_number, from_number = form.get("To", ""), form.get("From", "")
    svc = services()
    metadata = {"telnyx_call_control_id": call_id, "telnyx_call_session_id": form.get("CallSessionId", ""),
                "telnyx_connection_id": form.get("ConnectionId", "")}
    try:
        leg, relay_token = start_leg(svc, call_id=call_id, to_number=to_number, from_number=from_number,
                                     metadata={k: v for k, v in metadata.items() if v})
    except (KallglotError, redis.RedisError) as exc:
        log.error("telnyx texml call=%s to=%s could not start a session: %s", call_id, to_number, exc)
        try:
            profile = svc.profiles.for_number(to_number)
        except redis.RedisError:
            profile = NumberProfile()  # Redis down too: the built-in apology, still an answer
        return xml(fallback(profile))
    log.info("telnyx texml call=%s session=%s to=%s mode=%s transport=%s answered", call_id, leg.session.id,
             to_number, leg.profile.mode, leg.profile.transport)
    greeting = None if leg.reattached else leg.profile  # a returning caller is not greeted twice
    if leg.profile.transport == TRANSPORT_SIP:
        return xml(dial_sip(svc.settings, sip_uri=sip_uri(leg.session.id, svc.settings.kallglot_sip_domain),
                             profile=greeting))
    if leg.profile.transport == TRANSPORT_DIRECT and leg.session.stream is not None:
        return xml(connect_direct(svc.settings, stream_url=leg.session.stream.url, profile=greeting,
                                   parameters=direct_parameters(leg.session.id, leg.session.stream)))
    return xml(connect_stream(svc.settings, session_id=leg.session.id, relay_token=relay_token,
                               profile=greeting))


@bp.post("/texml/dial-action")
def texml_dial_action() -> Response:
    """``<Dial action>`` of a ``sip`` call: the dial to Kallglot's SIP endpoint ended, so the leg did. Completed:
    a hang-up; Kallglot never took it (busy, failed, no answer): the fallback."""
    form = texml_form()
    call_id = call_id_of(form)
    svc = services()
    dial_status = form.get("DialCallStatus", "")
    completed = dial_status in ("completed", "answered")
    try:
        svc.lifecycle.record_event(CARRIER, call_id, "dial-status", {
            "status": dial_status, "sip_response": form.get("DialSipResponseCode", "")[:8]})
        # Clean either way: the carrier says the dial is over, and a refused dial is not a lost caller to hold for.
        svc.lifecycle.leg_ended(CARRIER, call_id, f"dial_{dial_status or 'unknown'}"[:40], clean=True)
        profile = svc.profiles.for_number(svc.lifecycle.call_record(CARRIER, call_id).get("to", form.get("To", "")))
    except redis.RedisError as exc:
        log.error("telnyx texml call=%s dial status %s not recorded: %s", call_id, dial_status, exc)
        return xml(fallback(NumberProfile()))
    if completed or form.get("CallStatus", "") in TERMINAL_CALL_STATUSES:
        root = ET.Element("Response")
        ET.SubElement(root, "Hangup")
        return xml(root)
    log.warning("telnyx texml call=%s SIP dial to Kallglot ended %s: fallback", call_id, dial_status)
    return xml(fallback(profile))


@bp.post("/texml/fallback")
def texml_fallback() -> Response:
    """The TeXML application's failover URL (Telnyx requests it when the voice webhook fails: a worker killed
    mid-request, a deploy): the apology and a hang-up, without touching Kallglot or Redis — never dead air."""
    form = texml_form()
    log.error("telnyx texml call=%s failover URL used", call_id_of(form))
    return xml(say_and_hang_up(ET.Element("Response"), UNAVAILABLE_MESSAGE))


@bp.post("/texml/status")
def texml_status() -> tuple[str, int]:
    """Call status and ``<Stream statusCallback>`` callbacks: record them; a final call status ends the leg.
    Answers 200 (Telnyx's TeXML callback pages require it; any other status is re-sent to the failover URL).

    A stream's end decides nothing here (as on Twilio): the relay records why it closed, and with the caller
    still on Telnyx follows the ``<Redirect>`` after ``<Connect>``, which restores the stream — a
    ``stream-stopped`` that ended the leg first would end the session under a caller about to be restored.
    The call's own final status (or the leg's heartbeat) ends the leg when the caller is gone."""
    form = texml_form()
    call_id = call_id_of(form)
    lifecycle = services().lifecycle
    stream_event = form.get("StreamEvent", "")
    try:
        if stream_event:
            lifecycle.record_event(CARRIER, call_id, "stream-status", {
                "event": stream_event, "stream_sid": form.get("StreamSid", ""),
                "error": form.get("StreamError", "")[:200]})
            return "", 200
        status, cause = form.get("CallStatus", ""), form.get("HangupCause", "")
        lifecycle.record_event(CARRIER, call_id, "call-status", {
            "status": status, "sequence": form.get("SequenceNumber", ""), "duration": form.get("CallDuration", ""),
            "hangup_cause": cause, "hangup_source": form.get("HangupSource", "")})
        if status in TERMINAL_CALL_STATUSES:
            lifecycle.leg_ended(CARRIER, call_id, f"call_{status}" + (f"_{cause}" if cause else ""),
                                clean=cause in CLEAN_HANGUP_CAUSES or (not cause and status == "completed"))
    except redis.RedisError as exc:
        log.error("telnyx texml call=%s status %s not recorded: %s", call_id, stream_event or "call", exc)
        return "state store unavailable", 503
    return "", 200  # Telnyx's callback pages: anything but 200 is retried at the failover URL
