"""Telnyx call simulator (long: signer, media leg and TeXML call share one simulated call): behaves towards our
service as Telnyx's TeXML, Call Control and media-streaming docs say.

- :class:`TelnyxSigner` signs webhooks exactly as Telnyx does: Ed25519 over ``f"{timestamp}|{raw body}"``.
- :class:`TelnyxMediaLeg` is Telnyx's side of one media-streaming WebSocket: ``connected``/``start`` with a
  ``media_format``, the caller's frames in that codec (PCMU, PCMA or L16 big-endian 16 kHz) as 20 ms
  ``media`` messages with ``chunk`` counters (optionally out of order or duplicated), and a reader that checks
  what the server sends back (JSON text frames, ``media`` ≥ 20 ms, ``mark``, ``clear``) and echoes marks.
- :class:`TexmlCallSimulator` places a TeXML call: signed form webhook, follows the TeXML, runs the stream,
  then the stream and call status callbacks.
- Call Control is simulated by a fake Telnyx REST API (:mod:`app.devtools.simulator.telnyx_api`) that uses the leg.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import nacl.signing
import requests
from simple_websocket import ConnectionClosed

from app.devtools.simulator.caller import StreamWait
from app.devtools.simulator.sip import SipDialer
from app.devtools.simulator.telnyx_contract import media_frame_errors
from app.devtools.simulator.websocket import TimedClient, drop_connection, ws_scheme

#: Bytes in one 20 ms frame per inbound codec (Telnyx media streaming: PCMU/PCMA 8 kHz, L16 16 kHz).
#: G722 (64 kbit/s) is here so a leg the bridge cannot decode can be simulated: 160 bytes per 20 ms.
FRAME_BYTES = {("PCMU", 8000): 160, ("PCMA", 8000): 160, ("L16", 16000): 640, ("L16", 8000): 320,
               ("G722", 16000): 160}
SILENCE = {"PCMU": b"\xff", "PCMA": b"\xd5", "L16": b"\x00", "G722": b"\x00"}
#: ``<Stream>`` attributes on Telnyx's TeXML Stream page
#: (https://developers.telnyx.com/docs/voice/programmable-voice/texml-verbs/stream).
TEXML_STREAM_ATTRIBUTES = frozenset({"url", "track", "name", "codec", "bidirectionalMode", "bidirectionalCodec",
                                     "bidirectionalSamplingRate", "statusCallback", "statusCallbackMethod"})
#: Verbs of Telnyx's TeXML/TwiML compatibility table
#: (https://developers.telnyx.com/docs/voice/programmable-voice/texml-twiml-compatibility), plus ``<Connect>`` and
#: ``<Start>`` (holding ``<Stream>``, the TeXML streams page). The simulator runs Say, Hangup, Dial, Redirect and
#: Connect/Stream and records any verb not listed as an error (``<Pay>`` is TwiML only, for one).
TEXML_VERBS = frozenset({"AIGather", "Connect", "Dial", "Enqueue", "Gather", "Hangup", "HttpRequest", "Leave",
                         "Pause", "Play", "Record", "Redirect", "Refer", "Reject", "Say", "Siprec", "Start", "Stop",
                         "Stream", "Suppression", "Transcription"})
#: RTP-mode media messages back to Telnyx hold 20 ms to 30 s of audio (AsyncAPI page), here PCMU 8 kHz.
MIN_RETURN_BYTES = 160
MAX_RETURN_BYTES = 30 * 8000
#: A TeXML call follows at most this many ``<Redirect>``s, and opens at most this many streams.
MAX_REDIRECTS, MAX_STREAMS_PER_CALL = 6, 5
#: The demo's signing key: deterministic so the demo bridge can be given its public key up front.
DEMO_SIGNING_SEED = hashlib.sha256(b"kallglot-bridge demo Telnyx webhook signing key").digest()


def new_call_control_id() -> str:
    """A call_control_id shaped like Telnyx's (``v3:`` + URL-safe characters)."""
    return "v3:" + base64.urlsafe_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode().rstrip("=")


