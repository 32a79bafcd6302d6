"""Twilio call simulator: drives our service exactly as Twilio would during an inbound call.

Flow (as Twilio's voice webhook, TwiML and Media Streams docs describe it):
voice webhook (signed form POST) -> TwiML -> ``<Connect><Stream>`` media WebSocket (signed upgrade,
Media Streams JSON frames, playback model for returned audio, marks and clears) -> ``<Connect action>``
when the server hangs up the stream first -> stream-status and call-status callbacks.
"""
from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode, urljoin

import requests
from twilio.request_validator import RequestValidator

from app.devtools.simulator.sip import SipDial, SipDialer
from app.devtools.simulator.twilio_stream import CallResult, SimulatedStream, StatusCallbackMode, new_sid
from app.devtools.simulator.twiml_run import CallRun
from app.devtools.simulator.websocket import ws_scheme

__all__ = ["CallResult", "SimulatedStream", "TwilioCallSimulator", "new_sid"]


class TwilioCallSimulator:
    """Places simulated inbound Twilio calls against our service.

    ``base_url`` is where the simulator really connects; ``public_url`` is the base URL the service
    believes it is reachable at (what Twilio would use, and what signatures are computed over).
    """

    def __init__(self, base_url: str, auth_token: str, *, public_url: str | None = None,
                 account_sid: str | None = None, timeout: float = 10.0, sip_gateway_url: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid or new_sid("AC")
        self.timeout = timeout
        self.validator = RequestValidator(auth_token)
        #: Where ``<Dial><Sip>`` INVITEs go (None: the URI's host, i.e. the emulator named in KALLGLOT_SIP_DOMAIN).
        self.sip = SipDialer(sip_gateway_url, timeout=timeout)

    # ----- URLs and signed HTTP -----
    def _real_url(self, url: str) -> str:
        """Map a URL under the public base (http(s) or ws(s) form) onto the base we really connect to."""
        for public, real in ((self.public_url, self.base_url),
                             (ws_scheme(self.public_url), ws_scheme(self.base_url))):
            if url == public or url.startswith(public + "/") or url.startswith(public + "?"):
                return real + url[len(public):]
        return url

    def absolute_url(self, url: str, *, websocket: bool = False) -> str:
        """Resolve a TwiML URL relative to the voice webhook URL, as Twilio does."""
        base = self.public_url + "/twilio/voice"
        return urljoin(ws_scheme(base) if websocket else base, url)

    def signed_request(self, url: str, params: dict[str, str], *, method: str = "POST",
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
        return self.signed_request(self.public_url + path, params, sign=sign)

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
                   restore_audio: bytes = b"",
                   restore_hold_open: Callable[[SimulatedStream], None] | None = None,
                   hold_sip: Callable[[SipDial], None] | None = None, patience_seconds: float = 0.0) -> CallResult:
        """Simulate a complete inbound call and return what happened.

        ``audio`` (μ-law 8 kHz) is streamed as 20 ms frames, paced in real time unless ``pace`` is
        False; after it (and ``dtmf`` digits) ``hold_open`` is called, then we listen for
        ``listen_seconds`` before sending ``stop``. ``status_callbacks`` picks how the final callbacks
        are delivered: normal (stream-status, then status), none, twice (status sent twice), reversed.
        ``fallback_url`` is the number's VoiceFallbackUrl, requested (with ``ErrorCode=11200``) when the
        voice webhook fails, as Twilio does. ``restore_audio`` is what the caller says on a restored stream
        (a caller whose line went quiet says "hello?"); ``restore_hold_open`` is called on that restored stream
        after it (e.g. to wait until the caller hears Kallglot again) before the listening and ``stop``.
        ``hold_sip`` is called while a ``<Dial><Sip>`` leg is up. ``patience_seconds``: after talking on each
        stream (and after ``hold_open``), the caller first waits up to that long, counted from the end of their
        talking, for something to come back, then listens (:mod:`app.devtools.simulator.caller`); each stream's
        wait is in ``result.waits``.
        """
        run = CallRun(self, to, from_, call_sid or new_sid("CA"), audio, pace=pace,
                       listen_seconds=listen_seconds, dtmf=dtmf, sign=sign, hold_open=hold_open)
        run.fallback_url, run.restore_audio, run.restore_hold_open = fallback_url, restore_audio, restore_hold_open
        run.hold_sip, run.patience_seconds = hold_sip, patience_seconds
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
        run = CallRun(self, to, from_, call_sid, audio, pace=pace, listen_seconds=listen_seconds, dtmf="",
                       sign=True, hold_open=hold_open, answer_url=answer_url, status_callback=status_callback)
        run.execute("normal" if status_callback else "none")
        return run.result
