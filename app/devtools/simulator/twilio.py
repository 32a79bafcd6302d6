"""Twilio call simulator: drives our service exactly as Twilio would during an inbound call.

Flow (protocol notes: /work/shared/telephony-protocols.md, sections A and D):
voice webhook (signed form POST) -> TwiML -> ``<Connect><Stream>`` media WebSocket (signed upgrade,
Media Streams JSON frames, playback model for returned audio, marks and clears) -> ``<Connect action>``
when the server hangs up the stream first -> stream-status and call-status callbacks.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from simple_websocket import Client, ConnectionClosed
from simple_websocket.ws import Base
from twilio.request_validator import RequestValidator
from wsproto import ConnectionType

FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz: Twilio's inbound frame size
BYTES_PER_SECOND = 8000
SILENCE = 0xFF  # μ-law +0, used to pad the last frame
MAX_STREAMS_PER_CALL = 3  # reconnects allowed via <Connect action> TwiML before we give up
StatusCallbackMode = Literal["normal", "none", "twice", "reversed"]


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix + 32 lowercase hex digits."""
    return prefix + uuid.uuid4().hex


def _rfc2822_now() -> str:
    return format_datetime(datetime.now(timezone.utc))


class _Log(Protocol):
    def __call__(self, event: str, coalesce: str | None = None) -> None: ...


@dataclass
class CallResult:
    """Everything observed during one simulated call."""

    call_sid: str
    stream_sid: str | None = None
    twiml: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    hung_up: bool = False
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sent_audio: bytes = b""
    heard_audio: bytes = b""
    played_audio: bytes = b""
    marks_received: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    clears: int = 0
    server_closed_first: bool = False
    close_code: int | None = None
    protocol_errors: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    callbacks: list[tuple[str, int]] = field(default_factory=list)
    # Additions: HTTP status of the voice webhook, and Twilio-side failures (webhook/TwiML/handshake).
    webhook_status: int | None = None
    errors: list[str] = field(default_factory=list)
    streams: int = 0

    def print_timeline(self) -> None:
        """Print the call's timeline as ``t+seconds  event`` lines."""
        for t, event in self.timeline:
            print(f"t+{t:.3f}s  {event}")


