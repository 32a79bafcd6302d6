"""The agent leg: once a customer's stream is up, dial the number profile's agent into the same session."""
from __future__ import annotations

import logging

import redis

from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError
from app.extensions import Services
from app.kallglot.stream_protocol import SPEAKER_AGENT

log = logging.getLogger(__name__)


def dial_agent_if_configured(svc: Services, session_id: str, carrier: str) -> str | None:
    """Dial the profile's agent number through ``carrier`` once per session; returns the agent's call ID.

    Runs off the relay's hot path (a background thread). Failures are logged and recorded; the customer
    stays on the session (an ``ai_agent`` profile needs no human agent anyway).
    """
    lifecycle = svc.lifecycle
    try:
        session = lifecycle.session_record(session_id)
        to_number = session.get("to", "")
        profile = svc.profiles.for_number(to_number)
        if not profile.agent_number or not lifecycle.claim_agent_dial(session_id):
            return None
        refused = svc.profiles.destination_problem(profile.agent_number) if svc.profiles.destination_problem else ""
        if refused:  # a profile stored before the dialling rules (or under others): never dial it anyway
            log.warning("session=%s agent leg REFUSED: %s (%s)", session_id, profile.agent_number, refused)
            return None
        control = svc.carrier_controls[carrier]
        call_id = control.dial(to=profile.agent_number, from_=to_number, session_id=session_id,
                               speaker=SPEAKER_AGENT)
        leg = LegSpec.joining(session, carrier=carrier, call_id=call_id, speaker=SPEAKER_AGENT,
                              from_number=to_number, to_number=profile.agent_number, default_mode=profile.mode)
        if not lifecycle.register_leg(leg, session_id=session_id):
            # The customer hung up (and the session ended) while the agent's phone was ringing.
            log.info("session=%s ended before the agent answered: hanging up %s call=%s", session_id, carrier,
                     call_id)
            control.hang_up(call_id)
            return None
    except (redis.RedisError, KeyError) as exc:
        log.error("session=%s agent leg not dialled: %s", session_id, exc)
        return None
    except CarrierError as exc:  # the carrier's REST API failed: record it, keep the customer's call going
        log.error("session=%s dialling the agent through %s failed: %s", session_id, carrier, exc)
        return None
    log.info("session=%s agent leg %s call=%s dialled", session_id, carrier, call_id)
    return call_id
