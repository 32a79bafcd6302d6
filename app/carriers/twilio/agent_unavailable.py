"""An agent leg we dialled on Twilio did not answer, was busy or failed: the customer is told, not hung up.

Twilio can only say something to a caller through TwiML, so the customer's live call is redirected
(``calls(sid).update(twiml=…)``): Twilio stops the customer's stream (its relay sees ``stop``), says the
profile's "agent unavailable" message in its language, then either ``<Dial>``s the profile's
``fallback_number`` (the translation session ends with that stream, as a clean end of its last leg) or connects
a new stream to the same session, so the call goes on with Kallglot alone. For the second, the customer's leg is
re-attached *before* the redirect: that clears the leg's current stream, so the ``stop`` of the stream being
replaced is a stale end that changes nothing (see invariant I2 in :mod:`app.calls.scripts`). That stream was
replaced, not lost: it is not one of the call's stream restores (``<Connect action>`` still restores 3 losses).
"""
from __future__ import annotations

import logging

import redis

from app.calls.legs import live_session
from app.calls.lifecycle import LEG_LIVE
from app.carriers.contract import CarrierError
from app.carriers.twilio import CARRIER, twiml
from app.carriers.twilio.control import TwilioControl
from app.extensions import Services
from app.kallglot.client import KallglotError
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER

log = logging.getLogger(__name__)


def tell_customers_agent_unavailable(svc: Services, session_id: str, *, agent_call: str, status: str) -> int:
    """Tell each live Twilio customer leg of ``session_id`` that the agent is unavailable (then forward it or
    put it back on the session); returns how many were told. Failures are logged: the customer's call goes on
    as it was."""
    control = svc.carrier_controls.get(CARRIER)
    if not isinstance(control, TwilioControl):
        return 0
    lifecycle = svc.lifecycle
    told = 0
    try:
        session = lifecycle.session_record(session_id)
        profile = svc.profiles.for_number(session.get("to", ""))
        customers = [call_id for (carrier, call_id), state in lifecycle.session_legs(session_id).items()
                     if carrier == CARRIER and state == LEG_LIVE
                     and lifecycle.call_record(CARRIER, call_id).get("speaker") == SPEAKER_CUSTOMER]
        for call_id in customers:
            if profile.fallback_number:
                answer = twiml.agent_unavailable(svc.settings, profile)
            else:
                kallglot_session = live_session(svc, session_id)
                if kallglot_session is None or kallglot_session.stream is None \
                        or not lifecycle.reattach_leg(CARRIER, call_id, restoring_lost_stream=False):
                    continue  # the session is over: the relay tells the caller as it closes
                svc.relay_guard.forget_leg(CARRIER, call_id)  # the new stream must find the leg free
                token = svc.relay_tokens.seal_stream(kallglot_session.stream, session_id=session_id, carrier=CARRIER,
                                                     call_id=call_id, speaker=SPEAKER_CUSTOMER)
                answer = twiml.agent_unavailable(svc.settings, profile, session_id=session_id, relay_token=token)
            log.info("twilio session=%s agent call=%s %s: telling customer call=%s%s", session_id, agent_call,
                     status, call_id, f", then forwarding to {profile.fallback_number}" if profile.fallback_number
                     else "; the session goes on")
            try:
                control.redirect(call_id, answer)
                told += 1
            except CarrierError as exc:
                log.error("twilio call=%s could not be told the agent is unavailable: %s", call_id, exc)
    except (redis.RedisError, KallglotError) as exc:
        log.error("twilio session=%s agent unavailable, customer not told: %s", session_id, exc)
    return told
