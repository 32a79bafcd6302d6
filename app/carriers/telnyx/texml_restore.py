"""TeXML: the stream ended while the caller is still on — restore it, or say why not (never dead air).

Telnyx's TeXML ``<Connect>`` documents no ``action``, but ``<Redirect>`` is a documented verb, and the verbs after
``<Connect>`` run only once the stream is over with the call still up. So the answer ends with a ``<Redirect>`` to
``/telnyx/texml/stream-ended``, which decides as Twilio's ``<Connect action>`` does
(:func:`app.carriers.twilio.webhooks.connect_action`): a stream lost without an end of ours (the relay's worker
was killed, a deploy drained it) is connected again to the same session, at most
:data:`~app.carriers.telnyx.streams.MAX_STREAM_RESTARTS` times; a session Kallglot ended gets the goodbye; a
Kallglot failure, an undecodable codec or too many restores get the profile's fallback (its message, then
``<Dial>`` its fallback number or hang up). A ``direct`` stream (carrier straight to Kallglot) ends the same way
and is restored straight to Kallglot with a fresh stream token (5-minute tokens), as Twilio's is.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

import redis
from flask import Response

from app.calls.events import announce_fallback
from app.calls.legs import live_session
from app.calls.lifecycle import LEG_ENDED
from app.calls.prompts import SESSION_OVER_MESSAGE
from app.calls.reasons import EndReason, kallglot_failed
from app.carriers.contract import TERMINAL_CALL_STATUSES
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.media import UNSUPPORTED_CODEC
from app.carriers.telnyx.session import seal_relay_token
from app.carriers.telnyx.streams import MAX_STREAM_RESTARTS
from app.carriers.telnyx.texml import (
    call_id_of, connect_direct, connect_stream, fallback, say_and_hang_up, texml_form, xml,
)
from app.extensions import services
from app.kallglot.client import KallglotError
from app.kallglot.telephony import direct_parameters
from app.profiles import TRANSPORT_DIRECT, TRANSPORT_RELAY, NumberProfile

log = logging.getLogger(__name__)


@bp.post("/texml/stream-ended")
def texml_stream_ended() -> Response:
    """The ``<Redirect>`` after ``<Connect>``: restore the stream to the same session, or say why not."""
    form = texml_form()
    call_id = call_id_of(form)
    svc = services()
    try:
        call = svc.lifecycle.call_record(CARRIER, call_id)
        reason = call.get("end_reason", "") if call.get("state") == LEG_ENDED else ""
        status = form.get("CallStatus", "")
        if status in TERMINAL_CALL_STATUSES or reason.startswith("call_"):
            # The call itself is over: nothing to restore, and re-attaching would revive a leg nobody is on.
            if call.get("session_id") and not reason:
                svc.lifecycle.leg_ended(CARRIER, call_id, f"call_{status}", clean=True)
            return xml(ET.Element("Response"))
        profile = svc.profiles.for_number(call.get("to") or form.get("To", ""))
        session_id = call.get("session_id")
        if not session_id or reason == EndReason.RELAY_KALLGLOT_ENDED:
            svc.lifecycle.leg_ended(CARRIER, call_id, EndReason.STREAM_CLOSED)
            return xml(say_and_hang_up(ET.Element("Response"), SESSION_OVER_MESSAGE))
        if kallglot_failed(reason) or reason == UNSUPPORTED_CODEC \
                or int(call.get("stream_restarts") or 0) >= MAX_STREAM_RESTARTS:
            svc.lifecycle.leg_ended(CARRIER, call_id, reason or EndReason.STREAM_RESTARTS_EXHAUSTED, clean=False)
            announce_fallback(svc.redis, svc.keys, session_id, carrier=CARRIER, call_id=call_id,
                              speaker=call.get("speaker", ""), why=reason or EndReason.STREAM_RESTARTS_EXHAUSTED.value)
            return xml(fallback(profile))
        session = live_session(svc, session_id)
        transport = call.get("transport") or TRANSPORT_RELAY
        if session is None and transport == TRANSPORT_DIRECT:
            # Kallglot ended the session under its own stream (no relay saw it go): recorded, so nobody calls end.
            svc.lifecycle.ended_by_kallglot(session_id, "stream_closed")
        if session is None or session.stream is None or not svc.lifecycle.reattach_leg(CARRIER, call_id):
            svc.lifecycle.leg_ended(CARRIER, call_id, EndReason.STREAM_CLOSED)
            return xml(say_and_hang_up(ET.Element("Response"), SESSION_OVER_MESSAGE))
        log.info("telnyx texml call=%s session=%s restoring the %s media stream (%s)", call_id, session_id,
                 transport, reason or ("stream closed" if transport == TRANSPORT_DIRECT else "relay gone"))
        if transport == TRANSPORT_DIRECT:  # straight to Kallglot again, with the token the GET above just gave
            return xml(connect_direct(svc.settings, stream_url=session.stream.url,
                                      parameters=direct_parameters(session_id, session.stream)))
        # The stream is over (Telnyx runs the verbs after <Connect> only then): a killed worker's lease must not
        # refuse the restored stream.
        svc.relay_guard.forget_leg(CARRIER, call_id)
        token = seal_relay_token(svc, session_id, call_id, session.stream)
    except (KallglotError, redis.RedisError) as exc:
        log.error("telnyx texml call=%s stream could not be restored, fallback: %s", call_id, exc)
        return xml(fallback(NumberProfile()))
    return xml(connect_stream(svc.settings, session_id=session_id, relay_token=token))
