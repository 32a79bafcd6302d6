"""Telnyx number provisioning for the admin's "connect a number", with the telnyx SDK.

A Telnyx number routes through its connection: a TeXML application (voice URL + status callback) or a Call
Control application (webhook URL). Connecting points that application here, which affects every number on it.
``TELNYX_API_URL`` points the SDK at a local fake in tests.
"""
from __future__ import annotations

import itertools
import re
from typing import Any

import telnyx
from flask import url_for

from app.carriers.contract import CarrierError, CarrierNumber
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.control import LABEL, sdk_client
from app.config import Settings

#: Carrier REST calls run inside a page request: fail rather than hang.
API_TIMEOUT_SECONDS = 10.0
#: Numbers listed per account (a contact center has tens, not thousands).
MAX_NUMBERS = 500
TEXML, CALL_CONTROL = "texml", "call-control"

#: Telnyx application ids go into REST URL paths: digits, letters, '-' and '_' only.
APPLICATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TelnyxNumbers:
    """The Telnyx account's numbers (this carrier's :class:`~app.carriers.contract.NumberProvisioner`).

    A number's connect target is ``"<kind>/<application id>"``, ``kind`` being ``texml`` or ``call-control``.
    """

    missing_settings = "TELNYX_API_KEY"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def configured(self) -> bool:
        """Whether the Telnyx API key is set."""
        return bool(self.settings.telnyx_api_key)

    def wanted(self, kind: str) -> dict[str, str]:
        """The application settings that route a Telnyx number to this service."""
        public = self.settings.public
        if kind == TEXML:
            return {"voice_url": public(url_for("telnyx.texml_voice")), "voice_method": "post",
                    "status_callback": public(url_for("telnyx.texml_status")), "status_callback_method": "post"}
        return {"webhook_event_url": public(url_for("telnyx.call_control_webhook")), "webhook_api_version": "2"}

    def numbers(self) -> list[CarrierNumber]:
        """The numbers of the Telnyx account with the application each routes through."""
        try:
            client = self._client()
            apps: dict[str, tuple[str, Any]] = {}
            for kind, pages in ((TEXML, client.texml_applications.list(page_size=250)),
                                (CALL_CONTROL, client.call_control_applications.list(page_size=250))):
                apps.update({str(app.id): (kind, app) for app in itertools.islice(pages, MAX_NUMBERS)})
            found = list(itertools.islice(client.phone_numbers.list(page_size=250), MAX_NUMBERS))
        except telnyx.APIError as exc:
            raise CarrierError.of(LABEL, exc) from exc
        numbers = []
        for number in found:
            kind, app = apps.get(str(number.connection_id or ""), ("", None))
            if app is None:
                numbers.append(CarrierNumber(CARRIER, number.phone_number, number.connection_name or "", None,
                                             note="Not on a TeXML or Call Control application: assign one in the "
                                                  "Telnyx portal (Numbers › My Numbers › Connection), then reload."))
                continue
            wanted = self.wanted(kind)
            current = {name: str(getattr(app, name, None) or "") for name in wanted}
            name = app.friendly_name if kind == TEXML else app.application_name
            numbers.append(CarrierNumber(CARRIER, number.phone_number, f"{name or app.id} ({kind})",
                                         f"{kind}/{app.id}", current, wanted,
                                         "Connecting updates the application, so every number on it follows."))
        return numbers

    def connect(self, target: str) -> dict[str, str]:
        """Point the application ``target`` (``"texml/<id>"`` or ``"call-control/<id>"``) at this service."""
        kind, _, app_id = target.partition("/")
        if kind not in (TEXML, CALL_CONTROL) or not APPLICATION_ID.match(app_id):  # a URL path segment
            raise CarrierError(f"{LABEL}: unknown application {target!r}")
        wanted = self.wanted(kind)
        try:
            client = self._client()
            if kind == TEXML:
                app = client.texml_applications.retrieve(app_id).data
                # The update call requires the name; resend the current one unchanged.
                client.texml_applications.update(app_id, friendly_name=str(app.friendly_name if app else app_id),
                                                 **wanted)
            else:
                app = client.call_control_applications.retrieve(app_id).data
                client.call_control_applications.update(
                    app_id, application_name=str(app.application_name if app else app_id), **wanted)
        except telnyx.APIError as exc:
            raise CarrierError.of(LABEL, exc) from exc
        return wanted

    def _client(self) -> telnyx.Telnyx:
        return sdk_client(self.settings, timeout=API_TIMEOUT_SECONDS)
