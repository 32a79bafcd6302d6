""""Connect a number": list the numbers in the configured Twilio and Telnyx accounts and point them here.

Twilio: each number's voice URL, fallback URL and status callback (``incoming_phone_numbers(sid).update``).
Telnyx: a number routes through its connection, a TeXML application (voice URL + status callback) or a Call
Control application (webhook URL); connecting points that application here, which affects every number on it.
The REST base URLs come from ``TWILIO_API_URL`` / ``TELNYX_API_URL`` so tests can use local fakes.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import requests
import telnyx
from twilio.base.exceptions import TwilioException
from twilio.rest import Client as TwilioClient

from app.config import Settings
from app.carriers.twilio.control import rest_client

#: Ids that go into carrier REST URL paths (an admin-typed ``x%3FFriendlyName=1`` must never become a query).
TWILIO_NUMBER_SID = re.compile(r"^PN[0-9a-fA-F]{32}$")
TELNYX_APPLICATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Carrier REST calls run inside a page request: fail rather than hang.
CARRIER_TIMEOUT_SECONDS = 10.0
#: Numbers listed per account (a contact center has tens, not thousands).
MAX_NUMBERS = 500
TELNYX_TEXML, TELNYX_CALL_CONTROL = "texml", "call-control"


class CarrierError(RuntimeError):
    """A carrier API call failed; the message is safe to show to the admin."""


@dataclass(frozen=True)
class CarrierNumber:
    """A number in a carrier account, what it points at now and what connecting would set."""

    carrier: str
    number: str
    label: str
    #: What the connect button posts: a Twilio ``PN…`` SID, or a Telnyx application id (None: cannot connect).
    target: str | None
    target_kind: str = ""
    current: dict[str, str] = field(default_factory=dict)
    wanted: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def points_here(self) -> bool:
        """Whether every wanted setting is already in place."""
        return bool(self.wanted) and all(self.current.get(k, "").lower() == v.lower() for k, v in self.wanted.items())


# -- Twilio ------------------------------------------------------------------------------------------------

def twilio_configured(settings: Settings) -> bool:
    """Whether the Twilio account credentials are set."""
    return bool(settings.twilio_account_sid and settings.twilio_auth_token)


def _twilio_client(settings: Settings) -> TwilioClient:
    return rest_client(settings, timeout=CARRIER_TIMEOUT_SECONDS)


def twilio_wanted(settings: Settings) -> dict[str, str]:
    """The voice settings that route a Twilio number to this service."""
    return {"voice_url": settings.public("/twilio/voice"), "voice_method": "POST",
            "voice_fallback_url": settings.public("/twilio/fallback"),
            "status_callback": settings.public("/twilio/status"), "status_callback_method": "POST"}


def twilio_numbers(settings: Settings) -> list[CarrierNumber]:
    """The numbers of the Twilio account with their current voice settings."""
    try:
        found = _twilio_client(settings).incoming_phone_numbers.list(limit=MAX_NUMBERS)
    except (TwilioException, requests.RequestException) as exc:
        raise CarrierError(f"Twilio: {_short(exc)}") from exc
    wanted = twilio_wanted(settings)
    numbers = []
    for number in found:
        current = {name: str(getattr(number, name, None) or "") for name in wanted}
        note = (f"Uses TwiML app {number.voice_application_sid}, which overrides these URLs; connecting removes it."
                if getattr(number, "voice_application_sid", None) else "")
        numbers.append(CarrierNumber("twilio", str(number.phone_number), str(number.friendly_name or ""),
                                     str(number.sid), "number", current, wanted, note))
    return numbers


def connect_twilio(settings: Settings, number_sid: str) -> dict[str, str]:
    """Point Twilio number ``number_sid`` at this service; returns the settings written."""
    if not TWILIO_NUMBER_SID.match(number_sid or ""):  # it becomes a REST URL path segment
        raise CarrierError("Twilio: not a phone number SID (PN followed by 32 hex digits)")
    wanted = twilio_wanted(settings)
    try:
        # An empty voice_application_sid detaches a TwiML app, which would otherwise override the URLs.
        _twilio_client(settings).incoming_phone_numbers(number_sid).update(voice_application_sid="", **wanted)
    except (TwilioException, requests.RequestException) as exc:
        raise CarrierError(f"Twilio: {_short(exc)}") from exc
    return wanted


# -- Telnyx ------------------------------------------------------------------------------------------------

def telnyx_configured(settings: Settings) -> bool:
    """Whether the Telnyx API key is set."""
    return bool(settings.telnyx_api_key)


def _telnyx_client(settings: Settings) -> telnyx.Telnyx:
    return telnyx.Telnyx(api_key=settings.telnyx_api_key, base_url=settings.telnyx_api_url,
                         timeout=CARRIER_TIMEOUT_SECONDS, max_retries=1)


def telnyx_wanted(settings: Settings, kind: str) -> dict[str, str]:
    """The application settings that route a Telnyx number to this service."""
    if kind == TELNYX_TEXML:
        return {"voice_url": settings.public("/telnyx/texml"), "voice_method": "post",
                "status_callback": settings.public("/telnyx/texml/status"), "status_callback_method": "post"}
    return {"webhook_event_url": settings.public("/telnyx/call-control"), "webhook_api_version": "2"}


def telnyx_numbers(settings: Settings) -> list[CarrierNumber]:
    """The numbers of the Telnyx account with the application each routes through."""
    try:
        client = _telnyx_client(settings)
        apps: dict[str, tuple[str, Any]] = {}
        for kind, pages in ((TELNYX_TEXML, client.texml_applications.list(page_size=250)),
                            (TELNYX_CALL_CONTROL, client.call_control_applications.list(page_size=250))):
            apps.update({str(app.id): (kind, app) for app in itertools.islice(pages, MAX_NUMBERS)})
        found = list(itertools.islice(client.phone_numbers.list(page_size=250), MAX_NUMBERS))
    except telnyx.APIError as exc:
        raise CarrierError(f"Telnyx: {_short(exc)}") from exc
    numbers = []
    for number in found:
        kind, app = apps.get(str(number.connection_id or ""), ("", None))
        if app is None:
            numbers.append(CarrierNumber("telnyx", number.phone_number, number.connection_name or "", None,
                                         note="Not on a TeXML or Call Control application: assign one in the "
                                              "Telnyx portal (Numbers › My Numbers › Connection), then reload."))
            continue
        wanted = telnyx_wanted(settings, kind)
        current = {name: str(getattr(app, name, None) or "") for name in wanted}
        name = app.friendly_name if kind == TELNYX_TEXML else app.application_name
        numbers.append(CarrierNumber("telnyx", number.phone_number, f"{name or app.id} ({kind})", str(app.id),
                                     kind, current, wanted,
                                     "Connecting updates the application, so every number on it follows."))
    return numbers


def connect_telnyx(settings: Settings, kind: str, app_id: str) -> dict[str, str]:
    """Point Telnyx application ``app_id`` (``texml`` or ``call-control``) at this service; returns what was set."""
    if not TELNYX_APPLICATION_ID.match(app_id or ""):  # it becomes a REST URL path segment
        raise CarrierError("Telnyx: not an application id")
    wanted = telnyx_wanted(settings, kind)
    try:
        client = _telnyx_client(settings)
        if kind == TELNYX_TEXML:
            app = client.texml_applications.retrieve(app_id).data
            # The update call requires the name; resend the current one unchanged.
            client.texml_applications.update(app_id, friendly_name=str(app.friendly_name if app else app_id),
                                             **wanted)
        elif kind == TELNYX_CALL_CONTROL:
            app = client.call_control_applications.retrieve(app_id).data
            client.call_control_applications.update(
                app_id, application_name=str(app.application_name if app else app_id), **wanted)
        else:
            raise CarrierError(f"Telnyx: unknown application kind {kind!r}")
    except telnyx.APIError as exc:
        raise CarrierError(f"Telnyx: {_short(exc)}") from exc
    return wanted


def _short(exc: Exception) -> str:
    # Carrier errors can be long HTML pages; keep one readable line (they never echo credentials).
    return " ".join(str(exc).split())[:300] or type(exc).__name__
