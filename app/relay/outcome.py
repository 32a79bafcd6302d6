"""Why a relay ended and what it counted: shared by the relay core, its uplink and its Kallglot link."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class RelayEnd(str, Enum):
    """Why a relay stopped; the session lifecycle decides what each means for the session."""

    CARRIER_STOP = "carrier_stop"  # clean: the carrier said the stream or call is over
    CARRIER_LOST = "carrier_lost"  # the carrier socket closed without ``stop``
    KALLGLOT_ENDED = "kallglot_ended"  # Kallglot sent ``session.ended``
    KALLGLOT_LOST = "kallglot_lost"  # the Kallglot socket closed without ``session.ended``
    PROTOCOL_ERROR = "protocol_error"  # the carrier broke its protocol; we closed the socket
    WORKER_DRAINING = "worker_draining"  # the worker is shutting down (deploy); the leg is handed over as lost


@dataclass
class RelayStats:
    """Counters for one relayed leg: plain ints on the hot path, logged at the end and added to the
    Prometheus counters in batches (:meth:`take_deltas`)."""

    frames_in: int = 0
    bytes_in: int = 0
    chunks_to_kallglot: int = 0
    frames_to_carrier: int = 0
    bytes_to_carrier: int = 0
    marks_sent: int = 0
    marks_played: int = 0
    playback_caught_up: int = 0  # echoed marks after which the caller had heard all return audio
    clears: int = 0
    dtmf: int = 0
    frames_dropped: int = 0
    kallglot_reconnects: int = 0
    chunks_dropped_while_reconnecting: int = 0
    unknown_kallglot: Counter[str] = field(default_factory=Counter)
    _reported: dict[str, int] = field(default_factory=dict, repr=False)

    def take_deltas(self) -> dict[str, int]:
        """How much each int counter grew since the last call (for :func:`app.metrics.add_relay_counts`)."""
        deltas: dict[str, int] = {}
        for name, value in vars(self).items():
            if isinstance(value, int) and not name.startswith("_"):
                deltas[name] = value - self._reported.get(name, 0)
                self._reported[name] = value
        return deltas
