"""Why a leg or a session ended: the fixed reasons the lifecycle, the relay and the reaper record.

Carrier adapters add their own reasons built from the carrier's wire values (``call_completed``,
``hangup_normal_clearing``); those stay plain strings, and :meth:`SessionLifecycle.leg_ended` accepts both.
"""
from __future__ import annotations

from enum import Enum


class EndReason(str, Enum):
    """A leg's or session's end reason as stored in Redis (``end_reason``, ``hold_reason``)."""

    # The relay stopped (one per :class:`app.relay.core.RelayEnd`; the bridge maps them).
    RELAY_CARRIER_STOP = "relay_carrier_stop"
    RELAY_CARRIER_LOST = "relay_carrier_lost"
    RELAY_KALLGLOT_ENDED = "relay_kallglot_ended"
    RELAY_KALLGLOT_LOST = "relay_kallglot_lost"
    RELAY_PROTOCOL_ERROR = "relay_protocol_error"
    RELAY_WORKER_DRAINING = "relay_worker_draining"
    #: The relay could not open the Kallglot stream at all.
    RELAY_KALLGLOT_UNREACHABLE = "relay_kallglot_unreachable"
    # The carrier's stream ended and was not (or could not be) restored.
    STREAM_CLOSED = "stream_closed"
    STREAM_RESTARTS_EXHAUSTED = "stream_restarts_exhausted"
    #: An outbound leg answered after its session was over.
    SESSION_GONE = "session_gone"
    # The lifecycle's own decisions.
    HEARTBEAT_LOST = "heartbeat_lost"
    HOLD_EXPIRED = "hold_expired"
    ORPHANED_CREATE = "orphaned_create"
    CUSTOMER_HUNG_UP = "customer_hung_up"
    AGENT_HUNG_UP = "agent_hung_up"
    #: An operator ended the session (admin UI or API).
    ADMIN = "admin"

    def __str__(self) -> str:  # stored and logged as its value
        return self.value


def reason_value(reason: EndReason | str) -> str:
    """The stored form of ``reason`` (an :class:`EndReason` or a carrier's own string)."""
    return reason.value if isinstance(reason, EndReason) else str(reason)


def kallglot_failed(reason: str) -> bool:
    """True when Kallglot, not the carrier's stream, is why a leg ended (restoring the stream won't help)."""
    return reason in (EndReason.RELAY_KALLGLOT_UNREACHABLE, EndReason.RELAY_KALLGLOT_LOST)
