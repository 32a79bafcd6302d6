"""Issue 12's faults, end to end over real sockets (bridge under gunicorn + gevent, Kallglot emulator, real Redis),
against fakes held to Telnyx's own definitions (the telnyx SDK's types, the AsyncAPI page)."""
from __future__ import annotations

import base64
import threading

import pytest

from app.devtools.simulator.telnyx import TexmlCallSimulator
from tests.conftest import EmulatorControl
from tests.support.servers import RunningServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e
TO, FROM = "+15005550006", "+15551230000"


@pytest.fixture
def texml(telnyx_bridge_server: RunningServer, telnyx_signer) -> TexmlCallSimulator:
    return TexmlCallSimulator(telnyx_bridge_server.url, telnyx_signer)


def audio_output(chunk: bytes, sequence: int) -> dict[str, object]:
    return {"type": "audio.output", "sequence": sequence,
            "audio": {"encoding": "mulaw", "sample_rate_hz": 8000, "payload": base64.b64encode(chunk).decode()}}


def test_texml_odd_sized_return_audio_plays_without_inserted_silence(texml: TexmlCallSimulator,
                                                                     emulator: EmulatorControl) -> None:
    """Fault 4: Kallglot chunks of 159/161 bytes (a resampler's output) reach the caller as whole 20 ms frames,
    the speech intact; silence pads only the utterance's end, before its mark."""
    emulator.behaviour("silent")
    speech = bytes(range(1, 128)) * 30  # no 0xff (μ-law silence) anywhere
    sizes = [159, 161] * 7 + [7, 313]
    assert sum(sizes) <= len(speech)
    said = speech[:sum(sizes)]

    def speak() -> None:
        session = wait_until(lambda: [s for s in emulator.sessions() if s["connections_live"] == 1], 8)
        offset, messages = 0, []
        for sequence, size in enumerate(sizes, start=1):
            messages.append(audio_output(said[offset:offset + size], sequence))
            offset += size
        emulator.send(session[0]["id"], *messages)

    speaker = threading.Thread(target=speak, daemon=True)
    speaker.start()
    result = texml.place_call(TO, FROM, b"\xff" * 800, listen_seconds=2.0)
    speaker.join(timeout=5)
    leg = result.leg
    assert result.errors == [] and leg is not None and leg.protocol_errors == []
    heard = bytes(leg.heard)
    assert heard[:len(said)] == said, "silence was inserted into the speech"
    assert set(heard[len(said):]) <= {0xff} and len(heard) % 160 == 0 and len(heard) - len(said) < 160
    assert leg.marks_received  # the padded tail went out before the utterance's mark
