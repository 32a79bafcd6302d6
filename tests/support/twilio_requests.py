"""Twilio webhook requests to an in-process bridge (Flask test client), signed as Twilio signs them."""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

from flask.testing import FlaskClient

from tests.support.controls import EmulatorControl
from tests.support.settings import PUBLIC_URL, TWILIO_ACCOUNT_SID, twilio_signature

#: The numbers of in-process webhook tests (each test has a Redis namespace of its own, so they cannot leak).
TO, FROM = "+15005550006", "+15551230000"


def new_call_sid() -> str:
    """A fresh Twilio call SID."""
    return "CA" + uuid.uuid4().hex


def call_params(call_sid: str, **extra: str) -> dict[str, str]:
    """The form parameters of Twilio's inbound voice webhook for ``call_sid`` (``extra`` overrides)."""
    return {"CallSid": call_sid, "AccountSid": TWILIO_ACCOUNT_SID, "From": FROM, "To": TO,
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", **extra}


def post_signed(client: FlaskClient, path: str, params: dict[str, str], *, signature: str | None = None,
                base: str = PUBLIC_URL):
    """POST ``params`` to ``path`` with Twilio's signature over ``base + path`` (or ``signature``)."""
    sig = twilio_signature(base + path, params) if signature is None else signature
    return client.post(path, data=params, headers={"X-Twilio-Signature": sig})


def answer(client: FlaskClient, call_sid: str) -> ET.Element:
    """Post the voice webhook for ``call_sid`` and return the TwiML it answered with."""
    response = post_signed(client, "/twilio/voice", call_params(call_sid))
    assert response.status_code == 200 and response.mimetype == "text/xml"
    return ET.fromstring(response.data)


def start_call(client: FlaskClient, emulator: EmulatorControl) -> tuple[str, str]:
    """Answer a simulated Twilio call; returns (call SID, Kallglot session id)."""
    call_sid = new_call_sid()
    answer(client, call_sid)
    session_id = next(s["id"] for s in emulator.sessions() if s["metadata"].get("twilio_call_sid") == call_sid)
    return call_sid, session_id


def hang_up(client: FlaskClient, call_sid: str) -> None:
    """The call's final status callback (completed), signed as Twilio signs it."""
    response = post_signed(client, "/twilio/status", call_params(call_sid, CallStatus="completed",
                                                                 CallDuration="3"))
    assert response.status_code in (200, 204)