class TelnyxSigner:
    """Signs webhook bodies as Telnyx does; ``public_key`` is what ``TELNYX_PUBLIC_KEY`` must be set to."""

    def __init__(self, signing_key: nacl.signing.SigningKey | None = None) -> None:
        self.signing_key = signing_key or nacl.signing.SigningKey(DEMO_SIGNING_SEED)

    @classmethod
    def from_seed_b64(cls, seed: str) -> TelnyxSigner:
        """A signer from a base64 32-byte seed (how the fake API is configured)."""
        return cls(nacl.signing.SigningKey(base64.b64decode(seed)))

    @property
    def public_key(self) -> str:
        """The base64 Ed25519 public key (Mission Control → Keys & Credentials → Public Key)."""
        return base64.b64encode(bytes(self.signing_key.verify_key)).decode("ascii")

    @property
    def seed_b64(self) -> str:
        """The private seed, base64 (to hand the fake API the same key)."""
        return base64.b64encode(bytes(self.signing_key)).decode("ascii")

    def headers(self, body: str, timestamp: int | None = None) -> dict[str, str]:
        """``telnyx-signature-ed25519`` and ``telnyx-timestamp`` for ``body`` (the exact bytes sent)."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.signing_key.sign(f"{stamp}|{body}".encode()).signature
        return {"telnyx-signature-ed25519": base64.b64encode(signature).decode("ascii"), "telnyx-timestamp": stamp}


def frames_of(payload: bytes, encoding: str, sample_rate: int) -> list[bytes]:
    """Cut raw codec bytes into 20 ms frames, padding the last one with the codec's silence."""
    size = FRAME_BYTES[(encoding, sample_rate)]
    if len(payload) % size:
        payload += SILENCE[encoding] * (size - len(payload) % size)
    return [payload[i:i + size] for i in range(0, len(payload), size)]


@dataclass
class LegResult:
    """What one media leg saw."""

    stream_id: str
    heard: bytearray = field(default_factory=bytearray)
    marks_received: list[str] = field(default_factory=list)
    clears: int = 0
    protocol_errors: list[str] = field(default_factory=list)
    server_closed_first: bool = False
    close_code: int | None = None
    frames_sent: int = 0
    media_messages: int = 0
    #: Wall-clock time (``time.time()``) the socket was opened and of each returned media message.
    opened_at: float = field(default_factory=time.time)
    heard_at: list[float] = field(default_factory=list)
    #: Wall-clock times (``time.time()``): the first returned audio, the stream's end (either side's).
    first_audio_at: float | None = None
    ended_at: float | None = None
    #: What happened on the leg, wall-clock stamped (the chaos run prints it as the call's timeline).
    events: list[tuple[float, str]] = field(default_factory=list)
    #: The patient caller's wait on this leg (:meth:`TelnyxMediaLeg.await_answer`; None if they did not wait).
    wait: StreamWait | None = None

    def event(self, text: str) -> None:
        """Stamp one event on the leg's timeline."""
        self.events.append((time.time(), text))


