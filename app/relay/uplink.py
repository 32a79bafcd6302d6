"""The relay's uplink (carrier → Kallglot): read carrier frames, batch caller audio into ``audio.input`` chunks."""
from __future__ import annotations

import binascii
import logging
import threading
import time
from collections.abc import Callable

from simple_websocket import ConnectionClosed

from app import metrics
from app.carriers.contract import CarrierCodec, Dtmf, Malformed, MarkPlayed, Media, Stopped
from app.kallglot import stream_protocol
from app.relay.outcome import RelayEnd, RelayStats
from app.relay.reopen import KallglotLink
from app.relay.sockets import CarrierSocket

log = logging.getLogger(__name__)

#: The uplink wakes this often when the carrier is silent, to notice that the downlink ended the relay.
UPLINK_POLL_SECONDS = 0.25
MULAW_BYTES_PER_MS = 8
#: The relay's counters reach Prometheus every this many carrier frames (5 s of audio) and at its end:
#: a prometheus-client ``inc()`` takes a lock, too dear per frame.
METRICS_FLUSH_FRAMES = 250
#: One in this many uplink chunks / downlink frames has its time inside the relay observed.
HOP_SAMPLE_EVERY = 10
#: Default quiet time after which a half-full batch goes to Kallglot (``UPLINK_QUIET_FLUSH_MS``).
DEFAULT_QUIET_FLUSH_MS = 40
#: After a full chunk went out, the uplink leaves the carrier socket unread for the chunk's length less this
#: margin (two 20 ms frames of arrival jitter), then takes the frames that came meanwhile in one read: about
#: two wake-ups of the worker per chunk instead of one per frame (README, Capacity). 0 or less: never hold.
DEFAULT_HOLD_MARGIN_MS = 40


