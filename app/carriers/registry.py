"""Every carrier, listed once. Adding a third carrier is one folder (``app/carriers/<name>/`` with an
``adapter.py``) plus one line here; the factory, the admin and the profile store take their carrier lists from
:data:`CARRIERS`.
"""
from __future__ import annotations

from app.carriers.contract import CarrierAdapter
from app.carriers.telnyx.adapter import TELNYX
from app.carriers.twilio.adapter import TWILIO

#: In the order the admin shows them.
CARRIERS: tuple[CarrierAdapter, ...] = (TWILIO, TELNYX)


def carrier_names() -> tuple[str, ...]:
    """Every carrier's name (as in URLs, relay tokens, Redis keys and profiles)."""
    return tuple(carrier.name for carrier in CARRIERS)


def carrier(name: str) -> CarrierAdapter:
    """The carrier called ``name``; raises ``KeyError`` for any other name."""
    for entry in CARRIERS:
        if entry.name == name:
            return entry
    raise KeyError(name)
