"""The media relay core: one call leg's carrier socket bridged to its Kallglot stream socket.

Vendor-free: a :class:`~app.carriers.contract.CarrierCodec` does the carrier's wire format. The uplink (carrier →
Kallglot, :mod:`app.relay.uplink`) runs in the handler's thread, the downlink (Kallglot → carrier) in a second
one; a dropped Kallglot stream is reopened by :mod:`app.relay.reopen`. When either side closes, both close.
Nothing here touches Redis: the hot path does no I/O but the two sockets.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from simple_websocket import ConnectionClosed

from app import metrics
from app.background import spawn
from app.carriers.contract import CarrierCodec
from app.kallglot import stream_protocol
from app.kallglot.stream import KallglotStream
from app.kallglot.stream_protocol import (
    AudioOutput, ClearAudio, Informational, SessionEnded, SessionError, Transcript, UnknownMessage,
)
from app.relay.audio import DownlinkTranscoder, UnsupportedAudio
from app.relay.outcome import RelayEnd, RelayStats
from app.relay.playback import PlaybackTracker
from app.relay.reopen import KALLGLOT_RECONNECT_BACKOFF_SECONDS, KALLGLOT_RECONNECT_BUFFER_MS, KallglotLink
from app.relay.sockets import START_TIMEOUT_SECONDS, CarrierSocket, await_start, close_quietly, set_tcp_nodelay
from app.relay.uplink import (
    DEFAULT_HOLD_MARGIN_MS, DEFAULT_QUIET_FLUSH_MS, HOP_SAMPLE_EVERY, MULAW_BYTES_PER_MS, UPLINK_POLL_SECONDS, Uplink,
)

# Re-exported: the carriers' media routes and the bridge import these from here.
__all__ = [
    "CarrierSocket", "KALLGLOT_RECONNECT_BACKOFF_SECONDS", "KALLGLOT_RECONNECT_BUFFER_MS", "MULAW_BYTES_PER_MS",
    "MediaRelay", "RelayEnd", "RelayStats", "START_TIMEOUT_SECONDS", "UPLINK_POLL_SECONDS", "await_start",
    "close_quietly",
]

log = logging.getLogger(__name__)

#: How long run() waits for the downlink to notice the end, after the Kallglot stream is closed.
DOWNLINK_JOIN_SECONDS = 5.0
#: After a send to the carrier failed, how long the downlink leaves the uplink to say why (see _to_carrier).
CARRIER_GONE_SETTLE_SECONDS = 5.0


class MediaRelay:
    """Bridges one started carrier stream to one Kallglot stream socket until either side ends."""

    def __init__(self, carrier_ws: CarrierSocket, codec: CarrierCodec, kallglot: KallglotStream, *,
                 speaker: str, chunk_ms: int, context: str, quiet_flush_ms: int = DEFAULT_QUIET_FLUSH_MS,
                 on_end: Callable[[RelayEnd, str], None] | None = None,
                 reopen_kallglot: Callable[[], KallglotStream] | None = None,
                 reconnect_backoff_seconds: Sequence[float] = KALLGLOT_RECONNECT_BACKOFF_SECONDS,
                 ping_interval_seconds: float = stream_protocol.PING_INTERVAL_SECONDS,
                 on_transcript: Callable[[Transcript], None] | None = None,
                 on_health: Callable[[dict[str, float]], None] | None = None,
                 hold_margin_ms: int = DEFAULT_HOLD_MARGIN_MS) -> None:
        self.carrier_ws = carrier_ws
        # Live-console hooks; both must return at once (they queue, never touch Redis: app/calls/events.py).
        self.on_transcript = on_transcript
        self.on_health = on_health
        self.playback = PlaybackTracker()  # each mark's send time and echo: the playback lag
        # Called with why the relay ended (and Kallglot's reason, if it ended the session) after the last
        # audio went to Kallglot but *before* the carrier socket closes: the carrier reacts to that close at
        # once (Twilio requests <Connect action>), and must find the leg's end already recorded.
        self.on_end = on_end
        self.kallglot_end_reason = ""
        self.codec = codec
        self.context = context  # "call=… session=…" prefix for every log line of this leg
        self.stats = RelayStats()
        self.ping_interval_seconds = ping_interval_seconds
        self._transcoder = DownlinkTranscoder()
        self._ending = threading.Event()
        self._end: RelayEnd | None = None
        self._end_lock = threading.Lock()
        self._end_recorded = False
        # Both threads may write to the carrier socket (frames vs. a protocol-error close).
        self._carrier_lock = threading.Lock()
        self.link = KallglotLink(kallglot, reopen=reopen_kallglot, stats=self.stats, context=context,
                                 backlog_chunks=KALLGLOT_RECONNECT_BUFFER_MS // chunk_ms,
                                 backoff_seconds=reconnect_backoff_seconds, on_reopened=self._reopened)
        self.uplink = Uplink(carrier_ws, codec, self.link, speaker=speaker, chunk_ms=chunk_ms, stats=self.stats,
                             context=context, ending=self._ending, finish=self._finish,
                             protocol_error=self._protocol_error, mark_played=self._mark_played,
                             quiet_flush_ms=quiet_flush_ms, hold_margin_ms=hold_margin_ms)

    @property
    def kallglot(self) -> KallglotStream:
        """The leg's current Kallglot stream (a reopen replaces it)."""
        return self.link.stream

    # -- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> RelayEnd:
        """Relay until one side ends; always closes both sockets and returns why it stopped."""
        set_tcp_nodelay(getattr(self.carrier_ws, "sock", None))
        metrics.RELAYS_LIVE.labels(self.codec.carrier).inc()
        # The downlink logs with this leg's context (call, session).
        downlink = spawn(self._downlink_guarded, name="relay-downlink", inherit_context=True)
        try:
            self.uplink.run()
            if self._end not in (RelayEnd.KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST):
                self.uplink.flush()  # however the caller's side ended, Kallglot gets every byte the caller said
        except Exception:  # a bug must end this call cleanly, never crash the worker
            log.exception("%s uplink failed", self.context)
            self._finish(RelayEnd.PROTOCOL_ERROR)
        finally:
            self._finish(RelayEnd.CARRIER_LOST)  # no-op unless the uplink left without a reason
            # A closing handshake, so the flush above is delivered (not reset) and Kallglot sees a normal
            # close; it also ends the downlink's receive.
            self.link.close()
            downlink.join(timeout=DOWNLINK_JOIN_SECONDS)
            end = self._end or RelayEnd.CARRIER_LOST
            unsent = self.link.unsent_chunks()
            if unsent:  # the stream was refused or dropped and not reopened before the leg ended
                log.warning("%s %d chunks of %s audio never reached Kallglot (stream lost, not reopened before "
                            "the relay ended)", self.context, unsent, self.uplink.speaker)
            self._record_end(end)
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

    def _record_end(self, end: RelayEnd) -> None:
        """Hand the leg's end to ``on_end`` once, before the carrier socket closes (see __init__)."""
        with self._end_lock:
            if self._end_recorded:
                return
            self._end_recorded = True
        if self.on_end is None:
            return
        try:
            self.on_end(end, self.kallglot_end_reason)
        except Exception:
            log.exception("%s recording the relay's end failed", self.context)

    def _protocol_error(self, code: int, reason: str) -> None:
        """The carrier broke its protocol: flush, record the end, *then* close the carrier socket.

        The carrier reacts to the close at once (Twilio's <Connect action> restores the stream on a new socket);
        a leg end recorded after that would mark the *restored* leg ended.
        """
        self._finish(RelayEnd.PROTOCOL_ERROR)
        self.uplink.flush()
        self._record_end(RelayEnd.PROTOCOL_ERROR)
        self._close_carrier(code, reason)

    # -- live-console health ---------------------------------------------------------------------------------
    def _mark_played(self, name: str) -> None:
        """The carrier played up to mark ``name``: publish how long after sending (the playback lag), and tell
        Kallglot once the caller has heard everything — if its protocol has a message for it (assumption 9)."""
        played = self.playback.played(name)
        if played is None:
            return
        metrics.PLAYBACK_LAG_SECONDS.labels(self.codec.carrier).observe(played.lag_seconds)
        if self.on_health is not None:
            self.on_health({"playback_lag_ms": round(played.lag_seconds * 1000),
                            "kallglot_reconnects": self.stats.kallglot_reconnects})
        if played.heard_everything:
            self.stats.playback_caught_up += 1
            notice = stream_protocol.playback_finished(played.name)
            if notice is not None:  # none today: Kallglot documents no such message
                self.link.send_audio(notice)  # in order with the caller's audio, queued like it while reconnecting

    def _reopened(self) -> None:
        if self.on_health is not None:
            self.on_health({"kallglot_reconnects": self.stats.kallglot_reconnects})

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
        link = self.link
        next_ping = time.monotonic() + self.ping_interval_seconds
        utterance_open = False
        last_audio_at = 0.0
        warned_formats: set[str] = set()
        while not self._ending.is_set():
            now = time.monotonic()
            wait = next_ping - now
            if utterance_open:
                wait = min(wait, last_audio_at + stream_protocol.UTTERANCE_GAP_SECONDS - now)
            try:
                message = link.receive(timeout=max(wait, 0.0))
                received_at = time.perf_counter()
            except ConnectionClosed:
                if self._ending.is_set() or not link.reopen(self._ending):
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
                        self.playback.audio_sent()
                        self.stats.frames_to_carrier += 1
                        self.stats.bytes_to_carrier += len(tail)
                    if not self._to_carrier(self.codec.mark(self.playback.next_mark())):
                        return
                    self.stats.marks_sent += 1
                    utterance_open = False
                if now >= next_ping:
                    try:
                        link.ping()
                    except (ConnectionClosed, OSError):
                        if not link.reopen(self._ending):
                            self._finish(RelayEnd.KALLGLOT_LOST)
                            return
                    next_ping = now + self.ping_interval_seconds
                continue
            if not isinstance(message, (SessionError, UnknownMessage)):
                link.healthy()
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
                self.playback.audio_sent()
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

    def _to_carrier(self, frame: str) -> bool:
        """Send one frame to the carrier; False (the downlink stops) when the carrier socket is gone.

        Why it is gone is the uplink's to say, not ours: a caller who hung up sent ``stop`` and then closed,
        and that ``stop`` may still sit unread in the socket's input when our send fails. Ending the relay
        here as "carrier lost" would record a clean hang-up as a loss (the session held for a reconnect
        instead of ended). The uplink reads whatever arrived before the close — ``stop``, or the close itself
        — without waiting, because a closed socket's receive never blocks.
        """
        try:
            with self._carrier_lock:
                self.carrier_ws.send(frame)
        except (ConnectionClosed, OSError):
            # A bound, not a timing assumption: only a socket that fails sends yet never reports itself
            # closed to the uplink (no real one does) gets here without the uplink having ended the relay.
            if not self._ending.wait(CARRIER_GONE_SETTLE_SECONDS):
                self._finish(RelayEnd.CARRIER_LOST)
            return False
        return True

    def _close_carrier(self, code: int = 1000, message: str | None = None) -> None:
        with self._carrier_lock:
            close_quietly(self.carrier_ws, code, message)
