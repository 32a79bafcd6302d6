"""The states a leg and a session go through, and what an end attempt did (stored values are plain strings)."""
from __future__ import annotations

from enum import Enum

LEG_LIVE = "live"
LEG_ENDED = "ended"
SESSION_ACTIVE = "active"
SESSION_HELD = "held"
SESSION_ENDING = "ending"
SESSION_ENDED = "ended"
SESSION_END_FAILED = "end_failed"


class EndOutcome(str, Enum):
    """What happened to a session when a leg ended or an end was attempted."""

    ENDED = "ended"  # this call ended it at Kallglot
    HELD = "held"  # kept for a reconnect (or the hang-up grace) until its deadline
    ALREADY = "already"  # ended, or being ended, by someone else
    LEGS_LIVE = "legs_live"  # a leg re-attached meanwhile: nothing to end
    FAILED = "failed"  # Kallglot's end failed; retried from the deadlines with backoff