class TelnyxMediaLeg:
    """Telnyx's side of one media-streaming socket (see the module docstring)."""

    def __init__(self, url: str, *, call_control_id: str, custom_parameters: dict[str, str] | None = None,
                 auth_token: str | None = None, encoding: str = "PCMU", sample_rate: int = 8000,
                 timeout: float = 10.0, parameters_as: str = "object") -> None:
        headers = {"x-telnyx-streaming-auth-token": auth_token} if auth_token else {}
        #: ``start.custom_parameters`` as an object (the AsyncAPI example) or a name/value ``list``.
        self.parameters_as = parameters_as
        self.ws = TimedClient(url, headers, timeout)
        self.call_control_id, self.encoding, self.sample_rate = call_control_id, encoding, sample_rate
        self.custom_parameters, self.auth_token = custom_parameters or {}, auth_token
        self.result = LegResult(stream_id=str(uuid.uuid4()))
        self._seq = 0
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._closing = False
        self._wait: StreamWait | None = None  # the patient caller's record of this leg (await_answer)
        self._begun_at: float | None = None  # when connected/start went out (monotonic)
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="telnyx-sim-reader")
        self._reader.start()

    # ----- Telnyx -> server -----
    def send(self, event: str, body: dict[str, Any] | None = None) -> bool:
        """Send one event with the next ``sequence_number`` and top-level ``stream_id``; False if closed."""
        with self._send_lock:
            self._seq += 1
            message = {"event": event, "sequence_number": str(self._seq), "stream_id": self.result.stream_id,
                       **(body or {})}
            errors = media_frame_errors(message)
            if errors:  # the simulator never sends what Telnyx's AsyncAPI page does not define
                raise ValueError(f"not a Telnyx frame: {errors}")
            try:
                self.ws.send(json.dumps(message))
                return True
            except (ConnectionClosed, OSError):
                return False

    def send_raw(self, data: str | bytes) -> None:
        """Send a frame verbatim."""
        with self._send_lock:
            self.ws.send(data)

    def begin(self, from_: str = "+15551230000", to: str = "+15005550006") -> None:
        """``connected`` then ``start`` (with the media format and our custom parameters)."""
        # The AsyncAPI page's ``connected`` has ``event`` and ``version`` only; the auth token came as a header.
        connected: dict[str, Any] = {"event": "connected", "version": "1.0.0"}
        with self._send_lock:
            try:
                self.ws.send(json.dumps(connected))
            except (ConnectionClosed, OSError):
                return  # refused or closed already: the reader records how
        self.result.event("-> connected, start")
        self._begun_at = time.monotonic()
        self.send("start", {"start": {
            "user_id": str(uuid.uuid4()), "call_control_id": self.call_control_id,
            "call_session_id": str(uuid.uuid4()), "from": from_, "to": to, "tags": [],
            "custom_parameters": self.custom_parameters if self.parameters_as == "object" else
            [{"name": k, "value": v} for k, v in self.custom_parameters.items()],
            "media_format": {"encoding": self.encoding, "sample_rate": self.sample_rate, "channels": 1}}})

    def stream(self, payload: bytes, *, pace: bool = False, reorder: bool = False, duplicate: bool = False) -> None:
        """Send ``payload`` (raw bytes in this leg's codec) as 20 ms ``media`` frames.

        ``reorder`` swaps every pair of neighbouring frames; ``duplicate`` sends every fifth frame twice.
        """
        frames = list(enumerate(frames_of(payload, self.encoding, self.sample_rate), start=1))
        if reorder:
            for i in range(0, len(frames) - 1, 2):
                frames[i], frames[i + 1] = frames[i + 1], frames[i]
        start = time.monotonic()
        for n, (chunk, frame) in enumerate(frames):
            if pace and (delay := start + n * 0.02 - time.monotonic()) > 0:
                time.sleep(delay)
            for _ in range(2 if duplicate and chunk % 5 == 0 else 1):
                if self.result.server_closed_first or not self.send("media", {"media": {
                        "track": "inbound", "chunk": str(chunk), "timestamp": str((chunk - 1) * 20),
                        "payload": base64.b64encode(frame).decode("ascii")}}):
                    self.result.event(f"-> media stopped after {self.result.frames_sent} frames: socket closed")
                    return
                self.result.frames_sent += 1
        if frames:
            self.result.event(f"-> media x{len(frames)} ({'paced' if pace else 'unpaced'})")

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Block until ``predicate(self.result)`` holds or ``timeout``; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.result):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def await_answer(self, talk_ended_at: float, patience_seconds: float,
                     answered: Callable[[], bool] = lambda: False) -> StreamWait:
        """The patient caller (:mod:`app.devtools.simulator.caller`): after talking, wait until audio comes back
        on this leg, the stream ends for them, or ``answered()`` (e.g. a ``speak`` on the call) — at most
        ``patience_seconds`` from ``talk_ended_at``. Returns the leg's wait record (its end filled in by
        :meth:`finish` and the others that end the leg, as it is the same object)."""
        wait = StreamWait(talk_ended_at, patience_seconds)
        self._wait = self.result.wait = wait
        remaining = talk_ended_at + patience_seconds - time.time()
        if remaining > 0 and not self._closing and not self.wait_for(
                lambda r: bool(r.heard) or r.server_closed_first or self._closing or answered(), remaining):
            self.result.event(f"caller waited {patience_seconds:.1f}s in silence (their patience)")
        self._sync_wait()
        return wait

    def _sync_wait(self) -> None:
        if self._wait is not None:
            self._wait.first_audio_at, self._wait.ended_at = self.result.first_audio_at, self.result.ended_at

    def _ended(self, text: str) -> None:
        """The leg ended (either side): stamp it, on the timeline and on the caller's wait record."""
        if self.result.ended_at is None:
            self.result.ended_at = time.time()
            self.result.event(text)
        self._sync_wait()

    def hang_up(self) -> None:
        """The call ends: ``stop``, then close the socket."""
        self._closing = True
        self._ended("-> stop (the caller hung up)")
        self.send("stop", {"stop": {"user_id": str(uuid.uuid4()), "call_control_id": self.call_control_id}})
        try:
            self.ws.close()
        except (ConnectionClosed, OSError):
            pass
        self._reader.join(timeout=2.0)

    def close_abruptly(self) -> None:
        """Drop the TCP connection without ``stop`` or a close frame (the carrier lost the call's media)."""
        self._closing = True
        self._ended("caller side dropped the media socket abruptly")
        drop_connection(self.ws.sock)
        self._reader.join(timeout=2.0)

    def finish(self, listen_seconds: float) -> LegResult:
        """Listen for up to ``listen_seconds`` (less if the server closes or the call is hung up meanwhile),
        then hang up unless it closed or already hung up."""
        self.wait_for(lambda r: r.server_closed_first or self._closing, listen_seconds)
        if not self.result.server_closed_first and not self._closing:
            self.hang_up()
        self._reader.join(timeout=2.0)
        self._sync_wait()
        return self.result

    # ----- server -> Telnyx -----
    def _read_loop(self) -> None:
        while True:
            try:
                frame = self.ws.receive(timeout=0.05)
            except (ConnectionClosed, OSError):
                frame = None
            if frame is None and not self.ws.connected:
                with self._cond:
                    if not self._closing:
                        self.result.server_closed_first = True
                        code = self.ws.close_reason
                        self.result.close_code = int(code) if code is not None else None
                        # How long after our ``start`` the bridge closed (or that it closed before we sent one):
                        # tells a late simulator from a bridge that did not read a ``start`` sent in time.
                        began = "before our start" if self._begun_at is None else \
                            f"{time.monotonic() - self._begun_at:.2f}s after our start"
                        self._ended(f"server closed the media socket (code {self.result.close_code}, {began})")
                    self._cond.notify_all()
                return
            if frame is not None:
                with self._cond:
                    self._handle(frame)
                    self._cond.notify_all()

    def _handle(self, frame: str | bytes) -> None:
        errors = self.result.protocol_errors
        if isinstance(frame, bytes):
            errors.append("binary frame (Telnyx accepts JSON text frames)")
            return
        try:
            message = json.loads(frame)
        except ValueError:
            errors.append(f"100003 malformed frame: {frame[:60]!r}")
            return
        event = message.get("event") if isinstance(message, dict) else None
        if event == "media":
            try:
                audio = base64.b64decode(message["media"]["payload"], validate=True)
            except (KeyError, TypeError, ValueError):
                errors.append("100004 invalid media")
                return
            if len(audio) < MIN_RETURN_BYTES:
                errors.append(f"media message of {len(audio)} bytes is shorter than 20 ms")
            elif len(audio) > MAX_RETURN_BYTES:
                errors.append(f"media message of {len(audio)} bytes is longer than 30 s")
            self.result.media_messages += 1
            if self.result.first_audio_at is None:
                self.result.first_audio_at = time.time()
                self.result.event(f"<- first media ({len(audio)} bytes)")
            self.result.heard += audio
            self.result.heard_at.append(time.time())
        elif event == "mark" and isinstance(message.get("mark"), dict):
            name = str(message["mark"].get("name"))
            self.result.marks_received.append(name)
            self.result.event(f"<- mark {name!r} ({len(self.result.heard)} bytes heard so far)")
            self.send("mark", {"mark": {"name": name}})  # nothing queued here: echoed at once
        elif event == "clear":
            self.result.clears += 1
            self.result.event(f"<- clear ({len(self.result.heard)} bytes heard so far)")
        else:
            errors.append(f"100002 unknown event {event!r}")


