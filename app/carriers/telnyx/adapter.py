"""Telnyx as :mod:`app.carriers.registry` lists it; importing this module registers every Telnyx route."""
from __future__ import annotations

from app.carriers.contract import CarrierAdapter
from app.carriers.telnyx import (  # noqa: F401  (routes register on bp)
    CARRIER, call_control, media, signature, texml, texml_restore,
)
from app.carriers.telnyx.blueprint import bp
from app.carriers.telnyx.codec import TelnyxMediaCodec
from app.carriers.telnyx.control import TelnyxControl
from app.carriers.telnyx.numbers import LABEL, TelnyxNumbers

TELNYX = CarrierAdapter(name=CARRIER, label=LABEL, blueprint=bp, control=TelnyxControl.from_settings,
                        numbers=TelnyxNumbers, codec=TelnyxMediaCodec)