class _TimedClient(Client):
    """simple_websocket Client whose TCP connect and handshake obey a timeout.

    The stock client connects and reads the handshake with a blocking socket and no timeout.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        parts = urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        self.host, self.port = parts.hostname, parts.port or (443 if secure else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.subprotocols, self.extra_headeers = [], list(headers.items())
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            # Daemon reader thread: a peer that never closes must not keep the interpreter alive.
            Base.__init__(self, sock, connection_type=ConnectionType.CLIENT,
                          thread_class=lambda target: threading.Thread(target=target, daemon=True))
        except BaseException:
            sock.close()
            raise

    def handshake(self) -> None:
        super().handshake()
        self.sock.settimeout(None)  # the reader thread blocks in recv(); our receive() calls time out


class SimulatedStream:
    """One live Media Streams WebSocket, seen from Twilio's side.

    A reader thread validates server frames like Twilio does, feeds returned audio to a playback
    model (8 bytes/ms from arrival, queued after earlier audio), echoes marks when playback reaches
    them and handles ``clear``. Tests get this object through ``place_call(hold_open=...)`` and may
    read ``received``, ``heard``, ``played``, ``marks_received``, ``marks_echoed``, ``clears``,
    ``protocol_errors`` and ``server_closed`` (e.g. in ``wait_for`` predicates).
    """

    def __init__(self, ws: Client, *, call_sid: str, account_sid: str, stream_sid: str,
                 log: _Log) -> None:
        self.ws, self.call_sid, self.account_sid, self.stream_sid = ws, call_sid, account_sid, stream_sid
        self._log = log
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._seq = 0
        self._received: list[Any] = []
        self.heard = bytearray()
        self.played = bytearray()
        self.marks_received: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.protocol_errors: list[str] = []
        self.server_closed = False
        self.close_code: int | None = None
        self._closing = False  # set when we (the caller side) end the socket
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
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.sock.close()
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
            except (ConnectionClosed, OSError):
                return False

    def hang_up(self) -> None:
        """The caller hangs up: send ``stop`` and close the socket, as Twilio does."""
        self._closing = True  # before stop: a server that closes on stop did not close "first"
        self.send_event("stop", {"streamSid": self.stream_sid,
                                 "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        self._log("-> stop")
        try:
            self.ws.close()
            self._log("caller side closed the media socket")
        except (ConnectionClosed, OSError):
            pass

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
            self.heard += audio
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
        for _, name in self._pending_marks[:count]:
            self.marks_echoed.append(name)
            self.send_event("mark", {"streamSid": self.stream_sid, "mark": {"name": name}})
            self._log(f"-> mark {name!r} echoed")
        del self._pending_marks[:count]


class TwilioCallSimulator:
    """Places simulated inbound Twilio calls against our service.

    ``base_url`` is where the simulator really connects; ``public_url`` is the base URL the service
    believes it is reachable at (what Twilio would use, and what signatures are computed over).
    """

    def __init__(self, base_url: str, auth_token: str, *, public_url: str | None = None,
                 account_sid: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid or new_sid("AC")
        self.timeout = timeout
        self.validator = RequestValidator(auth_token)

    # ----- URLs and signed HTTP -----
    def _real_url(self, url: str) -> str:
        """Map a URL under the public base (http(s) or ws(s) form) onto the base we really connect to."""
        for public, real in ((self.public_url, self.base_url),
                             (_ws_scheme(self.public_url), _ws_scheme(self.base_url))):
            if url == public or url.startswith(public + "/") or url.startswith(public + "?"):
                return real + url[len(public):]
        return url

    def _absolute(self, url: str, *, websocket: bool = False) -> str:
        """Resolve a TwiML URL relative to the voice webhook URL, as Twilio does."""
        base = self.public_url + "/twilio/voice"
        return urljoin(_ws_scheme(base) if websocket else base, url)

    def _signed_request(self, url: str, params: dict[str, str], *, method: str = "POST",
                        sign: bool = True) -> requests.Response:
        """Send a Twilio webhook request to ``url`` (a public URL), signed the way Twilio signs it."""
        headers = {"User-Agent": "TwilioProxy/1.1"}
        if method.upper() == "GET":
            sep = "&" if "?" in url else "?"
            url = url + sep + urlencode(params)
            if sign:  # GET: the query string is part of the URL; nothing is appended
                headers["X-Twilio-Signature"] = self.validator.compute_signature(url, {})
            return requests.get(self._real_url(url), headers=headers, timeout=self.timeout)
        if sign:
            headers["X-Twilio-Signature"] = self.validator.compute_signature(url, params)
        return requests.post(self._real_url(url), data=params, headers=headers, timeout=self.timeout)

    def signed_post(self, path: str, params: dict[str, str], *, sign: bool = True) -> requests.Response:
        """POST form ``params`` to ``{base}{path}``, signed over ``{public}{path}``."""
        return self._signed_request(self.public_url + path, params, sign=sign)

    def base_params(self, to: str, from_: str, call_sid: str, status: str) -> dict[str, str]:
        """The fields Twilio sends on every call webhook."""
        return {"CallSid": call_sid, "AccountSid": self.account_sid, "From": from_, "To": to,
                "CallStatus": status, "Direction": "inbound", "ApiVersion": "2010-04-01",
                "Caller": from_, "Called": to}

    def post_voice_webhook(self, to: str, from_: str, call_sid: str | None = None,
                           extra: dict[str, str] | None = None, sign: bool = True) -> requests.Response:
        """Send only the initial voice webhook (``CallStatus=ringing``) and return the response."""
        params = self.base_params(to, from_, call_sid or new_sid("CA"), "ringing")
        params.update(extra or {})
        return self.signed_post("/twilio/voice", params, sign=sign)

    # ----- a whole call -----
    def place_call(self, to: str, from_: str, audio: bytes = b"", *, pace: bool = True,
                   call_sid: str | None = None, listen_seconds: float = 0.5, dtmf: str = "",
                   status_callbacks: StatusCallbackMode = "normal", sign: bool = True,
                   hold_open: Callable[[SimulatedStream], None] | None = None, fallback_url: str | None = None,
                   restore_audio: bytes = b"") -> CallResult:
        """Simulate a complete inbound call and return what happened.

        ``audio`` (μ-law 8 kHz) is streamed as 20 ms frames, paced in real time unless ``pace`` is
        False; after it (and ``dtmf`` digits) ``hold_open`` is called, then we listen for
        ``listen_seconds`` before sending ``stop``. ``status_callbacks`` picks how the final callbacks
        are delivered: normal (stream-status, then status), none, twice (status sent twice), reversed.
        ``fallback_url`` is the number's VoiceFallbackUrl, requested (with ``ErrorCode=11200``) when the
        voice webhook fails, as Twilio does. ``restore_audio`` is what the caller says on a restored stream
        (a caller whose line went quiet says "hello?").
        """
        run = _CallRun(self, to, from_, call_sid or new_sid("CA"), audio, pace=pace,
                       listen_seconds=listen_seconds, dtmf=dtmf, sign=sign, hold_open=hold_open)
        run.fallback_url, run.restore_audio = fallback_url, restore_audio
        run.execute(status_callbacks)
        return run.result

    def answer_outbound_call(self, answer_url: str, *, to: str, from_: str, call_sid: str, audio: bytes = b"",
                             pace: bool = False, listen_seconds: float = 0.5, status_callback: str | None = None,
                             hold_open: Callable[[SimulatedStream], None] | None = None) -> CallResult:
        """Simulate the far end answering a call the service placed through Twilio's REST API.

        Twilio requests ``answer_url`` (``Direction=outbound-api``, ``CallStatus=in-progress``), follows the
        TwiML exactly as for an inbound call, and finally posts the call's ``completed`` status to
        ``status_callback`` (the one given to ``calls.create``), if any.
        """
        run = _CallRun(self, to, from_, call_sid, audio, pace=pace, listen_seconds=listen_seconds, dtmf="",
                       sign=True, hold_open=hold_open, answer_url=answer_url, status_callback=status_callback)
        run.execute("normal" if status_callback else "none")
        return run.result


def _ws_scheme(url: str) -> str:
    """http -> ws, https -> wss (other schemes unchanged)."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


