"""The ``/twilio/media`` WebSocket route: one Twilio Media Stream bridged to its Kallglot session."""
from __future__ import annotations

from app.carriers.twilio.blueprint import bp
from app.carriers.twilio.codec import TwilioMediaCodec
from app.extensions import services, sock
from app.relay.bridge import MEDIA_START_TIMEOUT_SECONDS, bridge_leg
from app.relay.core import CarrierSocket


@sock.route("/media", bp=bp)
def media_socket(ws: CarrierSocket) -> None:
    """``wss://…/twilio/media``: the signature was checked on upgrade; the relay token is checked on ``start``."""
    bridge_leg(ws, TwilioMediaCodec(), services(), start_timeout=MEDIA_START_TIMEOUT_SECONDS)
