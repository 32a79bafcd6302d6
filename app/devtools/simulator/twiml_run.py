"""One simulated Twilio call while it runs: the TwiML interpreter (``<Say>``, ``<Connect><Stream>``, ``<Dial>``,
``<Hangup>``, redirects), the media stream it opens and the status callbacks Twilio would send."""
from __future__ import annotations

import base64
import math
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Protocol
from urllib.parse import urlsplit

import requests
from twilio.request_validator import RequestValidator

from app.devtools.simulator.twilio_stream import (
    FRAME_BYTES,
    MAX_STREAMS_PER_CALL,
    SILENCE,
    CallResult,
    SimulatedStream,
    StatusCallbackMode,
    new_sid,
)
from app.devtools.simulator.caller import StreamWait
from app.devtools.simulator.sip import SipDial, SipDialer
from app.devtools.simulator.websocket import TimedClient


def _rfc2822_now() -> str:
    return format_datetime(datetime.now(timezone.utc))


class TwilioWebhooks(Protocol):
    """What a call run needs of :class:`app.devtools.simulator.twilio.TwilioCallSimulator`."""

    public_url: str
    account_sid: str
    timeout: float
    validator: RequestValidator
    sip: SipDialer

    def absolute_url(self, url: str, *, websocket: bool = False) -> str: ...

    def signed_request(self, url: str, params: dict[str, str], *, method: str = "POST",
                       sign: bool = True) -> requests.Response: ...

    def base_params(self, to: str, from_: str, call_sid: str, status: str) -> dict[str, str]: ...

    def post_voice_webhook(self, to: str, from_: str, call_sid: str | None = None,
                           extra: dict[str, str] | None = None, sign: bool = True) -> requests.Response: ...

    def _real_url(self, url: str) -> str:
        """Where a public URL is really reached (private: tests override it to route through a proxy)."""
        ...


