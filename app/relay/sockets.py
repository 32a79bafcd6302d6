"""The carrier's side of a relay: the socket API it needs, closing it quietly, and waiting for ``start``."""
from __future__ import annotations

import logging
import time
from typing import Protocol

from simple_websocket import ConnectionClosed

from app.carriers.contract import CarrierCodec, Connected, Ignored, Malformed, Stopped, StreamStarted
from app.kallglot.stream import set_tcp_nodelay  # the one Nagle switch, shared with the Kallglot socket

log = logging.getLogger(__name__)

#: How long a carrier may take from socket open to ``start`` (Twilio sends it at once).
START_TIMEOUT_SECONDS = 10.0
#: Reads without waiting once the start deadline has passed (a ``connected`` and the ``start`` behind it, and spare).
LATE_START_READS = 4


class CarrierSocket(Protocol):
    """The subset of simple-websocket's API the relay uses (flask-sock hands us a ``Server``)."""

    connected: bool

    def receive(self, timeout: float | None = None) -> str | bytes | None: ...

    def send(self, data: str | bytes) -> None: ...

    def close(self, reason: int | None = None, message: str | None = None) -> None: ...




def close_quietly(ws: CarrierSocket, code: int = 1000, message: str | None = None) -> None:
    """Close a socket that may already be closed, without raising."""
    try:
        if ws.connected:
            ws.close(reason=code, message=message)
    except (ConnectionClosed, OSError):
        pass


def await_start(ws: CarrierSocket, codec: CarrierCodec, timeout: float = START_TIMEOUT_SECONDS) -> StreamStarted | None:
    """Read frames until the carrier's ``start``; on anything else meaningful, close the socket and return None."""
    # The carrier's socket carries 20 ms frames both ways: Nagle would hold each one back for an ACK.
    set_tcp_nodelay(getattr(ws, "sock", None))
    deadline = time.monotonic() + timeout
    late_reads = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # Past the deadline, a few reads that do not wait: a worker starved of CPU can wake after the
            # deadline with the carrier's ``start`` already received — the carrier was in time, we were not.
            # Bounded, so a peer sending only ``connected``/unknown frames cannot hold the socket open.
            late_reads += 1
        try:
            raw = ws.receive(timeout=max(remaining, 0.0)) if late_reads <= LATE_START_READS else None
        except ConnectionClosed:
            log.info("%s media socket closed before start", codec.carrier)
            return None
        if raw is None:
            # Logged: a carrier sends ``start`` at once, so this close means a stalled peer or a starved worker,
            # and without a line the stream's loss cannot be traced (no call id is known yet to name it by).
            log.warning("closing %s media socket: no start within %.1f s of the upgrade", codec.carrier, timeout)
            close_quietly(ws, 1008, "no start event")
            return None
        event = codec.parse(raw)
        if isinstance(event, StreamStarted):
            return event
        if isinstance(event, (Connected, Ignored)):
            continue
        if isinstance(event, Stopped):
            close_quietly(ws, 1000)
            return None
        reason = event.reason if isinstance(event, Malformed) else f"{type(event).__name__.lower()} before start"
        code = event.close_code if isinstance(event, Malformed) else 1008
        log.warning("closing %s media socket: %s", codec.carrier, reason)
        close_quietly(ws, code, reason)
        return None
