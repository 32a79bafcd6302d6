"""The ``/telnyx/media`` WebSocket route: one Telnyx media stream bridged to its Kallglot session, and what a
Call Control caller hears when the stream ends on our side (never dead air)."""
from __future__ import annotations

import logging

import redis
import telnyx
from flask import abort, request

from app.calls.events import announce_fallback
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.codec import FLOW_PARAMETER, FLOW_TEXML, STREAM_AUTH_HEADER, FramedSocket, TelnyxMediaCodec
from app.carriers.telnyx.control import GOODBYE_SESSION_OVER, GOODBYE_UNAVAILABLE, telnyx_control
from app.extensions import Services, services, sock
from app.relay.bridge import KALLGLOT_UNREACHABLE, MEDIA_START_TIMEOUT_SECONDS, bridge_leg
from app.relay.core import CarrierSocket, RelayEnd
from app.relay.tokens import RELAY_TOKEN_PARAMETER, InvalidRelayToken

log = logging.getLogger(__name__)

#: The leg's end reason when its codec could not be decoded (not a loss to restore: see streams.py).
UNSUPPORTED_CODEC = "unsupported_codec"
#: Relay ends after which the call is still up with nobody on the other side of the stream.
ENDS_LEAVING_CALL_UP = frozenset({RelayEnd.KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST, RelayEnd.PROTOCOL_ERROR})


@bp.before_request
def refuse_forged_stream_auth_token() -> None:
    """Telnyx signs no upgrade, but sends our ``stream_auth_token`` (a relay token) as a header when we set one
    (Call Control): a header that is not a live relay token is refused with 403 before the socket opens.
    TeXML streams send no header; their token arrives in ``start`` and is checked there."""
    if request.endpoint != "telnyx.media_socket":
        return
    token = request.headers.get(STREAM_AUTH_HEADER)
    if token is not None and not services().relay_tokens.verifies(token, carrier=CARRIER):
        log.warning("telnyx media upgrade refused: invalid %s header", STREAM_AUTH_HEADER)
        abort(403, description="invalid streaming auth token")


@sock.route("/media", bp=bp)
def media_socket(ws: CarrierSocket) -> None:
    """``wss://…/telnyx/media``: the auth-token header was checked on upgrade; the relay token on ``start``."""
    svc = services()
    # The token may come as Telnyx's auth header (Call Control's stream_auth_token) or in our stream URL's query
    # (TeXML, whose <Stream> documents no token attribute); the start frame's parameters are read too.
    codec = TelnyxMediaCodec(auth_token=request.headers.get(STREAM_AUTH_HEADER)
                             or request.args.get(RELAY_TOKEN_PARAMETER))
    end = bridge_leg(FramedSocket(ws), codec, svc, start_timeout=MEDIA_START_TIMEOUT_SECONDS)
    if codec.call_id and codec.parameters.get(FLOW_PARAMETER) != FLOW_TEXML and _verified(svc, codec):
        _say_goodbye_if_left_up(svc, codec, end)


def _verified(svc: Services, codec: TelnyxMediaCodec) -> bool:
    """Whether the socket's ``start`` carried a relay token for its call: an unauthenticated ``start`` naming
    some real call must never make the bridge send that call a command."""
    try:
        svc.relay_tokens.open(codec.parameters.get(RELAY_TOKEN_PARAMETER), carrier=CARRIER, call_id=codec.call_id)
    except InvalidRelayToken:
        return False
    return True


def _say_goodbye_if_left_up(svc: Services, codec: TelnyxMediaCodec, end: RelayEnd | None) -> None:
    """A Call Control call whose stream ended on our side is still up: the profile's fallback (unavailable:
    message, then forward or hang up) or the session-over goodbye — never dead air. Only for a stream whose
    relay token verified (:func:`_verified`)."""
    call_id = str(codec.call_id)
    try:
        call = svc.lifecycle.call_record(CARRIER, call_id)
        if end is None and codec.refused_encoding:
            log.error("telnyx call=%s arrived in %s, which the bridge cannot decode: fallback", call_id,
                      codec.refused_encoding)
            svc.lifecycle.leg_ended(CARRIER, call_id, UNSUPPORTED_CODEC, clean=False)
            goodbye = GOODBYE_UNAVAILABLE
        elif end is None:
            # No relay ran: a refused token (nothing to do for an unverified call) or Kallglot unreachable.
            if call.get("end_reason") != KALLGLOT_UNREACHABLE:
                return
            goodbye = GOODBYE_UNAVAILABLE
        elif end in ENDS_LEAVING_CALL_UP:
            goodbye = GOODBYE_SESSION_OVER
        else:
            return
        if goodbye == GOODBYE_UNAVAILABLE:
            announce_fallback(svc.redis, svc.keys, call.get("session_id", ""), carrier=CARRIER, call_id=call_id,
                              speaker=call.get("speaker", ""), why=call.get("end_reason") or UNSUPPORTED_CODEC)
        to_number = call.get("to", "")
        profile = svc.profiles.for_number(to_number)
        telnyx_control().say_goodbye(call_id, goodbye, profile, to_number=to_number,
                                     command_id=f"{call_id}:stream-over")
    except (telnyx.APIError, redis.RedisError) as exc:
        log.error("telnyx call=%s could not say goodbye after the stream ended: %s", call_id, exc)
