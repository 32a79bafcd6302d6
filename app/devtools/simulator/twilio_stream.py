"""The Twilio side of one Media Streams WebSocket (:class:`SimulatedStream`), and what a simulated call observed
(:class:`CallResult`)."""
from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from simple_websocket import Client, ConnectionClosed
from wsproto.utilities import LocalProtocolError

from app.devtools.simulator.caller import StreamWait
from app.devtools.simulator.websocket import drop_connection

FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz: Twilio's inbound frame size
BYTES_PER_SECOND = 8000
SILENCE = 0xFF  # μ-law +0, used to pad the last frame
MAX_STREAMS_PER_CALL = 3  # reconnects allowed via <Connect action> TwiML before we give up
StatusCallbackMode = Literal["normal", "none", "twice", "reversed"]


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix + 32 lowercase hex digits."""
    return prefix + uuid.uuid4().hex



class StreamLog(Protocol):
    """Appends one event to a call's timeline."""

    def __call__(self, event: str, coalesce: str | None = None) -> None: ...


@dataclass
class CallResult:
    """Everything observed during one simulated call."""

    call_sid: str
    stream_sid: str | None = None
    twiml: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    dialled: list[str] = field(default_factory=list)  # numbers <Dial>ed (the call went on there)
    hung_up: bool = False
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sent_audio: bytes = b""
    heard_audio: bytes = b""
    played_audio: bytes = b""
    marks_received: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    #: Bytes of returned audio played when each mark was echoed: where playback stood, not when.
    played_at_mark: dict[str, int] = field(default_factory=dict)
    clears: int = 0
    server_closed_first: bool = False
    close_code: int | None = None
    protocol_errors: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    #: Wall-clock time (``time.time()``) of the timeline's t+0, to line it up with the bridge's log timestamps.
    started_at: float = 0.0
    callbacks: list[tuple[str, int]] = field(default_factory=list)
    # Additions: HTTP status of the voice webhook, and Twilio-side failures (webhook/TwiML/handshake).
    webhook_status: int | None = None
    errors: list[str] = field(default_factory=list)
    streams: int = 0
    #: Each stream as the caller waited on it, in order (a restored stream adds one).
    waits: list[StreamWait] = field(default_factory=list)
    sip_dials: list[Any] = field(default_factory=list)  # SipDial of each <Dial><Sip> (app.devtools.simulator.sip)
    #: Wall-clock time (``time.time()``) of every returned media message, on all of the call's streams.
    heard_at: list[float] = field(default_factory=list)
    #: Wall-clock time each media stream's socket was opened (a restored stream adds one).
    stream_opened_at: list[float] = field(default_factory=list)

    def print_timeline(self) -> None:
        """Print the call's timeline as ``t+seconds  event`` lines."""
        for t, event in self.timeline:
            print(f"t+{t:.3f}s  {event}")



