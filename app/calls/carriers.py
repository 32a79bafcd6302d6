"""What the vendor-free lifecycle may ask of a carrier adapter, besides relaying media."""
from __future__ import annotations

from typing import Protocol


class CarrierControl(Protocol):
    """Call control one carrier offers the lifecycle (hang up a leg, dial an agent)."""

    carrier: str

    def hang_up(self, call_id: str) -> None:
        """End a live call leg at the carrier; a leg that already ended is not an error."""

    def dial(self, *, to: str, from_: str, session_id: str, speaker: str) -> str:
        """Place an outbound leg that will stream into ``session_id`` as ``speaker``; returns its call ID."""
