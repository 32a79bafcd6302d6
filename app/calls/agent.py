"""The agent leg: once a customer's stream is up, offer the call to browser agents or dial the profile's agent
number into the same session; when no browser agent takes it in time, dial the agent number (or the fallback)."""
from __future__ import annotations

import logging

import redis

from app.calls import events as live_events
from app.calls.agent_queue import BROWSER_LEG, AgentQueue
from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError
from app.extensions import Services
from app.kallglot.stream_protocol import SPEAKER_AGENT

log = logging.getLogger(__name__)


def dial_agent_if_configured(svc: Services, session_id: str, carrier: str, customer_call_id: str = "") -> str | None:
    """Once per session: offer the call to browser agents (a profile with ``browser_agents``), or dial the
    profile's agent number through ``carrier``; returns the dialled agent's call ID.

    Runs off the relay's hot path (a background thread). Failures are logged and recorded; the customer
    stays on the session (an ``ai_agent`` profile needs no human agent anyway).
    """
    lifecycle = svc.lifecycle
    try:
        session = lifecycle.session_record(session_id)
        to_number = session.get("to", "")
        profile = svc.profiles.for_number(to_number)
        if not profile.has_agent or not lifecycle.claim_agent_dial(session_id):
            return None
        if profile.browser_agents:
            AgentQueue(svc.redis, svc.keys).offer(
                session_id, carrier=carrier, call_id=customer_call_id, to_number=to_number,
                from_number=session.get("from", ""), source_language=profile.source_language,
                target_language=profile.target_language, wait_seconds=profile.browser_agent_wait_seconds)
            log.info("session=%s offered to browser agents for %d s", session_id, profile.browser_agent_wait_seconds)
            return None
    except redis.RedisError as exc:
        log.error("session=%s agent leg not dialled: %s", session_id, exc)
        return None
    return dial_into_session(svc, session_id, carrier, profile.agent_number)


def dial_into_session(svc: Services, session_id: str, carrier: str, number: str) -> str | None:
    """Dial ``number`` through ``carrier`` as the session's agent leg; returns its call ID (None: not dialled)."""
    lifecycle = svc.lifecycle
    try:
        session = lifecycle.session_record(session_id)
        to_number = session.get("to", "")
        refused = svc.profiles.destination_problem(number) if svc.profiles.destination_problem else ""
        if refused:  # a profile stored before the dialling rules (or under others): never dial it anyway
            log.warning("session=%s agent leg REFUSED: %s (%s)", session_id, number, refused)
            return None
        control = svc.carrier_controls[carrier]
        call_id = control.dial(to=number, from_=to_number, session_id=session_id, speaker=SPEAKER_AGENT)
        leg = LegSpec.joining(session, carrier=carrier, call_id=call_id, speaker=SPEAKER_AGENT,
                              from_number=to_number, to_number=number,
                              default_mode=svc.profiles.for_number(to_number).mode)
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


def no_browser_agent(svc: Services, session_id: str, offer: dict[str, str]) -> str | None:
    """Nobody took the call in the browser within the profile's wait: dial the agent number, else the fallback
    number, into the session, and say so on the live console (a ``fallback`` leg event). With neither, the
    customer stays with Kallglot, as on a profile without an agent."""
    try:
        session = svc.lifecycle.session_record(session_id)
        if not session or session.get("status") == "ended":
            return None
        profile = svc.profiles.for_number(session.get("to", ""))
        number, which = ((profile.agent_number, "agent number") if profile.agent_number
                         else (profile.fallback_number, "fallback number") if profile.fallback_number
                         else ("", "no agent or fallback number"))
        carrier = offer.get("carrier") or session.get("carrier", "")
        live_events.announce_fallback(svc.redis, svc.keys, session_id, carrier=carrier,
                                      call_id=offer.get("call_id", ""), speaker=SPEAKER_AGENT,
                                      why=f"no browser agent took the call in {profile.browser_agent_wait_seconds} s: "
                                          f"{which}")
    except redis.RedisError as exc:
        log.error("session=%s no browser agent, and Redis failed: %s", session_id, exc)
        return None
    log.warning("session=%s no browser agent took the call: %s", session_id, which)
    return dial_into_session(svc, session_id, carrier, number) if number else None


def expire_agent_waits(svc: Services) -> int:
    """A reaper pass: every call whose browser-agent wait ran out goes to :func:`no_browser_agent`."""
    return AgentQueue(svc.redis, svc.keys).expire_due(lambda sid, offer: no_browser_agent(svc, sid, offer))


def browser_leg_lost(svc: Services, carrier: str, call_id: str) -> bool:
    """The reaper gave up a leg whose heartbeat ran out: when it is a browser agent's (its worker died, or its
    page never opened the media socket after Take), offer the call again. True when offered."""
    if carrier != BROWSER_LEG:
        return False
    try:
        call = svc.lifecycle.call_record(carrier, call_id)
    except redis.RedisError as exc:
        log.error("browser agent leg %s lost, not offered again: %s", call_id, exc)
        return False
    # The leg's heartbeat may also have gone because it ended otherwise meanwhile (hung up, given back).
    if call.get("state") != "ended" or call.get("end_reason") != "heartbeat_lost":
        return False
    return offer_again(svc, call.get("session_id", ""), call_id)


def offer_again(svc: Services, session_id: str, leg_id: str, reason: str = "agent_lost") -> bool:
    """A browser agent's leg was lost (``agent_lost``) or given back (``agent_gave_back``) while the customer is
    still on: offer the call to agents again for the profile's wait (the same agent may rejoin by reopening the
    call's page); then the agent number or fallback. True when offered."""
    try:
        session = svc.lifecycle.session_record(session_id)
        if not customer_on_call(svc, session_id):
            return False
        queue = AgentQueue(svc.redis, svc.keys)
        first = queue.offer_record(session_id)
        if first.get("state") == "waiting":  # offered again already (by another path): keep its deadline
            return True
        profile = svc.profiles.for_number(session.get("to", ""))
        queue.offer(session_id, carrier=first.get("carrier") or session.get("carrier", ""),
                    call_id=first.get("call_id", ""), to_number=session.get("to", ""),
                    from_number=session.get("from", ""), source_language=profile.source_language,
                    target_language=profile.target_language, wait_seconds=profile.browser_agent_wait_seconds,
                    reason=reason)
        log.warning("session=%s browser agent leg %s %s: offered to agents again", session_id, leg_id, reason)
    except redis.RedisError as exc:
        log.error("session=%s browser agent leg %s %s, not offered again: %s", session_id, leg_id, reason, exc)
        return False
    return True


def customer_on_call(svc: Services, session_id: str) -> bool:
    """Whether the session still runs with its customer on the line (a live phone leg): only such a call is worth
    an agent. Raises :class:`redis.RedisError`."""
    if svc.lifecycle.session_record(session_id).get("status") == "ended":
        return False
    return any(state == "live" and carrier != BROWSER_LEG
               for (carrier, _), state in svc.lifecycle.session_legs(session_id).items())


def other_agent_on_call(svc: Services, session_id: str, leg_id: str) -> bool:
    """Whether an agent leg other than the browser leg ``leg_id`` is live in the session (another browser agent,
    or the agent number dialled when the wait ran out). Raises :class:`redis.RedisError`."""
    return any(state == "live" and (carrier, call_id) != (BROWSER_LEG, leg_id)
               and svc.lifecycle.call_record(carrier, call_id).get("speaker") == SPEAKER_AGENT
               for (carrier, call_id), state in svc.lifecycle.session_legs(session_id).items())