class _CallRun:
    """State of one call while it runs (kept off the simulator so calls can run concurrently)."""

    def __init__(self, sim: TwilioCallSimulator, to: str, from_: str, call_sid: str, audio: bytes, *,
                 pace: bool, listen_seconds: float, dtmf: str, sign: bool,
                 hold_open: Callable[[SimulatedStream], None] | None, answer_url: str | None = None,
                 status_callback: str | None = None) -> None:
        self.sim, self.to, self.from_, self.audio = sim, to, from_, audio
        # Outbound calls (placed through the REST API) start at their answer URL and report to their own
        # status callback; inbound ones start at /twilio/voice and report to /twilio/status.
        self.answer_url, self.status_callback = answer_url, status_callback
        self.pace, self.listen_seconds, self.dtmf, self.sign = pace, listen_seconds, dtmf, sign
        self.hold_open = hold_open
        self.fallback_url: str | None = None
        self.restore_audio = b""
        self.result = CallResult(call_sid=call_sid)
        self.t0 = time.monotonic()
        self._log_lock = threading.Lock()
        self.stream_callbacks: list[tuple[str, str, dict[str, str]]] = []  # (url, method, params)
        self.call_over = False  # the caller hung up (we sent stop / dropped the socket)

    def log(self, event: str, coalesce: str | None = None) -> None:
        """Append to the timeline; with ``coalesce``, replace a directly preceding line with that prefix."""
        with self._log_lock:
            tl = self.result.timeline
            if coalesce and tl and tl[-1][1].startswith(coalesce):
                tl[-1] = (tl[-1][0], event)
            else:
                tl.append((round(time.monotonic() - self.t0, 3), event))

    def params(self, status: str) -> dict[str, str]:
        params = self.sim.base_params(self.to, self.from_, self.result.call_sid, status)
        if self.answer_url:
            params["Direction"] = "outbound-api"
        return params

    def post(self, url: str, params: dict[str, str], method: str = "POST") -> requests.Response | None:
        """Signed webhook to a public URL; records it in callbacks; None on network failure."""
        path = urlsplit(url).path
        try:
            resp = self.sim._signed_request(url, params, method=method, sign=self.sign)
        except requests.RequestException as exc:
            self.result.errors.append(f"11200: {method} {url} failed: {exc}")
            self.log(f"{method} {path} failed: {exc}")
            return None
        what = params.get("StreamEvent") or params.get("CallStatus")
        self.log(f"{method} {path} ({what}) -> HTTP {resp.status_code}")
        return resp

    def execute(self, status_callbacks: StatusCallbackMode) -> None:
        r = self.result
        try:
            if self.answer_url:
                resp = self.sim._signed_request(self.answer_url, self.params("in-progress"), sign=self.sign)
            else:
                resp = self.sim.post_voice_webhook(self.to, self.from_, r.call_sid, sign=self.sign)
        except requests.RequestException as exc:
            r.errors.append(f"11200: voice webhook failed: {exc}")
            self.log(f"POST /twilio/voice failed: {exc}")
            self.use_fallback_url()
        else:
            r.webhook_status = resp.status_code
            first = urlsplit(self.answer_url).path if self.answer_url else "/twilio/voice (ringing)"
            self.log(f"POST {first} -> HTTP {resp.status_code}")
            if resp.ok:
                self.run_twiml(resp.text, depth=0)
            else:  # Twilio tries the fallback URL, else plays "an application error has occurred"
                r.errors.append(f"11200: voice webhook returned HTTP {resp.status_code}")
                self.use_fallback_url()
        self.log("call ended")
        self.final_callbacks(status_callbacks)

    def use_fallback_url(self) -> None:
        """Request the number's VoiceFallbackUrl after the voice webhook failed, and follow its TwiML."""
        if not self.fallback_url:
            return
        resp = self.post(self.fallback_url, {**self.params("ringing"), "ErrorCode": "11200",
                                             "ErrorUrl": self.sim.public_url + "/twilio/voice"})
        if resp is not None and resp.ok:
            self.run_twiml(resp.text, depth=0)

    def run_twiml(self, text: str, depth: int) -> None:
        """Execute TwiML verbs in order, as Twilio does, until the document ends or the call does."""
        self.result.twiml.append(text)
        try:
            root = ET.fromstring(text.strip())
        except ET.ParseError as exc:
            self.result.errors.append(f"12100: TwiML parse error: {exc}")
            self.log(f"TwiML parse error: {exc}")
            return
        if root.tag != "Response":
            self.result.errors.append(f"12100: TwiML root is <{root.tag}>, not <Response>")
            return
        for verb in root:
            if self.call_over:
                return
            if verb.tag == "Say":
                self.result.said.append((verb.text or "").strip())
                self.log(f"TwiML <Say>: {(verb.text or '').strip()!r}")
            elif verb.tag in ("Hangup", "Reject"):
                self.result.hung_up = True
                self.log(f"TwiML <{verb.tag}/>: call hung up")
                return
            elif verb.tag == "Connect":
                if self.run_connect(verb, depth):
                    return  # control moved to the <Connect action> document, or the call ended
            else:
                self.log(f"TwiML <{verb.tag}> {dict(verb.attrib)} (recorded, not simulated)")

    def run_connect(self, connect: ET.Element, depth: int) -> bool:
        """Run a ``<Connect><Stream>``; return True if the rest of the current document is skipped."""
        stream_el = connect.find("Stream")
        if stream_el is None:
            self.log(f"TwiML <Connect> without <Stream>: {[c.tag for c in connect]} (not simulated)")
            return False
        if self.result.streams >= MAX_STREAMS_PER_CALL:
            self.result.errors.append(f"stream limit ({MAX_STREAMS_PER_CALL}) reached; not reconnecting")
            self.result.hung_up = True
            return True
        self.run_stream(stream_el, first=self.result.streams == 0)
        if self.call_over:
            return True
        action = connect.get("action")
        if not action:
            return False  # Twilio continues with the next verb after <Connect>
        resp = self.post(self.sim._absolute(action), self.params("in-progress"), connect.get("method", "POST"))
        self.result.callbacks.append((urlsplit(self.sim._absolute(action)).path,
                                      resp.status_code if resp is not None else 0))
        if resp is not None and resp.ok:
            self.run_twiml(resp.text, depth + 1)
        return True

    def run_stream(self, el: ET.Element, *, first: bool) -> None:
        """Open the media WebSocket, stream audio, listen, stop; record everything on the result."""
        r, sim = self.result, self.sim
        url = sim._absolute(el.get("url", ""), websocket=True)
        stream_sid = new_sid("MZ")
        params = {p.get("name", ""): p.get("value", "") for p in el.findall("Parameter")}
        headers = {"X-Twilio-Signature": sim.validator.compute_signature(url, {})} if self.sign else {}
        self.log(f"TwiML <Connect><Stream url={url}>; connecting to {sim._real_url(url)}")
        r.streams += 1
        try:
            ws = _TimedClient(sim._real_url(url), headers, sim.timeout)
        except Exception as exc:  # OSError, simple_websocket.ConnectionError(status), wsproto protocol errors
            r.errors.append(f"31920: media stream WebSocket handshake failed: {exc!r}")
            self.log(f"media WebSocket handshake failed: {exc!r}")
            return
        r.stream_sid, r.custom_parameters = stream_sid, params
        stream = SimulatedStream(ws, call_sid=r.call_sid, account_sid=sim.account_sid, stream_sid=stream_sid,
                                 log=self.log)
        stream.start()
        stream.send_event("connected", {"protocol": "Call", "version": "1.0.0"}, seq=False)
        stream.send_event("start", {"streamSid": stream_sid, "start": {
            "accountSid": sim.account_sid, "streamSid": stream_sid, "callSid": r.call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        # The relay token is a credential: the timeline (printed by the CLI) names it but never shows it.
        shown = {name: "<redacted>" if "token" in name.lower() else value for name, value in params.items()}
        self.log(f"-> connected, start (streamSid {stream_sid}, customParameters {shown})")
        sent = self.send_audio(stream, self.audio if first else self.restore_audio)
        if first:
            r.sent_audio = sent
        for digit in self.dtmf if first else "":
            stream.send_event("dtmf", {"streamSid": stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}})
            self.log(f"-> dtmf {digit!r}")
        try:
            if self.hold_open is not None and not stream.server_closed:
                hook, self.hold_open = self.hold_open, None  # once per call, like the caller's audio
                hook(stream)
            if not stream._closing:
                stream.wait_for(lambda s: s.server_closed, self.listen_seconds)
        except BaseException:
            if not stream.server_closed and not stream._closing:
                stream.close_abruptly()  # a failing test hook must not leak the socket or reader thread
            stream.finish()
            raise
        if not stream.server_closed and not stream._closing:
            stream.hang_up()
        self.call_over = not stream.server_closed
        stream.finish()
        r.heard_audio += bytes(stream.heard)
        r.played_audio += bytes(stream.played)
        r.marks_received += stream.marks_received
        r.marks_echoed += stream.marks_echoed
        r.clears += stream.clears
        r.protocol_errors += stream.protocol_errors
        r.server_closed_first, r.close_code = stream.server_closed, stream.close_code
        if el.get("statusCallback"):
            cb = {"AccountSid": sim.account_sid, "CallSid": r.call_sid, "StreamSid": stream_sid,
                  "StreamEvent": "stream-stopped", "Timestamp": _rfc2822_now()}
            if el.get("name"):
                cb["StreamName"] = el.get("name", "")
            self.stream_callbacks.append((sim._absolute(el.get("statusCallback", "")),
                                          el.get("statusCallbackMethod", "POST"), cb))

    def send_audio(self, stream: SimulatedStream, audio: bytes) -> bytes:
        """Send ``audio`` as 160-byte media frames; returns what was sent (last frame padded with silence)."""
        if len(audio) % FRAME_BYTES:
            audio += bytes([SILENCE]) * (FRAME_BYTES - len(audio) % FRAME_BYTES)
        start, frames = time.monotonic(), len(audio) // FRAME_BYTES
        for i in range(frames):
            if self.pace:  # absolute schedule so sleep overshoot does not accumulate
                delay = start + i * 0.02 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            chunk = audio[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]
            ok = not stream.server_closed and stream.send_event("media", {"streamSid": stream.stream_sid, "media": {
                "track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                "payload": base64.b64encode(chunk).decode()}})
            if not ok:
                self.log(f"-> media stopped after {i} frames: socket closed")
                return audio[:i * FRAME_BYTES]
        if frames:
            self.log(f"-> media x{frames} ({len(audio)} bytes, {'paced' if self.pace else 'unpaced'})")
        return audio

    def final_callbacks(self, mode: StatusCallbackMode) -> None:
        """Deliver the stream-status and call-status callbacks in the order ``mode`` asks for."""
        duration = math.ceil(time.monotonic() - self.t0)
        status = {**self.params("completed"), "CallDuration": str(duration), "Timestamp": _rfc2822_now(),
                  "CallbackSource": "call-progress-events", "SequenceNumber": "0"}
        status_cb = (self.status_callback or self.sim.public_url + "/twilio/status", "POST", status)
        order = {"normal": [*self.stream_callbacks, status_cb], "none": [],
                 "twice": [*self.stream_callbacks, status_cb, status_cb],
                 "reversed": [status_cb, *self.stream_callbacks]}[mode]
        for url, method, params in order:
            resp = self.post(url, params, method)
            self.result.callbacks.append((urlsplit(url).path, resp.status_code if resp is not None else 0))
