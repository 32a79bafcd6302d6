"""Telnyx's own definitions, read from the installed telnyx SDK, that hold the fakes to what Telnyx accepts and sends.

The SDK (Stainless-generated from Telnyx's OpenAPI) is the closest machine-readable contract that installs here:

- every Call Control command body is a ``TypedDict`` (``telnyx/types/calls/action_*_params.py``,
  ``call_dial_params.py``); :func:`command_body_errors` refuses fields the type does not define (the real API answers
  422) and requires its ``Required`` ones, spelled as on the wire (``from_`` is sent as ``from``);
- every webhook is a pydantic model (``telnyx/types/call_*.py``); :func:`payload_field_names` gives the wire names
  of ``data.payload`` for an event type, so a fake cannot send a field (like ``direction`` on ``call.answered``)
  that Telnyx's own definition does not have.

The media-streaming frames follow Telnyx's AsyncAPI page
(https://developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket): :data:`MEDIA_FRAME_FIELDS`.
"""
from __future__ import annotations

import functools
import typing
from typing import Any

from telnyx.types import (
    call_answered, call_dial_params, call_hangup, call_initiated, call_speak_ended, call_speak_started,
    call_streaming_failed, call_streaming_started, call_streaming_stopped,
)
from telnyx.types.calls import (
    action_answer_params, action_hangup_params, action_speak_params, action_start_streaming_params,
    action_stop_streaming_params, action_transfer_params,
)

#: URL action name (``/v2/calls/{id}/actions/<name>``) → the SDK's body type. ``dial`` is ``POST /v2/calls``.
COMMAND_TYPES: dict[str, type] = {
    "answer": action_answer_params.ActionAnswerParams,
    "streaming_start": action_start_streaming_params.ActionStartStreamingParams,
    "streaming_stop": action_stop_streaming_params.ActionStopStreamingParams,
    "speak": action_speak_params.ActionSpeakParams,
    "hangup": action_hangup_params.ActionHangupParams,
    "transfer": action_transfer_params.ActionTransferParams,
    "dial": call_dial_params.CallDialParams,
}

#: Webhook ``data.event_type`` → the SDK's model of ``data`` (whose ``payload`` field is typed).
EVENT_TYPES: dict[str, type] = {
    "call.initiated": call_initiated.CallInitiated,
    "call.answered": call_answered.CallAnswered,
    "call.hangup": call_hangup.CallHangup,
    "call.speak.started": call_speak_started.CallSpeakStarted,
    "call.speak.ended": call_speak_ended.CallSpeakEnded,
    "streaming.started": call_streaming_started.CallStreamingStarted,
    "streaming.stopped": call_streaming_stopped.CallStreamingStopped,
    "streaming.failed": call_streaming_failed.CallStreamingFailed,
}

#: Fields of each media-streaming frame Telnyx sends, per the AsyncAPI page (top level, then the event's body).
MEDIA_FRAME_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "connected": (frozenset({"event", "version"}), frozenset()),
    "start": (frozenset({"event", "sequence_number", "stream_id", "start"}),
              frozenset({"user_id", "call_control_id", "call_session_id", "from", "to", "tags", "client_state",
                         "custom_parameters", "media_format"})),
    "media": (frozenset({"event", "sequence_number", "stream_id", "media"}),
              frozenset({"track", "chunk", "timestamp", "payload"})),
    "dtmf": (frozenset({"event", "sequence_number", "stream_id", "occurred_at", "dtmf"}), frozenset({"digit"})),
    "mark": (frozenset({"event", "sequence_number", "stream_id", "mark"}), frozenset({"name"})),
    "stop": (frozenset({"event", "sequence_number", "stream_id", "stop"}),
             frozenset({"user_id", "call_control_id"})),
}


