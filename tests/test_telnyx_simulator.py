"""The Telnyx simulator's CLI helpers and signer (the e2e tests drive the rest)."""
from __future__ import annotations

import base64

import pytest
from telnyx.lib.webhook_verification import verify_webhook_signature

from app.devtools.simulator.audio import speech_like_tone
from app.devtools.simulator.telnyx import TelnyxSigner
from app.devtools.simulator.telnyx_cli import caller_audio, main


def test_public_key_command_prints_the_demo_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["public-key"]) == 0
    key = capsys.readouterr().out.strip()
    assert key == TelnyxSigner().public_key and len(base64.b64decode(key)) == 32


def test_signer_signs_as_telnyx_does() -> None:
    signer, body = TelnyxSigner(), "CallSid=v3%3Aabc&To=%2B1"
    verify_webhook_signature(body, signer.headers(body), signer.public_key)  # raises on failure


@pytest.mark.parametrize("codec, rate, size", [("PCMU", 8000, 8000), ("PCMA", 8000, 8000), ("L16", 16000, 32000)])
def test_caller_audio_in_each_codec(codec: str, rate: int, size: int) -> None:
    payload, got_rate = caller_audio(speech_like_tone(1.0), codec)
    assert got_rate == rate and abs(len(payload) - size) <= 4


def test_each_flow_calls_the_demo_number_on_its_own_application_by_default() -> None:
    """README "Transports": switching +15005550106 (TeXML app) or +15005550107 (Call Control app) must change what
    ``telnyx_cli texml`` / ``call-control`` do, so each calls its own application's number, not a Twilio one."""
    from app.devtools.simulator.number_apis import DEMO_CALL_CONTROL_APP_ID, DEMO_TEXML_APP_ID, demo_telnyx_seed
    from app.devtools.simulator.telnyx_cli import demo_number

    on_app = {n["connection_id"]: n["phone_number"] for n in demo_telnyx_seed("")["phone_numbers"]}
    assert demo_number("texml") == on_app[DEMO_TEXML_APP_ID] == "+15005550106"
    assert demo_number("call-control") == on_app[DEMO_CALL_CONTROL_APP_ID] == "+15005550107"


def test_a_texml_calls_audio_heard_on_its_sip_dial_counts_as_heard() -> None:
    """A ``sip`` number's TeXML call is a ``<Dial><Sip>`` leg, not a stream: what Kallglot said there is what the
    caller heard (the CLI's success test and its heard.wav)."""
    from app.devtools.simulator.sip import SipDial
    from app.devtools.simulator.telnyx import TexmlCallResult

    result = TexmlCallResult(call_sid="v3:test")
    result.sip_dials.append(SipDial("sip:sess_1@127.0.0.1:1", 200, heard=b"\x01\x02"))
    assert result.heard == b"\x01\x02"
