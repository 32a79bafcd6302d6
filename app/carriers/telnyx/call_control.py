"""Call Control (Voice API v2) webhooks: JSON events, Ed25519-verified, handled once each.

Telnyx delivers at least once, possibly concurrently and out of order, so every event is de-duplicated on
``data.id`` (Redis ``SET NX EX``) and each handler tolerates its predecessors being late or missing. Commands
go out through the telnyx SDK (:mod:`app.carriers.telnyx.control`).

An incoming call: ``call.initiated`` → create the session, ``answer`` (``client_state`` names the session) →
``call.answered`` → the profile's greeting (``speak``), if any → ``start_streaming`` with the relay token
(:mod:`app.carriers.telnyx.streams`). When Kallglot (or Redis) cannot take the call we still answer and let the
events drive the fallback: ``call.answered`` → ``speak`` the profile's message → ``call.speak.ended`` →
``transfer`` to its ``fallback_number`` or ``hangup``, so the caller hears why instead of ringing or silence.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from flask import jsonify
from flask.typing import ResponseReturnValue

from app.extensions import Services, services
from app.kallglot.client import KallglotError
from app.calls.lifecycle import LEG_ENDED, LEG_LIVE
from app.kallglot.stream_protocol import SPEAKER_AGENT, SPEAKER_CUSTOMER
from app.redis_keys import SEEN_TTL_SECONDS, as_text, first_seen
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.control import (
    GOODBYE_AGENT_UNAVAILABLE, GOODBYE_KEY, GOODBYE_UNAVAILABLE, GREETING_KEY, SIP_FOR_KEY, TO_KEY, TelnyxControl,
    telnyx_control,
)
from app.carriers.telnyx.events import CallEvent, command, parse_event, profile_for, record, say_goodbye
from app.carriers.telnyx.session import start_leg
from app.carriers.telnyx.streams import streaming_failed, streaming_stopped, stream_leg
from app.carriers.telnyx.texml import CLEAN_HANGUP_CAUSES

log = logging.getLogger(__name__)

#: An event is marked "being handled" for this long before it is marked handled: a worker killed mid-handler
#: leaves only this lease behind, so Telnyx's redelivery after it lapses is handled instead of dropped as a
#: duplicate. Longer than a handler's worst case (a 3 s relay settle plus two 5 s Telnyx commands).
HANDLING_LEASE_SECONDS = 20
HANDLING, HANDLED = "handling", "handled"


@bp.post("/call-control")
def call_control_webhook() -> ResponseReturnValue:
    """Handle one Call Control event exactly once; duplicates of a handled event get 200 and do nothing, a
    redelivery of one still being handled gets 503 (Telnyx delivers it again; if the worker handling it died,
    the lease has lapsed by then and it is handled).

    Redis being down does not leave the caller ringing: the handlers answer and speak the fallback without it
    (command_ids derived from the event id make Telnyx drop repeats of commands we could not de-duplicate).
    """
    event = parse_event()
    svc = services()
    seen = svc.keys.seen(CARRIER, event.id)
    try:
        first = first_seen(svc.redis, seen, HANDLING, ttl_seconds=HANDLING_LEASE_SECONDS)
        handled = first or as_text(svc.redis.get(seen)) == HANDLED
    except redis.RedisError as exc:
        log.error("telnyx event %s not de-duplicated: %s", event.id, exc)
        first = handled = True
    if not first:
        if not handled:
            log.info("telnyx call=%s %s %s redelivered while being handled: try later", event.call_id,
                     event.event_type, event.id)
            return jsonify(status="being handled"), 503
        return jsonify(status="duplicate")
    try:
        record(svc, event)
    except redis.RedisError as exc:
        log.error("telnyx call=%s %s not recorded: %s", event.call_id, event.event_type, exc)
    try:
        HANDLERS.get(event.event_type, _nothing_more)(svc, telnyx_control(), event)
    except redis.RedisError as exc:
        log.error("telnyx call=%s %s not handled: %s", event.call_id, event.event_type, exc)
        try:
            svc.redis.delete(seen)  # let Telnyx's retry be handled
        except redis.RedisError:
            pass
        return jsonify(status="state store unavailable"), 503
    try:
        svc.redis.set(seen, HANDLED, ex=SEEN_TTL_SECONDS)
    except redis.RedisError:
        pass  # the lease lapses: a redelivery would be handled again, and command_ids make that harmless
    return jsonify(status="ok")


def _nothing_more(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """Recorded is all: ``streaming.started``, ``call.speak.started``, and the rest."""


def _hung_up_already(svc: Services, call_id: str) -> bool:
    try:
        return any(e.get("event") == "call.hangup" for e in svc.lifecycle.events(CARRIER, call_id))
    except redis.RedisError:
        return False  # cannot tell: answering a call that is gone fails harmlessly


def _call_initiated(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    if event.payload.get("direction") != "incoming":
        return  # legs we dial are streamed once answered (see _call_answered)
    if _hung_up_already(svc, event.call_id):
        log.info("telnyx call=%s hung up before it was handled; not answering", event.call_id)
        return
    payload = event.payload
    to_number, from_number = str(payload.get("to") or ""), str(payload.get("from") or "")
    metadata = {"telnyx_call_control_id": event.call_id, "telnyx_call_session_id": payload.get("call_session_id"),
                "telnyx_call_leg_id": payload.get("call_leg_id"), "telnyx_connection_id": payload.get("connection_id")}
    try:
        leg, _ = start_leg(svc, call_id=event.call_id, to_number=to_number, from_number=from_number,
                           metadata={k: str(v) for k, v in metadata.items() if v})  # the token is sealed later
    except (KallglotError, redis.RedisError) as exc:
        log.error("telnyx call=%s to=%s could not start a session: %s", event.call_id, to_number, exc)
        command(event, "answer (to apologise)", lambda: control.answer_to_say_goodbye(
            event.call_id, GOODBYE_UNAVAILABLE, to_number=to_number, command_id=event.command_id("answer")))
        return
    answered = command(event, "answer", lambda: control.answer_for_session(
        event.call_id, session_id=leg.session.id, speaker=SPEAKER_CUSTOMER,
        greeting=bool(leg.profile.greeting) and not leg.reattached,  # a returning caller is not greeted twice
        command_id=event.command_id("answer")))
    if answered:
        log.info("telnyx call=%s session=%s to=%s mode=%s answered", event.call_id, leg.session.id, to_number,
                 leg.profile.mode)
    else:  # the call is gone (or Telnyx refuses it): nothing will stream
        svc.lifecycle.leg_ended(CARRIER, event.call_id, "answer_failed", clean=False)


def _call_answered(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """Say a pending goodbye or greeting, or stream the leg into the session named in ``client_state``.

    ``call.answered`` carries no ``direction`` (the SDK's ``CallAnswered`` payload has none), so our own
    ``client_state`` decides: the inbound ``answer`` and the agent ``dial`` both put the session id (``s``) and
    speaker (``p``) there.
    """
    state = event.state
    if GOODBYE_KEY in state:
        say_goodbye(svc, control, event, state[GOODBYE_KEY], state.get(TO_KEY) or str(event.payload.get("to") or ""))
    elif state.get("s") and state.get(GREETING_KEY):
        profile = profile_for(svc, str(event.payload.get("to") or ""))
        next_state = {"s": state["s"], "p": state.get("p") or SPEAKER_CUSTOMER}
        if not profile.greeting or not command(event, "speak (greeting)", lambda: control.say(
                event.call_id, profile.greeting, profile.greeting_language or "en-US", state=next_state,
                command_id=event.command_id("greeting"))):
            stream_leg(svc, control, event, next_state["s"], next_state["p"])
    elif state.get("s"):
        stream_leg(svc, control, event, state["s"], state.get("p") or SPEAKER_CUSTOMER)


def _speak_ended(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """A goodbye was said: forward to the profile's fallback number, or hang up (the agent-unavailable notice:
    forward, or let the session go on). A greeting: start streaming."""
    state = event.state
    if GOODBYE_KEY in state:
        to_number, goodbye = state.get(TO_KEY, ""), state[GOODBYE_KEY]
        forwards = goodbye in (GOODBYE_UNAVAILABLE, GOODBYE_AGENT_UNAVAILABLE)
        fallback_number = profile_for(svc, to_number).fallback_number if forwards else ""
        if fallback_number and command(event, "transfer (fallback)", lambda: control.transfer(
                event.call_id, fallback_number, from_=to_number, command_id=event.command_id("transfer"))):
            return
        if goodbye != GOODBYE_AGENT_UNAVAILABLE:
            command(event, "hangup", lambda: control.hang_up(event.call_id, event.command_id("hangup")))
    elif state.get("s"):
        stream_leg(svc, control, event, state["s"], state.get("p") or SPEAKER_CUSTOMER)


def _call_hangup(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """The leg is over. An agent leg that never answered (no answer, busy, failed) hung up on nobody: it ends as
    a loss — so the lifecycle does not hang up the customer — and the customer is told (then forwarded to the
    profile's ``fallback_number``, if any, or stays with the session)."""
    cause = str(event.payload.get("hangup_cause") or "unspecified")
    if SIP_FOR_KEY in event.state:
        _sip_leg_hung_up(svc, control, event, event.state[SIP_FOR_KEY])
        return
    call = svc.lifecycle.call_record(CARRIER, event.call_id)
    never_answered = call.get("speaker") == SPEAKER_AGENT and not any(
        e.get("event") == "call.answered" for e in svc.lifecycle.events(CARRIER, event.call_id))
    svc.lifecycle.leg_ended(CARRIER, event.call_id, f"hangup_{cause}",
                            clean=cause in CLEAN_HANGUP_CAUSES and not never_answered)
    if never_answered and call.get("session_id"):
        _tell_customer_agent_unavailable(svc, control, event, call["session_id"])


def _sip_leg_hung_up(svc: Services, control: TelnyxControl, event: CallEvent, caller_id: str) -> None:
    """The leg a ``sip`` transfer created hung up. Answered, it was the call itself: Telnyx hangs up the caller
    too, whose ``call.hangup`` ends the leg. Never answered (Kallglot refused or did not pick up): the caller is
    still on the line, so their leg ends and they hear the fallback instead of silence."""
    if any(e.get("event") == "call.answered" for e in svc.lifecycle.events(CARRIER, event.call_id)):
        return
    call = svc.lifecycle.call_record(CARRIER, caller_id)
    if not call.get("session_id") or call.get("state") == LEG_ENDED:
        return
    log.warning("telnyx call=%s SIP transfer to Kallglot failed (%s): fallback", caller_id,
                event.payload.get("hangup_cause"))
    svc.lifecycle.leg_ended(CARRIER, caller_id, "sip_transfer_failed", clean=True)  # refused: nothing to hold for
    to_number = call.get("to", "")
    command(event, "speak (sip transfer failed)", lambda: control.say_goodbye(
        caller_id, GOODBYE_UNAVAILABLE, profile_for(svc, to_number), to_number=to_number,
        command_id=event.command_id(f"sip-failed:{caller_id}")))


def _tell_customer_agent_unavailable(svc: Services, control: TelnyxControl, event: CallEvent,
                                     session_id: str) -> None:
    to_number = svc.lifecycle.session_record(session_id).get("to", "")
    profile = profile_for(svc, to_number)
    for (carrier, call_id), state in svc.lifecycle.session_legs(session_id).items():
        if carrier != CARRIER or state != LEG_LIVE or \
                svc.lifecycle.call_record(CARRIER, call_id).get("speaker") != SPEAKER_CUSTOMER:
            continue
        log.info("telnyx session=%s agent call=%s unavailable (%s): telling customer call=%s", session_id,
                 event.call_id, event.payload.get("hangup_cause"), call_id)
        command(event, "speak (agent unavailable)", lambda: control.say_goodbye(
            call_id, GOODBYE_AGENT_UNAVAILABLE, profile, to_number=to_number,
            command_id=event.command_id(f"agent-unavailable:{call_id}")))


HANDLERS: dict[str, Callable[[Services, TelnyxControl, CallEvent], None]] = {
    "call.initiated": _call_initiated,
    "call.answered": _call_answered,
    "call.speak.ended": _speak_ended,
    "streaming.stopped": streaming_stopped,
    "streaming.failed": streaming_failed,
    "call.hangup": _call_hangup,
}
