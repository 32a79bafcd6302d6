"""Leg specifications for lifecycle tests that need no call (each test has a Redis namespace of its own)."""
from __future__ import annotations

from typing import Any

from app.calls.leg_spec import LegSpec
from tests.support.twilio_requests import FROM, TO


def leg(call_id: str, **extra: Any) -> LegSpec:
    """A Twilio customer leg ``call_id`` from FROM to TO in ``ai_agent`` mode with a 60 s reconnect window."""
    return LegSpec(carrier="twilio", call_id=call_id, speaker="customer", from_number=FROM, to_number=TO,
                   mode="ai_agent", reconnect_window_seconds=60, **extra)