@dataclass
class TexmlCallResult:
    """Everything observed during one simulated TeXML call."""

    call_sid: str
    webhook_status: int | None = None
    texml: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    hung_up: bool = False
    stream_attributes: dict[str, str] = field(default_factory=dict)
    custom_parameters: dict[str, str] = field(default_factory=dict)
    leg: LegResult | None = None  # the last stream's
    legs: list[LegResult] = field(default_factory=list)  # every stream's, in order (a restored stream adds one)
    dialled: list[str] = field(default_factory=list)  # numbers <Dial>ed (the caller went on there)
    callbacks: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sip_dials: list[Any] = field(default_factory=list)  # SipDial of each <Dial><Sip> (app.devtools.simulator.sip)
    last_response: requests.Response | None = None  # the answer to the latest callback (a <Dial action>'s TeXML)

    @property
    def heard(self) -> bytes:
        """Everything the caller heard: on all of its streams, then on its ``<Dial><Sip>`` legs (a ``sip`` number)."""
        return b"".join(bytes(leg.heard) for leg in self.legs) + b"".join(bytes(d.heard) for d in self.sip_dials)


class TexmlCallSimulator:
    """Places simulated inbound calls on a TeXML application pointed at ``{public}/telnyx/texml``.

    ``base_url`` is where the simulator connects; ``public_url`` what the service believes it is reachable at.
    """

    def __init__(self, base_url: str, signer: TelnyxSigner, *, public_url: str | None = None,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.signer, self.timeout = signer, timeout
        self.parameters_as = "object"
        self.hold_open: Callable[[TelnyxMediaLeg], None] | None = None

    def real_url(self, url: str) -> str:
        """Map a public http(s)/ws(s) URL onto the address we really connect to."""
        for public, real in ((self.public_url, self.base_url), (ws_scheme(self.public_url), ws_scheme(self.base_url))):
            if url == public or url.startswith(public + "/"):
                return real + url[len(public):]
        return url

    def post_form(self, url: str, params: dict[str, str], *, sign: bool = True,
                  timestamp: int | None = None) -> requests.Response:
        """POST ``params`` form-encoded to ``url`` (public), signed over the exact body sent."""
        body = urlencode(params)
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   **(self.signer.headers(body, timestamp) if sign else {})}
        return requests.post(self.real_url(url), data=body.encode(), headers=headers, timeout=self.timeout)

    @staticmethod
    def call_params(call_sid: str, to: str, from_: str, status: str) -> dict[str, str]:
        """The fields Telnyx sends with TeXML requests (TwiML-compatible form fields)."""
        return {"AccountSid": str(uuid.UUID(int=1)), "CallSid": call_sid, "CallSidLegacy": "v2:" + uuid.uuid4().hex,
                "CallSessionId": str(uuid.uuid4()), "ConnectionId": "1494404757140276705", "From": from_, "To": to,
                "CallerId": from_, "CallStatus": status, "Direction": "inbound",
                "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def place_call(self, to: str, from_: str, payload: bytes = b"", *, encoding: str = "PCMU",
                   sample_rate: int = 8000, listen_seconds: float = 0.5, reorder: bool = False,
                   duplicate: bool = False, pace: bool = False, hangup_cause: str = "normal_clearing",
                   call_sid: str | None = None, parameters_as: str = "object", callbacks: str = "once",
                   hold_open: Callable[[TelnyxMediaLeg], None] | None = None,
                   restore_audio: bytes = b"", fallback_url: str | None = None,
                   patience_seconds: float = 0.0) -> TexmlCallResult:
        """Simulate a whole inbound TeXML call; ``payload`` is the caller's audio in ``encoding``.

        ``callbacks``: the stream and call status callbacks are sent ``once``, ``twice`` (each repeated, as an
        at-least-once delivery does), ``reversed`` (the call's before the stream's) or ``none`` (the caller's
        side vanished: no callback ever comes). ``hold_open(leg)`` runs once, on the first stream, after the
        caller's audio was sent and before listening (it may inject frames, kill the relay's worker, or drop the
        socket with :meth:`TelnyxMediaLeg.close_abruptly`). A ``<Redirect>`` is followed (signed POST, its TeXML
        run); ``restore_audio`` is what the caller says on a stream connected after the first. ``fallback_url``
        is the application's failover URL, requested as Telnyx does when the voice webhook fails.
        ``patience_seconds``: on each stream, after talking (and ``hold_open``), the caller first waits up to that
        long for audio before listening (:mod:`app.devtools.simulator.caller`; each leg's ``wait``).

        ``parameters_as``: how ``<Parameter>`` children reach ``start.custom_parameters`` — Telnyx's ``<Stream>``
        page does not say, so ``object``, ``list`` (of name/value) and ``dropped`` (not delivered) are all tried.
        """
        self.parameters_as, self.hold_open = parameters_as, hold_open
        result = TexmlCallResult(call_sid=call_sid or new_call_control_id())
        run = _TexmlRun(result, to, from_, payload, restore_audio, encoding, sample_rate, listen_seconds, reorder,
                        duplicate, pace, patience_seconds)
        status_url = self.public_url + "/telnyx/texml/status"
        params = self.call_params(result.call_sid, to, from_, "ringing")
        try:
            response: requests.Response | None = self.post_form(self.public_url + "/telnyx/texml", params)
        except requests.RequestException as exc:
            result.errors.append(f"voice webhook failed: {exc}")
            response = None
        if (response is None or not response.ok) and fallback_url:
            result.errors.append("voice webhook failed: failover URL used")
            try:
                response = self.post_form(fallback_url, params)
            except requests.RequestException as exc:
                result.errors.append(f"failover URL failed: {exc}")
                return result
        if response is None:
            return result
        result.webhook_status = response.status_code
        sends: list[tuple[str, dict[str, str]]] = []
        if response.ok:
            self._run_texml(run, response.text, depth=0)
            sends += [(url, {**self.call_params(result.call_sid, to, from_, "in-progress"),
                             "StreamEvent": "stream-stopped", "StreamSid": stream_id})
                      for url, stream_id in run.stream_callbacks]
        else:
            result.errors.append(f"voice webhook returned HTTP {response.status_code}")
        sends.append((status_url, {**self.call_params(result.call_sid, to, from_, "completed"),
                                   "CallDuration": "3", "HangupCause": hangup_cause,
                                   "HangupSource": "caller", "CallbackSource": "call-progress-events"}))
        if callbacks == "none":
            sends = []
        elif callbacks == "reversed":
            sends.reverse()
        elif callbacks == "twice":  # a redelivery repeats the same signed form
            sends = [send for send in sends for _ in range(2)]
        for url, params in sends:
            self._callback(result, url, params)
        return result

    def _callback(self, result: TexmlCallResult, url: str, params: dict[str, str]) -> None:
        try:
            result.last_response = self.post_form(url, params)
            result.callbacks.append((url, result.last_response.status_code))
        except requests.RequestException as exc:
            result.errors.append(f"callback {url} failed: {exc}")

    def _run_dial_sip(self, run: _TexmlRun, dial: ET.Element, depth: int) -> None:
        """``<Dial><Sip>``: INVITE the URI at the emulator's SIP endpoint, talk, hang up, then ``<Dial action>``
        with ``DialCallStatus`` (TwiML-compatible fields); its TeXML runs only while the caller is still on."""
        result = run.result
        dialer = SipDialer(timeout=self.timeout)
        outcome = dialer.dial((dial.findtext("Sip") or "").strip(), from_="", audio=run.payload)
        result.sip_dials.append(outcome)
        caller_left = False
        if outcome.answered:
            time.sleep(run.listen_seconds)
            caller_left = not dialer.hang_up(outcome)
        if dial.get("action"):
            params = {**self.call_params(result.call_sid, "", "", "completed" if caller_left else "in-progress"),
                      "DialCallStatus": outcome.dial_status, "DialSipResponseCode": str(outcome.sip_status)}
            self._callback(result, dial.get("action", ""), params)
            answer = result.last_response
            if answer is not None and answer.ok and not caller_left:
                self._run_texml(run, answer.text, depth + 1)

    def _run_texml(self, run: _TexmlRun, text: str, depth: int) -> None:
        """Run the TeXML verbs in order, as Telnyx does, until the document or the call ends."""
        result = run.result
        result.texml.append(text)
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            result.errors.append(f"TeXML parse error: {exc}")
            return
        for verb in root:
            if verb.tag == "Say":
                result.said.append((verb.text or "").strip())
            elif verb.tag == "Hangup":
                result.hung_up = True
                return
            elif verb.tag == "Dial" and verb.find("Sip") is not None:
                self._run_dial_sip(run, verb, depth)
                return
            elif verb.tag == "Dial":
                result.dialled.append((verb.text or "").strip())
                return  # the caller now talks to that number; our part of the call is over
            elif verb.tag == "Redirect":
                self._redirect(run, (verb.text or "").strip(), depth)
                return  # nothing after <Redirect> runs
            elif verb.tag == "Connect" and (stream := verb.find("Stream")) is not None:
                if not self._run_stream(run, stream):
                    return  # the caller hung up: the rest of the document never runs
            elif verb.tag not in TEXML_VERBS:
                result.errors.append(f"<{verb.tag}> is not a TeXML verb Telnyx documents")

    def _redirect(self, run: _TexmlRun, url: str, depth: int) -> None:
        result = run.result
        if depth >= MAX_REDIRECTS:
            result.errors.append(f"more than {MAX_REDIRECTS} redirects")
            return
        try:
            response = self.post_form(url, self.call_params(result.call_sid, run.to, run.from_, "in-progress"))
        except requests.RequestException as exc:
            result.errors.append(f"<Redirect> {url} failed: {exc}")
            return
        result.callbacks.append((url, response.status_code))
        if response.ok:
            self._run_texml(run, response.text, depth + 1)
        else:
            result.errors.append(f"<Redirect> {url} returned HTTP {response.status_code}")

    def _run_stream(self, run: _TexmlRun, stream: ET.Element) -> bool:
        """Run one ``<Connect><Stream>``; True when the stream ended with the caller still on."""
        result = run.result
        result.stream_attributes = dict(stream.attrib)
        unknown = sorted(set(stream.attrib) - TEXML_STREAM_ATTRIBUTES)
        if unknown:
            result.errors.append(f"<Stream> attributes Telnyx does not document: {unknown}")
        result.custom_parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        if stream.get("bidirectionalMode") != "rtp":
            result.errors.append("bidirectionalMode is not rtp: Telnyx would drop the return audio")
        if len(result.legs) >= MAX_STREAMS_PER_CALL:
            result.errors.append(f"stream limit ({MAX_STREAMS_PER_CALL}) reached")
            return False
        try:
            delivered = {} if self.parameters_as == "dropped" else result.custom_parameters
            leg = TelnyxMediaLeg(self.real_url(stream.get("url", "")), call_control_id=result.call_sid,
                                 custom_parameters=delivered, encoding=run.encoding, sample_rate=run.sample_rate,
                                 timeout=self.timeout,
                                 parameters_as="list" if self.parameters_as == "list" else "object")
        except Exception as exc:  # noqa: BLE001 — any handshake failure is a stream failure
            result.errors.append(f"media WebSocket handshake failed: {exc!r}")
            return True
        first = not result.legs
        leg.begin()
        leg.stream(run.payload if first else run.restore_audio, pace=run.pace, reorder=run.reorder,
                   duplicate=run.duplicate)
        talk_ended_at = time.time()
        if first and self.hold_open is not None:
            self.hold_open(leg)
        leg.await_answer(talk_ended_at, run.patience_seconds).restored = not first
        result.leg = leg.finish(run.listen_seconds)
        result.legs.append(result.leg)
        if stream.get("statusCallback"):
            run.stream_callbacks.append((stream.get("statusCallback", ""), result.leg.stream_id))
        return result.leg.server_closed_first


@dataclass
class _TexmlRun:
    """One TeXML call while it runs: what the caller says and does, and the stream callbacks to send."""

    result: TexmlCallResult
    to: str
    from_: str
    payload: bytes
    restore_audio: bytes
    encoding: str
    sample_rate: int
    listen_seconds: float
    reorder: bool
    duplicate: bool
    pace: bool
    patience_seconds: float
    stream_callbacks: list[tuple[str, str]] = field(default_factory=list)
