"""The media relay core: one call leg's carrier socket bridged to its Kallglot stream socket.

Vendor-free: a :class:`~app.carriers.contract.CarrierCodec` does the carrier's wire format. The uplink (carrier →
Kallglot) runs in the handler's thread, the downlink (Kallglot → carrier) in a second one; when either side
closes, both close. Nothing here touches Redis: the hot path does no I/O but the two sockets.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Callable
from typing import Protocol

from simple_websocket import ConnectionClosed

from app import metrics
from app.background import spawn
from app.relay.audio import DownlinkTranscoder, UnsupportedAudio
from app.kallglot import stream_protocol
from app.kallglot.stream_protocol import (
    AudioOutput, ClearAudio, Informational, SessionEnded, SessionError, Transcript, UnknownMessage,
)
from app.carriers.contract import (
    CarrierCodec, Connected, Dtmf, Ignored, Malformed, MarkPlayed, Media, Stopped, StreamStarted,
)
from app.kallglot.stream import KallglotStream

log = logging.getLogger(__name__)

#: How long a carrier may take from socket open to ``start`` (Twilio sends it at once).
START_TIMEOUT_SECONDS = 10.0
#: The uplink wakes this often when the carrier is silent, to notice that the downlink ended the relay.
UPLINK_POLL_SECONDS = 0.25
MULAW_BYTES_PER_MS = 8
#: Waits between attempts to reopen a dropped Kallglot stream (about 8 s in all, then the leg is lost).
KALLGLOT_RECONNECT_BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 4.0)
#: Caller audio kept while the Kallglot stream is being reopened; older audio is dropped (and counted).
KALLGLOT_RECONNECT_BUFFER_MS = 5000
#: The relay's counters reach Prometheus every this many carrier frames (5 s of audio) and at its end:
#: a prometheus-client ``inc()`` takes a lock, too dear per frame.
METRICS_FLUSH_FRAMES = 250
#: One in this many uplink chunks / downlink frames has its time inside the relay observed.
HOP_SAMPLE_EVERY = 10


class CarrierSocket(Protocol):
    """The subset of simple-websocket's API the relay uses (flask-sock hands us a ``Server``)."""

    connected: bool

    def receive(self, timeout: float | None = None) -> str | bytes | None: ...

    def send(self, data: str | bytes) -> None: ...

    def close(self, reason: int | None = None, message: str | None = None) -> None: ...


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


def close_quietly(ws: CarrierSocket, code: int = 1000, message: str | None = None) -> None:
    """Close a socket that may already be closed, without raising."""
    try:
        if ws.connected:
            ws.close(reason=code, message=message)
    except (ConnectionClosed, OSError):
        pass