def _unwrap(hint: Any) -> tuple[Any, str | None, bool]:
    """(the bare type, its wire alias, whether it is ``Required``) from ``Required[Annotated[T, PropertyInfo(…)]]``.

    ``__required_keys__`` cannot be trusted here: the SDK's modules use postponed annotations, so
    ``typing_extensions`` sees strings when it builds the TypedDict and records no key as required.
    """
    alias, required = None, False
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            for meta in getattr(hint, "__metadata__", ()):
                alias = getattr(meta, "alias", None) or alias
            hint = typing.get_args(hint)[0]
        elif origin in (typing.Required, typing.NotRequired):
            required = required or origin is typing.Required
            hint = typing.get_args(hint)[0]
        else:
            return hint, alias, required


@functools.cache
def command_fields(action: str) -> tuple[frozenset[str], frozenset[str]]:
    """(every wire field name, the required ones) of ``action``'s body type."""
    params = COMMAND_TYPES[action]
    fields = [(_unwrap(hint), name) for name, hint in typing.get_type_hints(params, include_extras=True).items()]
    return (frozenset(alias or name for (_, alias, _), name in fields),
            frozenset(alias or name for (_, alias, required), name in fields if required))


def command_body_errors(action: str, body: Any) -> list[str]:
    """What the real API would refuse (422) in ``body`` for ``action``; ``[]`` when the SDK's type allows it."""
    if action not in COMMAND_TYPES:
        return [f"unknown command {action!r}"]
    if not isinstance(body, dict):
        return ["body is not a JSON object"]
    allowed, required = command_fields(action)
    errors = [f"{action}: unknown field {name!r}" for name in sorted(set(body) - allowed)]
    errors += [f"{action}: required field {name!r} missing" for name in sorted(required - set(body))]
    return errors


@functools.cache
def payload_field_names(event_type: str) -> frozenset[str]:
    """Wire names of ``data.payload`` fields the SDK defines for ``event_type``."""
    data_model = EVENT_TYPES[event_type]
    payload_model, _, _ = _unwrap(data_model.model_fields["payload"].annotation)  # type: ignore[attr-defined]
    for arg in typing.get_args(payload_model) or (payload_model,):  # Optional[Payload]
        if hasattr(arg, "model_fields"):
            return frozenset(field.alias or name for name, field in arg.model_fields.items())
    raise TypeError(f"no payload model for {event_type}")


def data_field_names(event_type: str) -> frozenset[str]:
    """Wire names of ``data`` fields (id, event_type, occurred_at, payload, record_type)."""
    return frozenset(field.alias or name for name, field in EVENT_TYPES[event_type].model_fields.items())


def webhook_errors(body: dict[str, Any]) -> list[str]:
    """Fields of a Call Control webhook body the SDK's event type does not define (``meta`` is the delivery
    envelope documented on Telnyx's receiving-webhooks page, outside ``data``)."""
    errors = [f"unknown top-level field {name!r}" for name in sorted(set(body) - {"data", "meta"})]
    data = body.get("data") or {}
    event_type = data.get("event_type")
    if event_type not in EVENT_TYPES:
        return errors + [f"event type {event_type!r} has no SDK model here"]
    errors += [f"{event_type}: unknown data field {n!r}" for n in sorted(set(data) - data_field_names(event_type))]
    payload = data.get("payload") or {}
    errors += [f"{event_type}: unknown payload field {n!r}"
               for n in sorted(set(payload) - payload_field_names(event_type))]
    return errors


def media_frame_errors(message: dict[str, Any]) -> list[str]:
    """Fields of a frame Telnyx sends on the media socket that the AsyncAPI page does not define."""
    event = message.get("event")
    if event not in MEDIA_FRAME_FIELDS:
        return [f"unknown frame event {event!r}"]
    top, inner = MEDIA_FRAME_FIELDS[event]
    errors = [f"{event}: unknown field {n!r}" for n in sorted(set(message) - top)]
    body = message.get(event)
    if isinstance(body, dict):
        errors += [f"{event}.{event}: unknown field {n!r}" for n in sorted(set(body) - inner)]
    return errors
