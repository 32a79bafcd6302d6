"""Twilio as :mod:`app.carriers.registry` lists it; importing this module registers every Twilio route."""
from __future__ import annotations

from app.carriers.contract import CarrierAdapter
from app.carriers.twilio import CARRIER, media, webhooks  # noqa: F401  (media, webhooks: routes register on bp)
from app.carriers.twilio.blueprint import bp
from app.carriers.twilio.codec import TwilioMediaCodec
from app.carriers.twilio.control import TwilioControl
from app.carriers.twilio.numbers import LABEL, TwilioNumbers

TWILIO = CarrierAdapter(name=CARRIER, label=LABEL, blueprint=bp, control=TwilioControl, numbers=TwilioNumbers,
                        codec=TwilioMediaCodec)
