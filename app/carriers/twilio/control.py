"""Twilio call control through the twilio library: hang up a leg, dial an outbound leg, redirect a live call.

This is Twilio's :class:`app.carriers.contract.CarrierControl`. ``TWILIO_API_URL`` points the library at
another base URL (tests and the demo use a local fake of Twilio's REST API).
"""
from __future__ import annotations

import logging
import re

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from app.carriers.contract import CarrierError, CarrierNotConfigured
from app.carriers.twilio import CARRIER
from app.config import Settings

log = logging.getLogger(__name__)

LABEL = "Twilio"

#: REST calls sit on webhook and relay paths: fail fast.
API_TIMEOUT_SECONDS = 5.0
#: Twilio's answers for "that call is not there / not in progress any more".
CALL_GONE_CODES = frozenset({20404, 21220})
#: Twilio call SIDs: "CA" + 32 hex digits.
CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")


def rest_client(settings: Settings, timeout: float = API_TIMEOUT_SECONDS) -> Client:
    """A twilio REST client for the configured account, honouring ``TWILIO_API_URL``."""
    client = Client(settings.twilio_account_sid, settings.twilio_auth_token,
                    http_client=TwilioHttpClient(timeout=timeout))
    client.api.base_url = settings.twilio_api_url.rstrip("/")
    return client


class TwilioControl:
    """Hang-ups and outbound dials for one app; the REST client is built on first use."""

    carrier = CARRIER

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The REST client (needs ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN``)."""
        if self._client is None:
            if not (self.settings.twilio_account_sid and self.settings.twilio_auth_token):
                raise CarrierNotConfigured(f"{LABEL}: TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are needed for call control")
            self._client = rest_client(self.settings)
        return self._client

    def hang_up(self, call_id: str) -> None:
        """End a live call (``Status=completed``); a call that already ended is not an error.
        Raises :class:`CarrierError`."""
        if not CALL_SID.match(call_id or ""):  # it goes into the REST URL path: never anything but a SID
            raise ValueError(f"not a Twilio call SID: {str(call_id)[:40]!r}")
        try:
            self.client.calls(call_id).update(status="completed")
        except TwilioRestException as exc:
            if exc.status != 404 and exc.code not in CALL_GONE_CODES:
                raise CarrierError.of(LABEL, exc) from exc
            log.info("twilio call=%s already gone at hang-up (%s)", call_id, exc.code or exc.status)
        except (TwilioException, requests.RequestException) as exc:
            raise CarrierError.of(LABEL, exc) from exc

    def redirect(self, call_id: str, twiml: str) -> None:
        """Replace a live call's TwiML (Twilio stops its current verb — a stream sends ``stop`` — and runs
        ``twiml``). Raises :class:`CarrierError`, also when the call is already over."""
        if not CALL_SID.match(call_id or ""):
            raise ValueError(f"not a Twilio call SID: {str(call_id)[:40]!r}")
        try:
            self.client.calls(call_id).update(twiml=twiml)
        except (TwilioException, requests.RequestException) as exc:
            raise CarrierError.of(LABEL, exc) from exc

    def dial(self, *, to: str, from_: str, session_id: str, speaker: str) -> str:
        """Place an outbound call; when answered, Twilio asks ``/twilio/outbound-answer`` for its TwiML.

        The leg's session and speaker are looked up there by its CallSid (registered by the caller of this
        method), so nothing about the session travels in the URL. Raises :class:`CarrierError`.
        """
        try:
            call = self.client.calls.create(
                to=to, from_=from_, url=self.settings.public("/twilio/outbound-answer"), method="POST",
                status_callback=self.settings.public("/twilio/status"), status_callback_method="POST",
                status_callback_event=["initiated", "ringing", "answered", "completed"])
        except (TwilioException, requests.RequestException) as exc:
            raise CarrierError.of(LABEL, exc) from exc
        log.info("twilio call=%s dialled %s as %s for session=%s", call.sid, to, speaker, session_id)
        return str(call.sid)
