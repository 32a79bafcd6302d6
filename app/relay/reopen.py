"""The relay's side of its Kallglot stream: send caller audio, and after a drop reopen the stream with backoff,
keeping the most recent audio meanwhile (bounded) and sending it, in order, once the stream is back.

A stream is not trusted with audio until Kallglot has said something healthy on it (``session.ready``, the
first message of an accepted stream, or any transcript, audio or pong). Kallglot refuses a stream *after* the
WebSocket handshake (``session.error`` then a close), so audio written before that refusal reached the
socket's buffer and nobody read it: those chunks stay kept and go out again, first, on the reopened stream.
(A chaos run lost whole calls' audio this way — the caller heard nothing — whenever a refused connect met a
caller already talking.) The price: should a stream that Kallglot did accept drop before saying anything at
all, its audio is sent twice, with the same ``sequence`` numbers — a repeat Kallglot can recognise, where a
loss could not be noticed by anyone."""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from simple_websocket import ConnectionClosed

from app.kallglot.stream import KallglotStream
from app.kallglot.stream_protocol import ServerMessage
from app.relay.outcome import RelayStats

log = logging.getLogger(__name__)

#: Waits between attempts to reopen a dropped Kallglot stream (about 8 s in all, then the leg is lost).
KALLGLOT_RECONNECT_BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 4.0)
#: Caller audio kept while the Kallglot stream is being reopened; older audio is dropped (and counted).
KALLGLOT_RECONNECT_BUFFER_MS = 5000


class StreamNotWanted(Exception):
    """Raised by a reopen callable when the leg or its session is over: retrying cannot help, so stop at once.

    (Without it a relay whose session had ended walked the whole backoff — about 8 s of silence before the
    caller heard goodbye — each attempt refused by Kallglot: seen in chaos-run logs, p99 8 s from refusal
    to the last reopen.)"""


class KallglotLink:
    """One leg's current Kallglot stream; the uplink sends through it, the downlink reads and reopens it."""

    def __init__(self, stream: KallglotStream, *, reopen: Callable[[], KallglotStream] | None, stats: RelayStats,
                 context: str, backlog_chunks: int,
                 backoff_seconds: Sequence[float] = KALLGLOT_RECONNECT_BACKOFF_SECONDS,
                 on_reopened: Callable[[], None] | None = None) -> None:
        self.stream = stream
        # Opens a new stream to the same session (None: a drop ends the relay).
        self._reopen_stream = reopen
        self._stats = stats
        self._context = context
        self._backoff_seconds = tuple(backoff_seconds)
        self._on_reopened = on_reopened  # must return at once (the live console queues it)
        # The uplink (send_audio) and the downlink (reopen) both touch the stream and the backlog.
        self._lock = threading.Lock()
        self._reconnecting = False
        self._attempts = 0
        self._backlog: deque[str] = deque(maxlen=max(1, backlog_chunks))
        # Chunks written to the current stream before Kallglot confirmed it (see the module docstring).
        self._unconfirmed: deque[str] = deque(maxlen=max(1, backlog_chunks))
        self._confirmed = False

    @property
    def can_reopen(self) -> bool:
        """Whether a dropped stream is reopened (else a drop ends the relay)."""
        return self._reopen_stream is not None

    def send_audio(self, message: str) -> bool:
        """Send one ``audio.input``, or queue it while the stream is being reopened; False if Kallglot is lost."""
        with self._lock:
            if not self._reconnecting:
                try:
                    self.stream.send(message)
                    self._stats.chunks_to_kallglot += 1
                    if not self._confirmed:
                        self._unconfirmed.append(message)
                    return True
                except (ConnectionClosed, OSError):
                    if self._reopen_stream is None:
                        return False
                    # The downlink notices the same drop and reopens the stream; keep the audio until then.
                    self._reconnecting = True
            if len(self._backlog) == self._backlog.maxlen:
                self._stats.chunks_dropped_while_reconnecting += 1
            self._backlog.append(message)
        return True

    @property
    def reconnecting(self) -> bool:
        """Whether the stream is dropped and being reopened (caller audio is queued meanwhile)."""
        return self._reconnecting

    def unsent_chunks(self) -> int:
        """Caller audio that has not reached an accepted Kallglot stream: queued while reconnecting, or written to
        a stream that then dropped before Kallglot confirmed it (0 while the current stream is healthy)."""
        with self._lock:
            return len(self._backlog) + len(self._unconfirmed) if self._reconnecting else 0

    def receive(self, timeout: float | None) -> ServerMessage | None:
        """Next message on the current stream (see :meth:`KallglotStream.receive`)."""
        return self.stream.receive(timeout)

    def ping(self) -> None:
        """Kallglot's keepalive on the current stream."""
        self.stream.ping()

    def healthy(self) -> None:
        """Kallglot sent something healthy on the current stream: it accepted the stream (the audio written to it
        so far is Kallglot's), and a later drop starts the backoff from the beginning again."""
        self._attempts = 0
        if not self._confirmed:
            with self._lock:
                self._confirmed = True
                self._unconfirmed.clear()

    def close(self) -> None:
        """Close the current stream with a closing handshake (see :meth:`KallglotStream.close`)."""
        self.stream.close()

    def reopen(self, ending: threading.Event) -> bool:
        """Reopen the dropped stream with backoff, then send the audio queued meanwhile; False if it stays lost
        (or ``ending`` is set meanwhile)."""
        if self._reopen_stream is None:
            return False
        with self._lock:
            self._reconnecting = True
        # Attempts count across quick successive drops (a stream that opens and is refused at once is no
        # recovery); a healthy message from Kallglot resets the count (see healthy()).
        while self._attempts < len(self._backoff_seconds):
            delay = self._backoff_seconds[self._attempts]
            self._attempts += 1
            if ending.wait(delay):
                # The chaos run's "refused and never reopened" calls end here: the caller hung up inside the
                # backoff (their stop was already queued when the relay read the refusal). Say so, or the leg's
                # last line ("0 chunks, 0 kallglot reconnects") looks like a stall.
                log.info("%s kallglot stream not reopened: the relay ended during the %.1f s backoff "
                         "(attempt %d)", self._context, delay, self._attempts)
                return False
            try:
                stream = self._reopen_stream()
            except StreamNotWanted as exc:
                log.info("%s kallglot stream not reopened: %s", self._context, exc)
                return False
            except Exception as exc:  # any failure to reopen is retried, then the leg is lost
                log.warning("%s kallglot stream reopen failed: %s", self._context, exc)
                continue
            with self._lock:
                self.stream.close()
                self.stream = stream
                self._confirmed = False
                # Oldest first: what the dead stream never confirmed, then what was queued since.
                replay = [*self._unconfirmed, *self._backlog]
                kept = replay[-self._backlog.maxlen:] if self._backlog.maxlen else replay
                self._stats.chunks_dropped_while_reconnecting += len(replay) - len(kept)
                self._backlog.clear()
                # Sent or not, the replayed chunks wait for this stream's confirmation (or the next attempt).
                self._unconfirmed = deque(kept, maxlen=self._backlog.maxlen)
                try:
                    for message in kept:
                        stream.send(message)
                        self._stats.chunks_to_kallglot += 1
                except (ConnectionClosed, OSError):
                    continue  # dropped again at once: the next attempt replays them all, in order
                self._reconnecting = False
            self._stats.kallglot_reconnects += 1
            if self._on_reopened is not None:
                self._on_reopened()
            log.info("%s kallglot stream reopened (%d chunks dropped meanwhile)", self._context,
                     self._stats.chunks_dropped_while_reconnecting)
            return True
        return False
