"""In-process browser-agent tests' shared step: a simulated Twilio customer calls the number under test and the
bridge offers the call to browser agents (the number's profile is the test's to set first)."""
from __future__ import annotations

from flask import Flask

from app.calls.agent import dial_agent_if_configured
from app.extensions import services
from tests.support.controls import EmulatorControl
from tests.support.twilio_requests import answer, new_call_sid


def offer_a_call(app: Flask, emulator: EmulatorControl) -> tuple[str, str]:
    """Answer a new customer call on ``app`` and run the agent step the relay runs once the customer's stream
    starts (the profile's browser agents are offered the call); returns (session id, customer call sid)."""
    call_sid = new_call_sid()
    answer(app.test_client(), call_sid)
    (session,) = emulator.sessions()
    with app.app_context():
        dial_agent_if_configured(services(), session["id"], "twilio", call_sid)
    return session["id"], call_sid