class Uplink:
    """Carrier frames in, ``audio.input`` chunks of ``chunk_ms`` out; runs in the carrier handler's greenlet."""

    def __init__(self, carrier_ws: CarrierSocket, codec: CarrierCodec, link: KallglotLink, *, speaker: str,
                 chunk_ms: int, stats: RelayStats, context: str, ending: threading.Event,
                 finish: Callable[[RelayEnd], None], protocol_error: Callable[[int, str], None],
                 mark_played: Callable[[str], None] | None = None,
                 quiet_flush_ms: int = DEFAULT_QUIET_FLUSH_MS,
                 hold_margin_ms: int = DEFAULT_HOLD_MARGIN_MS) -> None:
        self._carrier_ws = carrier_ws
        self._codec = codec
        self._link = link
        self.speaker = speaker
        self.chunk_bytes = chunk_ms * MULAW_BYTES_PER_MS
        self._stats = stats
        self._context = context
        self._ending = ending
        self._finish = finish
        # Records the leg's end, then closes the carrier socket with this code (see MediaRelay.protocol_error).
        self._protocol_error = protocol_error
        self._mark_played = mark_played
        # A carrier that suppresses silence sends nothing after the caller stops talking: a half-full batch
        # goes out once no frame has come for this long (0: never; it waits for the next frame or the end).
        self._quiet_flush_seconds = quiet_flush_ms / 1000
        self.quiet_flushes = 0
        # Frames come in real time: the next chunk cannot be complete before chunk_ms, so reading each frame as
        # it comes (one hub wake-up, timer and recv each) buys nothing but CPU. None: no hold (chunk too short).
        hold_ms = chunk_ms - hold_margin_ms if hold_margin_ms > 0 else 0
        self._hold_seconds = hold_ms / 1000 if hold_ms > 0 else None
        self.holds = 0
        self._pending = bytearray()
        self._sequence = 0
        self._bytes_sent = 0
        self._origin_ms = int(time.time() * 1000)

    def run(self) -> None:
        """Relay until the carrier stops, is lost or breaks its protocol, or the relay is ending."""
        parse = self._codec.parse
        clock = time.perf_counter
        stats = self._stats
        quiet = self._quiet_flush_seconds
        last_media_at = 0.0
        chunk_sent = False
        while not self._ending.is_set():
            # The quiet-time flush needs no timer of its own: the wait for the next frame is cut short instead.
            timeout = UPLINK_POLL_SECONDS
            if self._pending and quiet:
                timeout = min(timeout, max(last_media_at + quiet - clock(), 0.0))
            try:
                if chunk_sent:
                    chunk_sent = False
                    raw = self._carrier_ws.receive(timeout=0.0)  # a frame already waiting: we are late, no hold
                    if raw is None and self._carrier_ws.connected:
                        self.holds += 1
                        # The relay's end (set by the downlink or stop()) still ends the hold at once.
                        if self._ending.wait(self._hold_seconds):
                            break
                        raw = self._carrier_ws.receive(timeout=timeout)
                else:
                    raw = self._carrier_ws.receive(timeout=timeout)
                received_at = clock()
            except ConnectionClosed:
                self._finish(RelayEnd.CARRIER_LOST)
                return
            if raw is None:
                if not self._carrier_ws.connected:
                    self._finish(RelayEnd.CARRIER_LOST)
                    return
                if self._pending and quiet and received_at - last_media_at >= quiet:
                    self.quiet_flushes += 1
                    if not self.flush():
                        return
                continue
            event = parse(raw)
            if isinstance(event, Media):
                last_media_at = received_at
                stats.frames_in += 1
                stats.bytes_in += len(event.payload)
                self._pending += event.payload
                if len(self._pending) >= self.chunk_bytes:
                    if not self._send_chunk(self.chunk_bytes):
                        return
                    # (Not with a part-chunk left and a quiet time: that flush must not wait behind a hold.)
                    chunk_sent = self._hold_seconds is not None and not (self._pending and quiet)
                    if self._sequence % HOP_SAMPLE_EVERY == 0:
                        metrics.RELAY_HOP_SECONDS.labels("uplink").observe(clock() - received_at)
                if stats.frames_in % METRICS_FLUSH_FRAMES == 0:
                    metrics.add_relay_counts(self._codec.carrier, stats.take_deltas())
            elif isinstance(event, Stopped):
                self._finish(RelayEnd.CARRIER_STOP)
                return
            elif isinstance(event, MarkPlayed):
                stats.marks_played += 1
                if self._mark_played is not None:
                    self._mark_played(event.name)
            elif isinstance(event, Dtmf):
                stats.dtmf += 1
                log.info("%s dtmf %s", self._context, event.digit)
            elif isinstance(event, Malformed):
                if event.fatal:
                    log.warning("%s closing carrier socket: %s", self._context, event.reason)
                    self._protocol_error(event.close_code, event.reason)
                    return
                stats.frames_dropped += 1
                if stats.frames_dropped == 1:
                    log.warning("%s dropping carrier frame: %s", self._context, event.reason)
            # Connected, a second StreamStarted and Ignored need nothing.

    def flush(self) -> bool:
        """Send whatever is left (less than a chunk) so Kallglot gets every byte the caller said.

        False if Kallglot is gone for good (the relay is then ending as ``KALLGLOT_LOST``).
        """
        while self._pending:
            if not self._send_chunk(min(len(self._pending), self.chunk_bytes)):
                return False
        return True

    def _send_chunk(self, size: int) -> bool:
        """Send the first ``size`` pending bytes as one ``audio.input``; False if Kallglot is gone for good."""
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        self._sequence += 1
        message = stream_protocol.audio_input(
            binascii.b2a_base64(chunk, newline=False).decode("ascii"), sequence=self._sequence,
            timestamp_ms=self._origin_ms + self._bytes_sent // MULAW_BYTES_PER_MS, speaker=self.speaker)
        self._bytes_sent += len(chunk)
        if self._link.send_audio(message):
            return True
        self._finish(RelayEnd.KALLGLOT_LOST)
        return False
