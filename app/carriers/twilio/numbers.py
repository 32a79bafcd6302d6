"""Twilio number provisioning for the admin's "connect a number": list the account's numbers and point one's
voice URL, fallback URL and status callback here (``incoming_phone_numbers(sid).update``), with the twilio
library. ``TWILIO_API_URL`` points it at a local fake in tests.
"""
from __future__ import annotations

import re

import requests
from flask import url_for
from twilio.base.exceptions import TwilioException
from twilio.rest import Client

from app.carriers.contract import CarrierError, CarrierNumber
from app.carriers.twilio import CARRIER
from app.carriers.twilio.control import LABEL, rest_client
from app.config import Settings

#: Carrier REST calls run inside a page request: fail rather than hang.
API_TIMEOUT_SECONDS = 10.0
#: Twilio phone number SIDs: the only thing that may go into ``IncomingPhoneNumbers/{sid}``.
NUMBER_SID = re.compile(r"^PN[0-9a-fA-F]{32}$")
#: Numbers listed per account (a contact center has tens, not thousands).
MAX_NUMBERS = 500


class TwilioNumbers:
    """The Twilio account's numbers (this carrier's :class:`~app.carriers.contract.NumberProvisioner`)."""

    missing_settings = "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def configured(self) -> bool:
        """Whether the Twilio account credentials are set."""
        return bool(self.settings.twilio_account_sid and self.settings.twilio_auth_token)

    def wanted(self) -> dict[str, str]:
        """The voice settings that route a Twilio number to this service."""
        public = self.settings.public
        return {"voice_url": public(url_for("twilio.voice")), "voice_method": "POST",
                "voice_fallback_url": public(url_for("twilio.fallback")),
                "status_callback": public(url_for("twilio.call_status")), "status_callback_method": "POST"}

    def numbers(self) -> list[CarrierNumber]:
        """The numbers of the Twilio account with their current voice settings."""
        try:
            found = self._client().incoming_phone_numbers.list(limit=MAX_NUMBERS)
        except (TwilioException, requests.RequestException) as exc:
            raise CarrierError.of(LABEL, exc) from exc
        wanted = self.wanted()
        numbers = []
        for number in found:
            current = {name: str(getattr(number, name, None) or "") for name in wanted}
            note = (f"Uses TwiML app {number.voice_application_sid}, which overrides these URLs; connecting removes "
                    "it." if getattr(number, "voice_application_sid", None) else "")
            numbers.append(CarrierNumber(CARRIER, str(number.phone_number), str(number.friendly_name or ""),
                                         str(number.sid), current, wanted, note))
        return numbers

    def connect(self, target: str) -> dict[str, str]:
        """Point Twilio number ``target`` (its ``PN…`` SID) at this service; returns the settings written."""
        if not NUMBER_SID.match(target or ""):  # it becomes a REST URL path segment, never a query string
            raise CarrierError(f"{LABEL}: not a phone number SID (PN followed by 32 hex digits)")
        wanted = self.wanted()
        try:
            # An empty voice_application_sid detaches a TwiML app, which would otherwise override the URLs.
            self._client().incoming_phone_numbers(target).update(voice_application_sid="", **wanted)
        except (TwilioException, requests.RequestException) as exc:
            raise CarrierError.of(LABEL, exc) from exc
        return wanted

    def _client(self) -> Client:
        return rest_client(self.settings, timeout=API_TIMEOUT_SECONDS)
