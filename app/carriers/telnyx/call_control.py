"""Call Control (Voice API v2) webhooks: JSON events, Ed25519-verified, handled once each.

Telnyx delivers at least once, possibly concurrently and out of order, so every event is de-duplicated on
``data.id`` (Redis ``SET NX EX``) and each handler tolerates its predecessors being late or missing. Commands
go out through the telnyx SDK (:mod:`app.carriers.telnyx.control`).

When Kallglot cannot take the call we answer *without* streaming and let the events drive a goodbye:
``call.answered`` → ``speak`` → ``call.speak.ended`` → ``hangup`` (``client_state`` says which goodbye), so the
caller hears why instead of silence or a bare disconnect.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import telnyx
from flask import abort, jsonify, request
from flask.typing import ResponseReturnValue

from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError
from app.extensions import Services, services
from app.kallglot.client import KallglotError
from app.calls.lifecycle import LEG_LIVE
from app.redis_keys import first_seen
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.control import (
    GOODBYE_KEY, GOODBYE_SESSION_OVER, GOODBYE_UNAVAILABLE, TelnyxControl, decode_client_state, telnyx_control,
)
from app.carriers.telnyx.session import seal_relay_token, start_leg
from app.carriers.telnyx.texml import CALL_CONTROL_ID, CLEAN_HANGUP_CAUSES

log = logging.getLogger(__name__)

#: Payload fields worth keeping with a recorded event (ids, states, causes; never client_state or tokens).
RECORDED_FIELDS = ("direction", "state", "hangup_cause", "hangup_source", "sip_hangup_cause", "stream_id",
                   "failure_reason", "call_session_id", "call_leg_id")


@dataclass(frozen=True)
class CallEvent:
    """One Call Control webhook: ``data.id``, ``data.event_type`` and ``data.payload``."""

    id: str
    event_type: str
    occurred_at: str
    call_id: str
    payload: dict[str, Any]

    @property
    def state(self) -> dict[str, str]:
        """Our ``client_state`` echoed back (``{}`` when absent or not ours)."""
        return decode_client_state(self.payload.get("client_state"))

    def command_id(self, action: str) -> str:
        """A command_id unique to this event and action, identical when Telnyx redelivers the event."""
        return f"{self.id}:{action}"


def _parse_event() -> CallEvent:
    """The verified JSON body as a :class:`CallEvent`, or 400."""
    try:
        body = json.loads(request.get_data(as_text=True))
    except ValueError:
        abort(400, description="body is not JSON")
    data = body.get("data") if isinstance(body, dict) else None
    payload = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(payload, dict) or not isinstance(data.get("id"), str) or not data["id"] \
            or len(data["id"]) > 128 or not isinstance(data.get("event_type"), str):
        abort(400, description="not a Call Control event (data.id, data.event_type, data.payload)")
    call_id = payload.get("call_control_id")
    if not isinstance(call_id, str) or not CALL_CONTROL_ID.match(call_id):
        abort(400, description="payload.call_control_id missing or malformed")
    return CallEvent(id=data["id"], event_type=data["event_type"][:64], occurred_at=str(data.get("occurred_at", "")),
                     call_id=call_id, payload=payload)


@bp.post("/call-control")
def call_control_webhook() -> ResponseReturnValue:
    """Handle one Call Control event exactly once; duplicates get 200 and do nothing."""
    event = _parse_event()
    svc = services()
    seen = svc.keys.seen(CARRIER, event.id)
    try:
        first = first_seen(svc.redis, seen, event.event_type)
    except redis.RedisError as exc:
        # Without de-duplication, still act: command_ids derived from the event id make Telnyx drop repeats.
        log.error("telnyx event %s not de-duplicated: %s", event.id, exc)
        first = True
    if not first:
        return jsonify(status="duplicate")
    try:
        _record(svc, event)
        HANDLERS.get(event.event_type, _nothing_more)(svc, telnyx_control(), event)
    except redis.RedisError as exc:
        log.error("telnyx call=%s %s not handled: %s", event.call_id, event.event_type, exc)
        try:
            svc.redis.delete(seen)  # let Telnyx's retry be handled
        except redis.RedisError:
            pass
        return jsonify(status="state store unavailable"), 503
    return jsonify(status="ok")


def _record(svc: Services, event: CallEvent) -> None:
    fields = {name: str(event.payload[name]) for name in RECORDED_FIELDS if event.payload.get(name) is not None}
    svc.lifecycle.record_event(CARRIER, event.call_id, "call-control",
                               {"event": event.event_type, "id": event.id, "occurred_at": event.occurred_at,
                                **fields})


def _command(event: CallEvent, what: str, send: Callable[[], None]) -> bool:
    """Run one SDK command; a Telnyx failure is logged (the call's own events decide what happens next)."""
    try:
        send()
    except telnyx.APIError as exc:
        status = getattr(exc, "status_code", None)
        log.error("telnyx call=%s %s failed (%s): %s", event.call_id, what, status or "no response", exc.message)
        return False
    except CarrierError as exc:  # hang_up, the contract's own command, translates its SDK errors
        log.error("telnyx call=%s %s failed: %s", event.call_id, what, exc)
        return False
    return True


def _nothing_more(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """Recorded is all: ``streaming.started``/``stopped``, ``call.answered`` of a bridged call, and the rest."""


def _call_initiated(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    if event.payload.get("direction") != "incoming":
        return  # legs we dial are streamed once answered (see _call_answered)
    if any(e.get("event") == "call.hangup" for e in svc.lifecycle.events(CARRIER, event.call_id)):
        log.info("telnyx call=%s hung up before it was handled; not answering", event.call_id)
        return
    payload = event.payload
    to_number, from_number = str(payload.get("to") or ""), str(payload.get("from") or "")
    metadata = {"telnyx_call_control_id": event.call_id, "telnyx_call_session_id": payload.get("call_session_id"),
                "telnyx_call_leg_id": payload.get("call_leg_id"), "telnyx_connection_id": payload.get("connection_id")}
    try:
        leg, relay_token = start_leg(svc, call_id=event.call_id, to_number=to_number, from_number=from_number,
                                     metadata={k: str(v) for k, v in metadata.items() if v})
    except (KallglotError, redis.RedisError) as exc:
        log.error("telnyx call=%s to=%s could not start a session: %s", event.call_id, to_number, exc)
        _command(event, "answer (to apologise)", lambda: control.answer_to_say_goodbye(
            event.call_id, GOODBYE_UNAVAILABLE, command_id=event.command_id("answer")))
        return
    answered = _command(event, "answer", lambda: control.answer_and_stream(
        event.call_id, session_id=leg.session.id, relay_token=relay_token, command_id=event.command_id("answer")))
    if answered:
        log.info("telnyx call=%s session=%s to=%s mode=%s answered", event.call_id, leg.session.id, to_number,
                 leg.profile.mode)
    else:  # the call is gone (or Telnyx refuses it): nothing will stream
        svc.lifecycle.leg_ended(CARRIER, event.call_id, "answer_failed", clean=False)


def _call_answered(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    state = event.state
    if GOODBYE_KEY in state:
        _command(event, "speak", lambda: control.say_goodbye(event.call_id, state[GOODBYE_KEY],
                                                             command_id=event.command_id("speak")))
    elif event.payload.get("direction") == "outgoing" and state.get("s"):
        _stream_dialled_leg(svc, control, event, state["s"], state.get("p", ""))


def _stream_dialled_leg(svc: Services, control: TelnyxControl, event: CallEvent, session_id: str,
                        speaker: str) -> None:
    """A leg we dialled (``TelnyxControl.dial``) answered: stream it into its session as ``speaker``."""
    try:
        stream = svc.kallglot.get_session(session_id).stream
        if stream is None:
            raise KallglotError("session has no stream", code="no_stream")
        record = svc.lifecycle.session_record(session_id)
        leg = LegSpec.joining(record, carrier=CARRIER, call_id=event.call_id, speaker=speaker,
                              from_number=str(event.payload.get("from") or ""),
                              to_number=str(event.payload.get("to") or ""))
        if not svc.lifecycle.register_leg(leg, session_id=session_id):
            raise KallglotError("the session has already ended", code="session_ended")
    except KallglotError as exc:
        log.error("telnyx call=%s dialled leg cannot join session=%s: %s", event.call_id, session_id, exc)
        _command(event, "hangup", lambda: control.hang_up(event.call_id, event.command_id("hangup")))
        return
    token = seal_relay_token(svc, session_id, event.call_id, stream, speaker=speaker)
    _command(event, "streaming_start", lambda: control.start_streaming(
        event.call_id, session_id=session_id, relay_token=token, command_id=event.command_id("streaming_start")))


def _speak_ended(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    if GOODBYE_KEY in event.state:
        _command(event, "hangup", lambda: control.hang_up(event.call_id, event.command_id("hangup")))


def _streaming_failed(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """Retry streaming once on a live call; after that, end the leg and say goodbye."""
    session_id = svc.lifecycle.session_for_call(CARRIER, event.call_id)
    call = svc.lifecycle.call_record(CARRIER, event.call_id)
    if not session_id or call.get("state") != LEG_LIVE:
        return
    log.warning("telnyx call=%s streaming failed: %s", event.call_id, str(event.payload.get("failure_reason"))[:200])
    # One retry per call, whichever worker sees the failure first.
    if first_seen(svc.redis, svc.keys.seen(CARRIER, f"stream-retry:{event.call_id}"), event.id):
        try:
            stream = svc.kallglot.get_session(session_id).stream
        except KallglotError as exc:
            log.error("telnyx call=%s session=%s cannot be re-streamed: %s", event.call_id, session_id, exc)
            stream = None
        if stream is not None:
            token = seal_relay_token(svc, session_id, event.call_id, stream, speaker=call.get("speaker", "customer"))
            if _command(event, "streaming_start (retry)", lambda: control.start_streaming(
                    event.call_id, session_id=session_id, relay_token=token,
                    command_id=event.command_id("streaming_start"))):
                return
    svc.lifecycle.leg_ended(CARRIER, event.call_id, "streaming_failed", clean=False)
    _command(event, "speak", lambda: control.say_goodbye(event.call_id, GOODBYE_SESSION_OVER,
                                                         command_id=event.command_id("speak")))


def _call_hangup(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    cause = str(event.payload.get("hangup_cause") or "unspecified")
    svc.lifecycle.leg_ended(CARRIER, event.call_id, f"hangup_{cause}", clean=cause in CLEAN_HANGUP_CAUSES)


HANDLERS: dict[str, Callable[[Services, TelnyxControl, CallEvent], None]] = {
    "call.initiated": _call_initiated,
    "call.answered": _call_answered,
    "call.speak.ended": _speak_ended,
    "streaming.failed": _streaming_failed,
    "call.hangup": _call_hangup,
}
