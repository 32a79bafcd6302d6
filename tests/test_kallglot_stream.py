"""The relay's Kallglot stream socket against the emulator's real stream endpoint."""
from __future__ import annotations

import base64
import gc

import pytest

from app.kallglot import stream_protocol
from app.kallglot.client import KallglotClient
from app.kallglot.stream_protocol import AudioOutput, Informational, SessionEnded
from app.kallglot.stream import KallglotStream, KallglotStreamError
from tests.support.controls import EmulatorControl
from tests.support.settings import EMULATOR_API_KEY


def next_of(stream: KallglotStream, kind: type, attempts: int = 10):
    for _ in range(attempts):
        message = stream.receive(timeout=5)
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.__name__}")


def test_ready_keepalive_audio_and_end(emulator: EmulatorControl) -> None:
    session = KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                                 idempotency_key="stream-1")
    stream = KallglotStream.open(session.stream.url, session.stream.token)
    try:
        assert next_of(stream, Informational).type == "session.ready"
        stream.ping()  # the relay's keepalive
        assert next_of(stream, Informational).type == "pong"
        stream.send(stream_protocol.audio_input(base64.b64encode(b"\x11" * 800).decode(), sequence=1,
                                                timestamp_ms=0, speaker="customer"))
        assert next_of(stream, AudioOutput).payload == b"\x11" * 800
        stream.send('{"type": "session.end"}')
        assert next_of(stream, SessionEnded).reason == "explicit_end"
    finally:
        stream.close()
    assert emulator.session(session.id)["audio_received"]["customer"] == base64.b64encode(b"\x11" * 800).decode()


# simple-websocket's Client leaves its socket to the garbage collector when the TCP connect is refused.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_refused_connect_is_an_error_that_never_shows_the_token(emulator: EmulatorControl) -> None:
    session = KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                                 idempotency_key="stream-2")
    stream = KallglotStream.open(session.stream.url, "kst_test_wrong")
    # The emulator accepts, says why, and closes (1008): the relay sees the error, then the close.
    message = stream.receive(timeout=5)
    assert getattr(message, "code", "") == "invalid_token"
    stream.close()
    with pytest.raises(KallglotStreamError) as raised:
        KallglotStream.open("ws://127.0.0.1:1/v1/sessions/x/connect", "kst_test_secret", timeout=2)
    assert "kst_test_secret" not in str(raised.value)
    del raised
    gc.collect()  # collect the library's orphaned socket here, under this test's warning filter
