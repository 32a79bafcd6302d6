"""Issue 12's faults, end to end over real sockets (bridge under gunicorn + gevent, Kallglot emulator, real Redis),
against fakes held to Telnyx's own definitions (the telnyx SDK's types, the AsyncAPI page)."""
from __future__ import annotations

import base64
import os
import signal
import threading

import pytest

from app.devtools.simulator.telnyx import TexmlCallSimulator
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.controls import finished_call
from tests.support.numbers import new_numbers
from tests.support.relays import relay_pid
from tests.support.servers import RunningServer
from tests.support.waiting import only_session, wait_until

pytestmark = pytest.mark.e2e


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
    result = texml.place_call(*new_numbers(), b"\xff" * 800, listen_seconds=2.0)
    speaker.join(timeout=5)
    leg = result.leg
    assert result.errors == [] and leg is not None and leg.protocol_errors == []
    heard = bytes(leg.heard)
    assert heard[:len(said)] == said, "silence was inserted into the speech"
    assert set(heard[len(said):]) <= {0xff} and len(heard) % 160 == 0 and len(heard) - len(said) < 160
    assert leg.marks_received  # the padded tail went out before the utterance's mark


@pytest.mark.parametrize("parameters_as", ["dropped", "list"])
def test_texml_relay_token_arrives_whatever_telnyx_does_with_parameters(texml: TexmlCallSimulator,
                                                                        emulator: EmulatorControl,
                                                                        parameters_as: str) -> None:
    """Fault 3: Telnyx's <Stream> page documents no <Parameter>; the token also travels in the documented url,
    and custom parameters are read as an object or as a list of name/value."""
    audio = bytes(range(1, 129)) * 10  # whole 20 ms frames
    result = texml.place_call(*new_numbers(), audio, listen_seconds=1.0, parameters_as=parameters_as)
    assert result.errors == [] and result.leg is not None and result.leg.protocol_errors == []
    assert result.leg.close_code is None and not result.leg.server_closed_first  # not refused: the caller hung up
    session = only_session(emulator)
    assert session["connections_total"] == 1
    assert base64.b64decode(session["audio_received"].get("customer", "")) == audio



def test_call_control_leg_in_a_codec_the_bridge_cannot_decode_gets_the_fallback(
        fake_call_control: FakeCallControl, emulator: EmulatorControl,
        telnyx_bridge_server: RunningServer) -> None:
    """Fault 5: a G722 leg (Telnyx transcodes PCMU<->PCMA only) is told why and hung up, not left silent."""
    call_id = fake_call_control.place_call(to=new_numbers().to, encoding="G722", sample_rate=16000,
                                           payload=base64.b64encode(b"\x00" * 640).decode(), listen_seconds=5)
    call = finished_call(fake_call_control, call_id)
    assert [c["action"] for c in call["commands"]] == ["answer", "streaming_start", "speak", "hangup"]
    assert call["commands"][1]["body"]["stream_codec"] == "PCMU"
    assert call["close_codes"] == [1003] and "not available" in call["spoken"][0]


def test_call_control_worker_killed_mid_call_the_stream_is_restored(
        fake_call_control: FakeCallControl, emulator: EmulatorControl,
        telnyx_bridge_server: RunningServer) -> None:
    """Item 8: the relay's worker is killed (SIGKILL) while the caller is on: the stream is started again into
    the same session on a live worker, with no speak and no hang-up from our side."""
    call_id = fake_call_control.place_call(to=new_numbers().to, payload=base64.b64encode(b"\x11" * 1600).decode(),
                                           listen_seconds=6)
    assert wait_until(lambda: emulator.sessions() and emulator.sessions()[0]["connections_live"] == 1, 15)
    os.kill(relay_pid(telnyx_bridge_server, call_id), signal.SIGKILL)
    assert wait_until(lambda: fake_call_control.call(call_id)["streams"] == 2, 20), fake_call_control.call(call_id)
    call = finished_call(fake_call_control, call_id, timeout=30)
    actions = [c["action"] for c in call["commands"]]
    log = [line for line in telnyx_bridge_server.log().splitlines() if call_id in line]
    assert actions == ["answer", "streaming_start", "streaming_start"], (actions, call["webhooks"], log[-30:])
    assert call["spoken"] == []
    session = only_session(emulator)
    assert session["connections_total"] == 2
    assert wait_until(lambda: emulator.session(session["id"])["status"] == "ended", 15)
    assert emulator.session(session["id"])["end_calls"] == 1