class CallRun:
    """State of one call while it runs (kept off the simulator so calls can run concurrently)."""

    def __init__(self, sim: TwilioWebhooks, to: str, from_: str, call_sid: str, audio: bytes, *,
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
        self.restore_hold_open: Callable[[SimulatedStream], None] | None = None  # see TwilioCallSimulator.place_call
        self.hold_sip: Callable[[SipDial], None] | None = None  # called while a <Dial><Sip> leg is up
        #: After talking, how long the caller waits in silence for an answer before listening ``listen_seconds``
        #: more (0: they only listen; the chaos run's patient caller: app.devtools.simulator.caller).
        self.patience_seconds = 0.0
        self.result = CallResult(call_sid=call_sid, started_at=time.time())
        self.t0 = time.monotonic()
        self._log_lock = threading.Lock()
        self.stream_callbacks: list[tuple[str, str, dict[str, str]]] = []  # (url, method, params)
        self.call_over = False  # the caller hung up (we sent stop / dropped the socket)
        self.redirect_twiml: str | None = None  # TwiML a REST update put in place of the stream's

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
            resp = self.sim.signed_request(url, params, method=method, sign=self.sign)
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
                resp = self.sim.signed_request(self.answer_url, self.params("in-progress"), sign=self.sign)
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
            elif verb.tag == "Dial" and verb.find("Sip") is None:
                self.result.dialled.append((verb.text or "").strip())
                self.log(f"TwiML <Dial>: {(verb.text or '').strip()!r} (the caller now talks there)")
                return
            elif verb.tag == "Connect":
                if self.run_connect(verb, depth):
                    return  # control moved to the <Connect action> document, or the call ended
            elif verb.tag == "Dial" and verb.find("Sip") is not None:
                if self.run_dial_sip(verb, depth):
                    return  # control moved to the <Dial action> document, or the call ended
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
        if self.redirect_twiml is not None:  # a REST update replaced the document: no <Connect action>
            text, self.redirect_twiml = self.redirect_twiml, None
            self.run_twiml(text, depth + 1)
            return True
        action = connect.get("action")
        if not action:
            return False  # Twilio continues with the next verb after <Connect>
        resp = self.post(self.sim.absolute_url(action), self.params("in-progress"), connect.get("method", "POST"))
        self.result.callbacks.append((urlsplit(self.sim.absolute_url(action)).path,
                                      resp.status_code if resp is not None else 0))
        if resp is not None and resp.ok:
            self.run_twiml(resp.text, depth + 1)
        return True

    def run_dial_sip(self, dial: ET.Element, depth: int) -> bool:
        """Run a ``<Dial><Sip>``: INVITE the URI (the emulator's SIP endpoint), talk, hang up — or be hung up on
        when the far end ended first — then request ``<Dial action>`` with ``DialCallStatus`` as Twilio does (also
        after the caller hung up; its answer is then ignored). True if the rest of the document is skipped."""
        uri = (dial.findtext("Sip") or "").strip()
        self.log(f"TwiML <Dial><Sip>{uri}</Sip>")
        started = time.monotonic()
        outcome = self.sim.sip.dial(uri, from_=self.from_, audio=self.audio)
        self.result.sip_dials.append(outcome)
        self.log(f"SIP INVITE {uri} -> {outcome.sip_status} {outcome.reason}")
        if outcome.answered:
            self.result.sent_audio, self.result.heard_audio = self.audio, self.result.heard_audio + outcome.heard
            if self.hold_sip is not None:
                hook, self.hold_sip = self.hold_sip, None
                hook(outcome)
            ended_first = self.sim.sip.hang_up(outcome)
            self.call_over = not ended_first
            self.log("SIP BYE from the far end (session ended)" if ended_first else "SIP BYE: caller hung up")
        action = dial.get("action")
        if not action:
            return self.call_over
        params = {**self.params("completed" if self.call_over else "in-progress"),
                  "DialCallStatus": outcome.dial_status, "DialCallSid": new_sid("CA"),
                  "DialCallDuration": str(math.ceil(time.monotonic() - started)) if outcome.answered else "0",
                  "DialSipResponseCode": str(outcome.sip_status)}
        resp = self.post(self.sim.absolute_url(action), params, dial.get("method", "POST"))
        self.result.callbacks.append((urlsplit(self.sim.absolute_url(action)).path,
                                      resp.status_code if resp is not None else 0))
        if resp is not None and resp.ok and not self.call_over:
            self.run_twiml(resp.text, depth + 1)
        return True

    def run_stream(self, el: ET.Element, *, first: bool) -> None:
        """Open the media WebSocket, stream audio, listen, stop; record everything on the result."""
        r, sim = self.result, self.sim
        url = sim.absolute_url(el.get("url", ""), websocket=True)
        stream_sid = new_sid("MZ")
        params = {p.get("name", ""): p.get("value", "") for p in el.findall("Parameter")}
        headers = {"X-Twilio-Signature": sim.validator.compute_signature(url, {})} if self.sign else {}
        self.log(f"TwiML <Connect><Stream url={url}>; connecting to {sim._real_url(url)}")
        r.streams += 1
        try:
            r.stream_opened_at.append(time.time())
            ws = TimedClient(sim._real_url(url), headers, sim.timeout)
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
        talk_ended_at = time.time()
        if first:
            r.sent_audio = sent
        for digit in self.dtmf if first else "":
            stream.send_event("dtmf", {"streamSid": stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}})
            self.log(f"-> dtmf {digit!r}")
        try:
            if self.hold_open is not None and not stream.server_closed:
                hook, self.hold_open = self.hold_open, None  # once per call, like the caller's audio
                hook(stream)
            elif not first and self.restore_hold_open is not None and not stream.server_closed:
                hook, self.restore_hold_open = self.restore_hold_open, None
                hook(stream)
            self.await_answer(stream, talk_ended_at)
            if not stream._closing:
                stream.wait_for(lambda s: s.server_closed, self.listen_seconds)
        except BaseException:
            if not stream.server_closed and not stream._closing:
                stream.close_abruptly()  # a failing test hook must not leak the socket or reader thread
            stream.finish()
            raise
        if not stream.server_closed and not stream._closing:
            stream.hang_up()
        self.redirect_twiml = stream.redirect_twiml
        self.call_over = not stream.server_closed and self.redirect_twiml is None
        stream.finish()
        r.heard_audio += bytes(stream.heard)
        r.heard_at += stream.heard_at
        r.played_audio += bytes(stream.played)
        r.marks_received += stream.marks_received
        r.marks_echoed += stream.marks_echoed
        r.played_at_mark.update(stream.played_at_mark)
        r.clears += stream.clears
        r.protocol_errors += stream.protocol_errors
        r.server_closed_first, r.close_code = stream.server_closed, stream.close_code
        r.waits.append(StreamWait(talk_ended_at, self.patience_seconds, stream.first_audio_at, stream.ended_at,
                                  restored=not first))
        if el.get("statusCallback"):
            cb = {"AccountSid": sim.account_sid, "CallSid": r.call_sid, "StreamSid": stream_sid,
                  "StreamEvent": "stream-stopped", "Timestamp": _rfc2822_now()}
            if el.get("name"):
                cb["StreamName"] = el.get("name", "")
            self.stream_callbacks.append((sim.absolute_url(el.get("statusCallback", "")),
                                          el.get("statusCallbackMethod", "POST"), cb))

    def await_answer(self, stream: SimulatedStream, talk_ended_at: float) -> None:
        """The patient caller: after talking, wait until something comes back on this stream (audio, or the
        stream ended for them: what comes next is the bridge's to say) or ``patience_seconds`` have passed."""
        remaining = talk_ended_at + self.patience_seconds - time.time()
        if remaining <= 0 or stream._closing:
            return
        if not stream.wait_for(lambda s: bool(s.heard) or s.server_closed or s._closing, remaining):
            self.log(f"caller waited {self.patience_seconds:.1f}s in silence (their patience)")

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
