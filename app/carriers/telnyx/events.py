"""A Call Control webhook as a typed event (every field we read checked for its JSON type), running SDK commands
for it, and the helpers the event handlers share (the profile to apply, the goodbye to say)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import telnyx
from flask import abort, request

from app.carriers.contract import CarrierError
from app.extensions import Services
from app.profiles import NumberProfile
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.control import TelnyxControl, decode_client_state
from app.carriers.telnyx.texml import CALL_CONTROL_ID

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


#: ``data`` fields we read and their JSON types (the SDK's event models type them all as optional strings).
DATA_STRING_FIELDS = ("id", "event_type", "occurred_at", "record_type")
#: ``data.payload`` fields we read or record: each must be a string or null when present (SDK: ``Optional[str]``).
PAYLOAD_STRING_FIELDS = ("call_control_id", "call_leg_id", "call_session_id", "connection_id", "client_state",
                         "direction", "state", "from", "to", "hangup_cause", "hangup_source", "sip_hangup_cause",
                         "failure_reason", "stream_id")


def parse_event() -> CallEvent:
    """The verified JSON body as a :class:`CallEvent`, or 400 — for any field we read having the wrong JSON type,
    before anything is recorded or de-duplicated, so a malformed event changes nothing."""
    try:
        body = json.loads(request.get_data(as_text=True))
    except ValueError:
        abort(400, description="body is not JSON")
    data = body.get("data") if isinstance(body, dict) else None
    payload = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(payload, dict) or not isinstance(data.get("id"), str) or not data["id"] \
            or len(data["id"]) > 128 or not isinstance(data.get("event_type"), str):
        abort(400, description="not a Call Control event (data.id, data.event_type, data.payload)")
    wrong = [f"data.{name}" for name in DATA_STRING_FIELDS if not isinstance(data.get(name), (str, type(None)))]
    wrong += [f"data.payload.{name}" for name in PAYLOAD_STRING_FIELDS
              if not isinstance(payload.get(name), (str, type(None)))]
    if wrong:
        abort(400, description=f"wrong JSON type (string expected): {', '.join(wrong)}")
    call_id = payload.get("call_control_id")
    if not isinstance(call_id, str) or not CALL_CONTROL_ID.match(call_id):
        abort(400, description="payload.call_control_id missing or malformed")
    return CallEvent(id=data["id"], event_type=data["event_type"][:64], occurred_at=str(data.get("occurred_at") or ""),
                     call_id=call_id, payload=payload)



def record(svc: Services, event: CallEvent) -> None:
    """Keep the event (ids, states, causes) on the call's log; never client_state or tokens."""
    fields = {name: str(event.payload[name]) for name in RECORDED_FIELDS if event.payload.get(name) is not None}
    svc.lifecycle.record_event(CARRIER, event.call_id, "call-control",
                               {"event": event.event_type, "id": event.id, "occurred_at": event.occurred_at,
                                **fields})


def command(event: CallEvent, what: str, send: Callable[[], None]) -> bool:
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


def profile_for(svc: Services, to_number: str) -> NumberProfile:
    """The profile of the number called; the built-in defaults when Redis cannot say (never no answer)."""
    try:
        return svc.profiles.for_number(to_number)
    except redis.RedisError as exc:
        log.error("telnyx profile of %s unavailable, using the defaults: %s", to_number, exc)
        return NumberProfile()


def say_goodbye(svc: Services, control: TelnyxControl, event: CallEvent, goodbye: str, to_number: str,
                action: str = "speak") -> bool:
    """Speak ``goodbye`` in the profile's words; its ``call.speak.ended`` forwards or hangs up."""
    profile = profile_for(svc, to_number)
    return command(event, f"{action} ({goodbye})", lambda: control.say_goodbye(
        event.call_id, goodbye, profile, to_number=to_number, command_id=event.command_id(action)))
