"""The ``/telnyx/media`` WebSocket route: one Telnyx media stream bridged to its Kallglot session."""
from __future__ import annotations

import logging

import redis
import telnyx
from flask import request

from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.codec import FLOW_PARAMETER, FLOW_TEXML, STREAM_AUTH_HEADER, TelnyxMediaCodec
from app.carriers.telnyx.control import GOODBYE_SESSION_OVER, GOODBYE_UNAVAILABLE, telnyx_control
from app.extensions import Services, services, sock
from app.relay.bridge import KALLGLOT_UNREACHABLE, bridge_leg
from app.relay.core import CarrierSocket, RelayEnd

log = logging.getLogger(__name__)

#: Relay ends after which the call is still up with nobody on the other side of the stream.
ENDS_LEAVING_CALL_UP = frozenset({RelayEnd.KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST, RelayEnd.PROTOCOL_ERROR})


@sock.route("/media", bp=bp)
def media_socket(ws: CarrierSocket) -> None:
    """``wss://…/telnyx/media``: Telnyx signs no upgrade; the relay token is checked on ``start``."""
    svc = services()
    codec = TelnyxMediaCodec(auth_token=request.headers.get(STREAM_AUTH_HEADER))
    end = bridge_leg(ws, codec, svc)
    if codec.call_id and codec.parameters.get(FLOW_PARAMETER) != FLOW_TEXML:
        _say_goodbye_if_left_up(svc, codec.call_id, end)


def _say_goodbye_if_left_up(svc: Services, call_id: str, end: RelayEnd | None) -> None:
    """A Call Control call whose stream ended on our side is still up: say so and hang up, never dead air."""
    try:
        if end is None:
            # No relay ran: a refused token (nothing to do for an unverified call) or Kallglot unreachable.
            if svc.lifecycle.call_record(CARRIER, call_id).get("end_reason") != KALLGLOT_UNREACHABLE:
                return
            goodbye = GOODBYE_UNAVAILABLE
        elif end in ENDS_LEAVING_CALL_UP:
            goodbye = GOODBYE_SESSION_OVER
        else:
            return
        telnyx_control().say_goodbye(call_id, goodbye, command_id=f"{call_id}:stream-over")
    except (telnyx.APIError, redis.RedisError) as exc:
        log.error("telnyx call=%s could not say goodbye after the stream ended: %s", call_id, exc)