def await_start(ws: CarrierSocket, codec: CarrierCodec, timeout: float = START_TIMEOUT_SECONDS) -> StreamStarted | None:
    """Read frames until the carrier's ``start``; on anything else meaningful, close the socket and return None."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            raw = ws.receive(timeout=max(remaining, 0.0)) if remaining > 0 else None
        except ConnectionClosed:
            log.info("%s media socket closed before start", codec.carrier)
            return None
        if raw is None:
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


class MediaRelay:
    """Bridges one started carrier stream to one Kallglot stream socket until either side ends."""

    def __init__(self, carrier_ws: CarrierSocket, codec: CarrierCodec, kallglot: KallglotStream, *,
                 speaker: str, chunk_ms: int, context: str,
                 on_end: Callable[[RelayEnd, str], None] | None = None,
                 reopen_kallglot: Callable[[], KallglotStream] | None = None,
                 on_transcript: Callable[[Transcript], None] | None = None,
                 on_health: Callable[[dict[str, float]], None] | None = None) -> None:
        self.carrier_ws = carrier_ws
        # Live-console hooks; both must return at once (they queue, never touch Redis: app/calls/events.py).
        self.on_transcript = on_transcript
        self.on_health = on_health
        self._marks_sent_at: dict[str, float] = {}  # mark name → when sent, for the playback lag
        # Reopens the Kallglot stream to the same session after it dropped (None: a drop ends the relay).
        self.reopen_kallglot = reopen_kallglot
        # Called with why the relay ended (and Kallglot's reason, if it ended the session) after the last
        # audio went to Kallglot but *before* the carrier socket closes: the carrier reacts to that close at
        # once (Twilio requests <Connect action>), and must find the leg's end already recorded.
        self.on_end = on_end
        self.kallglot_end_reason = ""
        self.codec = codec
        self.kallglot = kallglot
        self.speaker = speaker
        self.chunk_bytes = chunk_ms * MULAW_BYTES_PER_MS
        self.context = context  # "call=… session=…" prefix for every log line of this leg
        self.stats = RelayStats()
        self._transcoder = DownlinkTranscoder()
        self._ending = threading.Event()
        self._end: RelayEnd | None = None
        self._end_lock = threading.Lock()
        # Both threads may write to the carrier socket (frames vs. a protocol-error close).
        self._carrier_lock = threading.Lock()
        # While the Kallglot stream is being reopened the uplink queues its messages here (bounded).
        self._kallglot_lock = threading.Lock()
        self._reconnecting = False
        self._reopen_attempts = 0
        self._backlog: deque[str] = deque(maxlen=max(1, KALLGLOT_RECONNECT_BUFFER_MS // chunk_ms))
        # Uplink batching state.
        self._pending = bytearray()
        self._sequence = 0
        self._bytes_sent = 0
        self._origin_ms = int(time.time() * 1000)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> RelayEnd:
        """Relay until one side ends; always closes both sockets and returns why it stopped."""
        metrics.RELAYS_LIVE.labels(self.codec.carrier).inc()
        # The downlink logs with this leg's context (call, session).
        downlink = spawn(self._downlink_guarded, name="relay-downlink", inherit_context=True)
        try:
            self._uplink()
            if self._end not in (RelayEnd.KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST):
                self._flush()  # however the caller's side ended, Kallglot gets every byte the caller said
        except Exception:  # a bug must end this call cleanly, never crash the worker
            log.exception("%s uplink failed", self.context)
            self._finish(RelayEnd.PROTOCOL_ERROR)
        finally:
            self._finish(RelayEnd.CARRIER_LOST)  # no-op unless the uplink left without a reason
            self.kallglot.close()  # unblocks the downlink's receive
            downlink.join(timeout=5)
            end = self._end or RelayEnd.CARRIER_LOST
            if self.on_end is not None:
                try:
                    self.on_end(end, self.kallglot_end_reason)
                except Exception:
                    log.exception("%s recording the relay's end failed", self.context)
            self._close_carrier()
            metrics.RELAYS_LIVE.labels(self.codec.carrier).dec()
            metrics.RELAYS_ENDED.labels(self.codec.carrier, end.value).inc()
            metrics.add_relay_counts(self.codec.carrier, self.stats.take_deltas())
        s = self.stats
        log.info("%s relay ended (%s): in %d frames/%d B → %d chunks; out %d frames/%d B, %d marks, %d clears, "
                 "%d dropped, %d kallglot reconnects (%d chunks lost), unknown %s", self.context, end.value,
                 s.frames_in, s.bytes_in, s.chunks_to_kallglot, s.frames_to_carrier, s.bytes_to_carrier,
                 s.marks_sent, s.clears, s.frames_dropped, s.kallglot_reconnects,
                 s.chunks_dropped_while_reconnecting, dict(s.unknown_kallglot))
        return end

    def stop(self, why: RelayEnd = RelayEnd.WORKER_DRAINING) -> None:
        """Ask the relay to end (from another thread) as if ``why`` happened; it does within one poll."""
        self._finish(why)

    def _finish(self, why: RelayEnd) -> None:
        """Record the first reason to stop; later ones (the other side noticing) are ignored."""
        with self._end_lock:
            if self._end is None:
                self._end = why
        self._ending.set()

    # -- uplink: carrier → Kallglot ------------------------------------------------------------------------
    def _uplink(self) -> None:
        parse = self.codec.parse
        clock = time.perf_counter
        stats = self.stats
        while not self._ending.is_set():
            try:
                raw = self.carrier_ws.receive(timeout=UPLINK_POLL_SECONDS)
                received_at = clock()
            except ConnectionClosed:
                self._finish(RelayEnd.CARRIER_LOST)
                return
            if raw is None:
                if not self.carrier_ws.connected:
                    self._finish(RelayEnd.CARRIER_LOST)
                    return
                continue
            event = parse(raw)
            if isinstance(event, Media):
                stats.frames_in += 1
                stats.bytes_in += len(event.payload)
                self._pending += event.payload
                if len(self._pending) >= self.chunk_bytes:
                    if not self._send_chunk(self.chunk_bytes):
                        return
                    if self._sequence % HOP_SAMPLE_EVERY == 0:
                        metrics.RELAY_HOP_SECONDS.labels("uplink").observe(clock() - received_at)
                if stats.frames_in % METRICS_FLUSH_FRAMES == 0:
                    metrics.add_relay_counts(self.codec.carrier, stats.take_deltas())
            elif isinstance(event, Stopped):
                self._finish(RelayEnd.CARRIER_STOP)
                return
            elif isinstance(event, MarkPlayed):
                self.stats.marks_played += 1
                sent_at = self._marks_sent_at.pop(event.name, None)
                if sent_at is not None and self.on_health is not None:
                    self.on_health({"playback_lag_ms": round((time.monotonic() - sent_at) * 1000),
                                    "kallglot_reconnects": self.stats.kallglot_reconnects})
            elif isinstance(event, Dtmf):
                self.stats.dtmf += 1
                log.info("%s dtmf %s", self.context, event.digit)
            elif isinstance(event, Malformed):
                if event.fatal:
                    log.warning("%s closing carrier socket: %s", self.context, event.reason)
                    self._close_carrier(event.close_code, event.reason)
                    self._finish(RelayEnd.PROTOCOL_ERROR)
                    return
                self.stats.frames_dropped += 1
                if self.stats.frames_dropped == 1:
                    log.warning("%s dropping carrier frame: %s", self.context, event.reason)
            # Connected, a second StreamStarted and Ignored need nothing.

    def _send_chunk(self, size: int) -> bool:
        """Send the first ``size`` pending bytes as one ``audio.input``; False if Kallglot is gone."""
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        self._sequence += 1
        message = stream_protocol.audio_input(
            base64.b64encode(chunk).decode("ascii"), sequence=self._sequence,
            timestamp_ms=self._origin_ms + self._bytes_sent // MULAW_BYTES_PER_MS, speaker=self.speaker)
        self._bytes_sent += len(chunk)
        with self._kallglot_lock:
            if not self._reconnecting:
                try:
                    self.kallglot.send(message)
                    self.stats.chunks_to_kallglot += 1
                    return True
                except (ConnectionClosed, OSError):
                    if self.reopen_kallglot is None:
                        self._finish(RelayEnd.KALLGLOT_LOST)
                        return False
                    # The downlink notices the same drop and reopens the stream; keep the audio until then.
                    self._reconnecting = True
            if len(self._backlog) == self._backlog.maxlen:
                self.stats.chunks_dropped_while_reconnecting += 1
            self._backlog.append(message)
        return True

    def _flush(self) -> None:
        """Send whatever is left (less than a chunk) so Kallglot gets every byte the caller said."""
        while self._pending:
            if not self._send_chunk(min(len(self._pending), self.chunk_bytes)):
                return

    # -- downlink: Kallglot → carrier ----------------------------------------------------------------------
    def _downlink_guarded(self) -> None:
        # The downlink never closes the carrier socket itself: the uplink notices ``_ending`` within one
        # poll, and run() closes the carrier only after the leg's end is recorded.
        try:
            self._downlink()
        except Exception:
            log.exception("%s downlink failed", self.context)
            self._finish(RelayEnd.PROTOCOL_ERROR)

    def _downlink(self) -> None:
        next_ping = time.monotonic() + stream_protocol.PING_INTERVAL_SECONDS
        utterance_open = False
        last_audio_at = 0.0
        marks = 0
        warned_formats: set[str] = set()
        while not self._ending.is_set():
            now = time.monotonic()
            wait = next_ping - now
            if utterance_open:
                wait = min(wait, last_audio_at + stream_protocol.UTTERANCE_GAP_SECONDS - now)
            try:
                message = self.kallglot.receive(timeout=max(wait, 0.0))
                received_at = time.perf_counter()
            except ConnectionClosed:
                if self._ending.is_set() or not self._reopen():
                    self._finish(RelayEnd.KALLGLOT_LOST)
                    return
                continue
            now = time.monotonic()
            if message is None:
                if utterance_open and now - last_audio_at >= stream_protocol.UTTERANCE_GAP_SECONDS:
                    # The resampler's last 2 ms (pcm16 return audio) play before the utterance's mark.
                    tail = self._transcoder.end_utterance()
                    if tail:
                        if not self._to_carrier(self.codec.media(tail)):
                            return
                        self.stats.frames_to_carrier += 1
                        self.stats.bytes_to_carrier += len(tail)
                    marks += 1
                    if len(self._marks_sent_at) < 64:  # bounded: a carrier that never echoes marks
                        self._marks_sent_at[f"utt-{marks}"] = time.monotonic()
                    if not self._to_carrier(self.codec.mark(f"utt-{marks}")):
                        return
                    self.stats.marks_sent += 1
                    utterance_open = False
                if now >= next_ping:
                    try:
                        self.kallglot.ping()
                    except (ConnectionClosed, OSError):
                        if not self._reopen():
                            self._finish(RelayEnd.KALLGLOT_LOST)
                            return
                    next_ping = now + stream_protocol.PING_INTERVAL_SECONDS
                continue
            if not isinstance(message, (SessionError, UnknownMessage)):
                self._reopen_attempts = 0  # the stream is healthy again
            if isinstance(message, AudioOutput):
                try:
                    mulaw = self._transcoder.to_mulaw_8k(message.payload, message.encoding, message.sample_rate_hz)
                except UnsupportedAudio as exc:
                    if str(exc) not in warned_formats:
                        warned_formats.add(str(exc))
                        log.warning("%s dropping return audio in unsupported format %s", self.context, exc)
                    continue
                if not mulaw:
                    continue
                if not self._to_carrier(self.codec.media(mulaw)):
                    return
                self.stats.frames_to_carrier += 1
                self.stats.bytes_to_carrier += len(mulaw)
                if self.stats.frames_to_carrier % HOP_SAMPLE_EVERY == 0:
                    metrics.RELAY_HOP_SECONDS.labels("downlink").observe(time.perf_counter() - received_at)
                utterance_open, last_audio_at = True, now
            elif isinstance(message, ClearAudio):
                self._transcoder.reset()  # the barged-in utterance's resampler tail must not play either
                if not self._to_carrier(self.codec.clear()):
                    return
                self.stats.clears += 1
                utterance_open = False
            elif isinstance(message, SessionEnded):
                log.info("%s kallglot ended the session (%s)", self.context, message.reason or "no reason")
                self.kallglot_end_reason = message.reason
                self._finish(RelayEnd.KALLGLOT_ENDED)
                return
            elif isinstance(message, SessionError):
                log.warning("%s kallglot session.error %s: %s", self.context, message.code, message.message)
            elif isinstance(message, Transcript):
                if self.on_transcript is not None:
                    self.on_transcript(message)
            elif isinstance(message, UnknownMessage):
                self.stats.unknown_kallglot[message.type] += 1
                if self.stats.unknown_kallglot[message.type] == 1:
                    log.info("%s ignoring kallglot message type %r", self.context, message.type)
            elif isinstance(message, Informational):
                pass

    def _reopen(self) -> bool:
        """Reopen the dropped Kallglot stream with backoff, then send the audio queued meanwhile."""
        if self.reopen_kallglot is None:
            return False
        with self._kallglot_lock:
            self._reconnecting = True
        # Attempts count across quick successive drops (a stream that opens and is refused at once is no
        # recovery); a healthy message from Kallglot resets the count (see _downlink).
        while self._reopen_attempts < len(KALLGLOT_RECONNECT_BACKOFF_SECONDS):
            delay = KALLGLOT_RECONNECT_BACKOFF_SECONDS[self._reopen_attempts]
            self._reopen_attempts += 1
            if self._ending.wait(delay):
                return False
            try:
                stream = self.reopen_kallglot()
            except Exception as exc:  # any failure to reopen is retried, then the leg is lost
                log.warning("%s kallglot stream reopen failed: %s", self.context, exc)
                continue
            with self._kallglot_lock:
                self.kallglot.close()
                self.kallglot = stream
                try:
                    while self._backlog:
                        stream.send(self._backlog[0])
                        self._backlog.popleft()
                        self.stats.chunks_to_kallglot += 1
                except (ConnectionClosed, OSError):
                    continue  # dropped again at once: try the next attempt, the backlog is intact
                self._reconnecting = False
            self.stats.kallglot_reconnects += 1
            if self.on_health is not None:
                self.on_health({"kallglot_reconnects": self.stats.kallglot_reconnects})
            log.info("%s kallglot stream reopened (%d chunks dropped meanwhile)", self.context,
                     self.stats.chunks_dropped_while_reconnecting)
            return True
        return False

    def _to_carrier(self, frame: str) -> bool:
        """Send one frame to the carrier; False (and the relay ends) when the carrier socket is gone."""
        try:
            with self._carrier_lock:
                self.carrier_ws.send(frame)
        except (ConnectionClosed, OSError):
            self._finish(RelayEnd.CARRIER_LOST)
            return False
        return True

    def _close_carrier(self, code: int = 1000, message: str | None = None) -> None:
        with self._carrier_lock:
            close_quietly(self.carrier_ws, code, message)
