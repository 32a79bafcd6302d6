"""Starting an inbound customer leg, the same for every carrier: re-attach a returning caller to their held
session, or create the session (recoverably, see :meth:`SessionLifecycle.create_session`) and register the leg."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from app.calls.leg_spec import LegSpec
from app.calls.reattach import Reattach, caller_id_withheld, reattach_decision
from app.extensions import Services
from app.kallglot.client import KallglotError, KallglotNotFound, KallglotSession, customer_and_agent
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.kallglot.telephony import grant_fresh
from app.profiles import TRANSPORT_DIRECT, TRANSPORT_SIP, NumberProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedLeg:
    """The session a new leg streams into (with a current stream grant) and the profile that applies."""

    session: KallglotSession
    profile: NumberProfile
    reattached: bool


def live_session(svc: Services, session_id: str) -> KallglotSession | None:
    """The session with a current stream grant, or None if it is over (a GET refreshes the grant: assumption 4
    in :mod:`app.kallglot.stream_protocol`)."""
    try:
        session = svc.kallglot.get_session(session_id)
    except KallglotNotFound:
        return None
    return session if session.status != "ended" and session.stream else None


def reattach_pin_wanted(svc: Services, *, to_number: str, from_number: str) -> bool:
    """True when this call may re-attach to a held session only after keying in the number's PIN."""
    held_id = svc.lifecycle.held_session_for(to_number, from_number)
    policy = svc.profiles.for_number(to_number).reattach
    return reattach_decision(policy, from_number, held_id) is Reattach.ASK_PIN


def start_inbound_leg(svc: Services, *, carrier: str, call_id: str, to_number: str, from_number: str,
                      metadata: dict[str, str], reattach_pin: str | None = None) -> StartedLeg:
    """Bridge an incoming call; raises :class:`KallglotError` or ``redis.RedisError`` (the caller then plays
    the fallback). Idempotent per call: a retried webhook replays the same session (the key is the call ID).

    A returning caller re-attaches to their held session only as the number's ``reattach`` policy allows
    (:mod:`app.calls.reattach`): never when withheld, and under ``caller_id_pin`` only with ``reattach_pin``.
    """
    profile = svc.profiles.for_number(to_number)
    leg = LegSpec.from_profile(profile, carrier=carrier, call_id=call_id, speaker=SPEAKER_CUSTOMER,
                               from_number=from_number, to_number=to_number,
                               default_reconnect_window_seconds=svc.settings.reconnect_window_seconds)
    held_id = svc.lifecycle.held_session_for(to_number, from_number)
    decision = reattach_decision(profile.reattach, from_number, held_id)
    if decision is Reattach.ASK_PIN:
        decision = Reattach.REATTACH if profile.reattach_pin_matches(reattach_pin or "") else Reattach.NEW_SESSION
        log.warning("%s call=%s re-attach PIN %s for held session=%s", carrier, call_id,
                    "accepted" if decision is Reattach.REATTACH else "refused", held_id)
    elif held_id and decision is Reattach.NEW_SESSION:
        log.warning("%s call=%s not re-attached to held session=%s (policy %s, caller ID %s)", carrier, call_id,
                    held_id, profile.reattach, "withheld" if caller_id_withheld(from_number) else "given")
    held = live_session(svc, held_id) if held_id and decision is Reattach.REATTACH else None
    if held and svc.lifecycle.register_leg(leg, session_id=held.id, reattach_from=(to_number, from_number)):
        log.info("%s call=%s session=%s re-attached a returning caller", carrier, call_id, held.id)
        return StartedLeg(held, profile, reattached=True)
    session = svc.lifecycle.create_session(
        carrier=carrier, call_id=call_id, idempotency_key=f"{carrier}-call-{call_id}",
        mode=profile.mode, source_language=profile.source_language or None,
        target_language=profile.target_language or None, phone_number=to_number or None,
        metadata={**profile.metadata, **metadata, "from_number": from_number, "to_number": to_number},
        **({"sip_routing": True} if profile.transport == TRANSPORT_SIP else {}),
        **({"participants": customer_and_agent(profile.source_language, profile.target_language)}
           if profile.has_agent else {}))
    if session.stream is None and profile.transport != TRANSPORT_SIP:
        raise KallglotError("session has no stream", code="no_stream")
    if profile.transport == TRANSPORT_DIRECT and not grant_fresh(session.stream):
        # A replayed create (a retried webhook) answers with the first token, which may be near its 5 minutes:
        # the carrier connects with it, so fetch a fresh one (assumption 4).
        session = live_session(svc, session.id) or session
    if not svc.lifecycle.register_leg(leg, session_id=session.id):
        raise KallglotError("the call's session has already ended", code="session_ended")
    return StartedLeg(session, profile, reattached=False)
