"""The carrier's SIP side of a ``<Dial><Sip>`` or a Call Control ``transfer`` to a SIP URI, as the simulators
perform it against the Kallglot emulator's SIP endpoint (:mod:`app.devtools.emulator.sip`).

The URI's host is where the INVITE goes: the demo and the tests set ``KALLGLOT_SIP_DOMAIN`` to the emulator's
``host:port``, so ``sip:{session_id}@127.0.0.1:8765`` reaches it; ``sip.kallglot.com`` (the real one) is not
dialled from here and answers 503, as an unreachable SIP destination would.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import requests

SIP_URI = re.compile(r"^sip:(?P<user>[^@;>]+)@(?P<host>[^;>]+)")
#: The real Kallglot SIP domain: a simulator never sends it anything.
REAL_KALLGLOT_SIP_DOMAIN = "sip.kallglot.com"


@dataclass
class SipDial:
    """One SIP dial as the carrier saw it: the final SIP status and, when answered, the leg and audio heard."""

    uri: str
    sip_status: int
    reason: str = ""
    leg_id: str = ""
    heard: bytes = b""

    @property
    def answered(self) -> bool:
        """Whether the far end (Kallglot) took the call."""
        return self.sip_status == 200

    @property
    def dial_status(self) -> str:
        """The ``DialCallStatus`` Twilio/TeXML report for this dial's outcome (before its duration ended it)."""
        return "completed" if self.answered else "busy" if self.sip_status == 486 else "failed"


class SipDialer:
    """Dials SIP URIs at an emulated SIP endpoint (``gateway_url``: where every INVITE goes; default: the URI's
    host over HTTP)."""

    def __init__(self, gateway_url: str | None = None, timeout: float = 10.0) -> None:
        self.gateway_url = gateway_url.rstrip("/") if gateway_url else None
        self.timeout = timeout

    def _gateway(self, uri: str) -> str | None:
        match = SIP_URI.match(uri)
        if match is None or match["host"] == REAL_KALLGLOT_SIP_DOMAIN and not self.gateway_url:
            return None
        return self.gateway_url or f"http://{match['host']}"

    def dial(self, uri: str, *, from_: str, audio: bytes = b"") -> SipDial:
        """INVITE ``uri`` and, if answered, send the caller's μ-law ``audio`` (what comes back is in ``heard``)."""
        gateway = self._gateway(uri)
        if gateway is None:
            return SipDial(uri, 503, "service unavailable: no SIP endpoint for this URI in the simulation")
        try:
            response = requests.post(f"{gateway}/_emulator/sip/invite", timeout=self.timeout, json={
                "uri": uri, "from": from_, "payload": base64.b64encode(audio).decode()})
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            return SipDial(uri, 408, f"request timeout: {type(exc).__name__}")
        return SipDial(uri, int(body.get("sip_status", 500)), str(body.get("reason", "")),
                       leg_id=str(body.get("leg_id", "")), heard=base64.b64decode(body.get("heard") or ""))

    def hang_up(self, dial: SipDial) -> bool:
        """BYE an answered dial; True when the far end had already ended the session (it hung up first)."""
        gateway = self._gateway(dial.uri)
        if not dial.answered or gateway is None:
            return False
        try:
            response = requests.post(f"{gateway}/_emulator/sip/bye", json={"leg_id": dial.leg_id},
                                     timeout=self.timeout)
            return bool(response.json().get("session_ended_first"))
        except (requests.RequestException, ValueError):
            return False
