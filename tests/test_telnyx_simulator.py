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