class SimulatedStream:
    """One live Media Streams WebSocket, seen from Twilio's side.

    A reader thread validates server frames like Twilio does, feeds returned audio to a playback
    model (8 bytes/ms from arrival, queued after earlier audio), echoes marks when playback reaches
    them and handles ``clear``. Tests get this object through ``place_call(hold_open=...)`` and may
    read ``received``, ``heard``, ``played``, ``marks_received``, ``marks_echoed``, ``clears``,
    ``protocol_errors`` and ``server_closed`` (e.g. in ``wait_for`` predicates).
    """

    def __init__(self, ws: Client, *, call_sid: str, account_sid: str, stream_sid: str,
                 log: StreamLog) -> None:
        self.ws, self.call_sid, self.account_sid, self.stream_sid = ws, call_sid, account_sid, stream_sid
        self._log = log
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._seq = 0
        self._received: list[Any] = []
        self.heard = bytearray()
        #: Wall-clock time (``time.time()``) of each returned media message, for silence-gap measurements.
        self.heard_at: list[float] = []
        self.played = bytearray()
        self.marks_received: list[str] = []
        self.marks_echoed: list[str] = []
        self.played_at_mark: dict[str, int] = {}
        self.clears = 0
        self.protocol_errors: list[str] = []
        self.server_closed = False
        self.close_code: int | None = None
        self._closing = False  # set when we (the caller side) end the socket
        #: Wall-clock times (``time.time()``) of the first returned audio and of the stream's end, either side's
        #: (the patient caller's record: :class:`app.devtools.simulator.caller.StreamWait`).
        self.first_audio_at: float | None = None
        self.ended_at: float | None = None
        #: TwiML that replaced the call's (a REST ``update(twiml=…)``): the stream stops, the call goes on there.
        self.redirect_twiml: str | None = None
        self._segments: list[tuple[float, bytes]] = []  # (play start, audio) not yet fully played
        self._tail = 0.0  # monotonic time at which all queued audio will have played
        self._pending_marks: list[tuple[float, str]] = []  # (due time, name)
        self._media_in = 0
        self._reader = threading.Thread(target=self._read_loop, name=f"sim-reader-{stream_sid}", daemon=True)

    # ----- public hooks for tests -----
    @property
    def received(self) -> list[Any]:
        """Server frames so far: parsed JSON dicts, or the raw str/bytes when not valid JSON."""
        with self._cond:
            return list(self._received)

    def send_raw(self, data: str | bytes) -> None:
        """Send a frame verbatim (str = text frame, bytes = binary frame)."""
        with self._send_lock:
            self.ws.send(data)

    def wait_for(self, predicate: Callable[[SimulatedStream], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` is true (re-checked on every frame) or ``timeout``; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def close_abruptly(self) -> None:
        """Drop the TCP connection without ``stop`` or a close frame (a carrier-side failure)."""
        self._closing = True
        self.ended_at = self.ended_at or time.time()
        drop_connection(self.ws.sock)
        self._log("caller side dropped the media socket abruptly")

    # ----- Twilio -> server -----
    def start(self) -> None:
        """Start the reader thread."""
        self._reader.start()

    def send_event(self, event: str, body: dict[str, Any] | None = None, *, seq: bool = True) -> bool:
        """Send a Twilio event with the next sequenceNumber; False if the socket is gone."""
        with self._send_lock:
            msg: dict[str, Any] = {"event": event}
            if seq:
                self._seq += 1
                msg["sequenceNumber"] = str(self._seq)
            msg.update(body or {})
            try:
                self.ws.send(json.dumps(msg))
                return True
            # LocalProtocolError: the socket is closing but simple-websocket still says ``connected`` (a close
            # frame went out or came in a moment ago); for a caller that is a socket gone, like the others.
            except (ConnectionClosed, OSError, LocalProtocolError):
                return False

    def hang_up(self) -> None:
        """The caller hangs up: send ``stop`` and close the socket, as Twilio does."""
        self._closing = True  # before stop: a server that closes on stop did not close "first"
        self.ended_at = self.ended_at or time.time()
        self.send_event("stop", {"streamSid": self.stream_sid,
                                 "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        self._log("-> stop")
        try:
            with self._send_lock:  # not between a mark echo's connected-check and its frame (see send_event)
                self.ws.close()
            self._log("caller side closed the media socket")
        except (ConnectionClosed, OSError, LocalProtocolError):
            pass

    def redirect(self, twiml: str) -> None:
        """The call's TwiML is replaced through the REST API: Twilio stops this stream (``stop``, close) and
        runs ``twiml`` next, the caller still on the line."""
        self.redirect_twiml = twiml
        self._log("call redirected by the REST API: stream stopped")
        self.hang_up()

    def finish(self) -> None:
        """Wait for the reader thread and settle the playback model at the end of the stream."""
        self._reader.join(timeout=2.0)
        with self._cond:
            now = time.monotonic()
            self._pump(now)
            # The call is over: whatever was still playing was cut off where it stood.
            for start, audio in self._segments:
                if start < now:
                    self.played += audio[: int((now - start) * BYTES_PER_SECOND)]
            self._segments.clear()

    # ----- server -> Twilio -----
    def _read_loop(self) -> None:
        while True:
            try:
                frame = self.ws.receive(timeout=0.01)  # short: also drives the playback clock
            except (ConnectionClosed, OSError):
                frame = None
            if frame is None and not self.ws.connected:
                with self._cond:
                    if not self._closing:
                        self.server_closed = True
                        self.ended_at = self.ended_at or time.time()
                        code = self.ws.close_reason
                        self.close_code = int(code) if code is not None else None
                        self._log(f"server closed the media socket (code {self.close_code})")
                    self._cond.notify_all()
                return
            with self._cond:
                if frame is not None:
                    self._handle(frame, time.monotonic())
                self._pump(time.monotonic())
                self._cond.notify_all()

    def _error(self, code: int, text: str) -> None:
        self.protocol_errors.append(f"{code}: {text}")
        self._log(f"PROTOCOL ERROR {code}: {text}")

    def _handle(self, frame: str | bytes, now: float) -> None:
        if isinstance(frame, bytes):
            self._received.append(frame)
            return self._error(31950, f"binary frame ({len(frame)} bytes); Twilio accepts text frames only")
        try:
            msg = json.loads(frame)
        except ValueError:
            self._received.append(frame)
            return self._error(31951, f"frame is not JSON: {frame[:80]!r}")
        self._received.append(msg)
        event = msg.get("event") if isinstance(msg, dict) else None
        if event not in ("media", "mark", "clear"):
            return self._error(31951, f"unknown event {event!r}")
        if msg.get("streamSid") != self.stream_sid:
            return self._error(31951, f"{event}: streamSid {msg.get('streamSid')!r} is not {self.stream_sid}")
        if event == "media":
            payload = (msg.get("media") or {}).get("payload") if isinstance(msg.get("media"), dict) else None
            try:
                audio = base64.b64decode(payload, validate=True) if isinstance(payload, str) else None
            except (binascii.Error, ValueError):
                audio = None
            if audio is None:
                return self._error(31951, "media.payload missing or not valid base64")
            if self.first_audio_at is None:
                self.first_audio_at = time.time()
            self.heard += audio
            self.heard_at.append(time.time())
            start = max(now, self._tail)
            self._segments.append((start, audio))
            self._tail = start + len(audio) / BYTES_PER_SECOND
            self._media_in += 1
            self._log_media_in()
        elif event == "mark":
            name = (msg.get("mark") or {}).get("name") if isinstance(msg.get("mark"), dict) else None
            if not isinstance(name, str):
                return self._error(31951, "mark.name missing")
            self.marks_received.append(name)
            self._pending_marks.append((max(now, self._tail), name))  # due now if nothing is playing
            self._log(f"<- mark {name!r}")
        else:
            self.clears += 1
            for start, audio in self._segments:
                if start < now:
                    self.played += audio[: int((now - start) * BYTES_PER_SECOND)]
            self._segments.clear()
            self._tail = now
            self._log(f"<- clear (pending marks {[n for _, n in self._pending_marks]} returned)")
            self._echo_marks(len(self._pending_marks))

    def _log_media_in(self) -> None:
        # Coalesce runs of returned media into one timeline line to keep it readable.
        self._log(f"<- media x{self._media_in} ({len(self.heard)} bytes heard so far)", coalesce="<- media")

    def _pump(self, now: float) -> None:
        """Advance playback to ``now``: finish played segments, echo marks that playback reached."""
        while self._segments and self._segments[0][0] + len(self._segments[0][1]) / BYTES_PER_SECOND <= now:
            self.played += self._segments.pop(0)[1]
        self._echo_marks(sum(1 for due, _ in self._pending_marks if due <= now))

    def _echo_marks(self, count: int) -> None:
        """Echo the first ``count`` pending marks; a closed socket ends the loop quietly (those marks are dropped,
        never echoed, and the reader goes on to notice the close)."""
        for _, name in self._pending_marks[:count]:
            if not self.send_event("mark", {"streamSid": self.stream_sid, "mark": {"name": name}}):
                self._log(f"mark {name!r} not echoed: the media socket is closed")
                break
            self.marks_echoed.append(name)
            self.played_at_mark[name] = len(self.played)
            self._log(f"-> mark {name!r} echoed")
        del self._pending_marks[:count]
