"""The relay core's downlink and its failure paths in-process, over a real Kallglot stream socket (the emulator
pushes the messages; the carrier side is scripted): every kind of Kallglot message, a carrier that is gone, and
bugs in either direction ending the call cleanly instead of crashing the worker."""
from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator

import pytest
from simple_websocket import ConnectionClosed

from app.kallglot import stream_protocol
from app.kallglot.client import KallglotClient, KallglotSession
from app.kallglot.stream import KallglotStream
from app.kallglot.stream_protocol import Transcript
from app.relay.core import MediaRelay, RelayEnd
from tests.support.controls import EmulatorControl
from tests.support.scripted_carrier import ScriptedCarrier, run_relay, started_codec
from tests.support.settings import EMULATOR_API_KEY
from tests.support.waiting import wait_until

#: 20 ms of μ-law 8 kHz: what one ``audio.output`` in the stream's own format carries.
MULAW_20MS = bytes(range(0x20, 0x20 + 160))


def audio_output(payload: bytes, encoding: str = "mulaw", rate: int = 8000) -> dict:
    return {"type": "audio.output", "audio": {"encoding": encoding, "sample_rate_hz": rate,
                                              "payload": base64.b64encode(payload).decode()}}


@pytest.fixture
def session(emulator: EmulatorControl) -> KallglotSession:
    emulator.behaviour("silent")  # only what the test pushes comes back
    return KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                             idempotency_key="relay-downlink")


@pytest.fixture
def carrier() -> Iterator[ScriptedCarrier]:
    scripted = ScriptedCarrier()
    yield scripted
    scripted.connected = False


def open_stream(session: KallglotSession) -> KallglotStream:
    return KallglotStream.open(session.stream.url, session.stream.token)


def close_codes_once_closed(emulator: EmulatorControl, session_id: str) -> list[int | None]:
    assert wait_until(lambda: emulator.session(session_id)["connections_live"] == 0, timeout=10)
    return [conn["close_code"] for conn in emulator.session(session_id)["connections"]]


def push(emulator: EmulatorControl, session_id: str, *messages: dict) -> None:
    """Push ``messages`` once the relay's stream is connected (1 connection got them)."""
    assert wait_until(lambda: emulator.session(session_id)["connections_live"] == 1, timeout=10)
    assert emulator.send(session_id, *messages) == 1


def test_every_kind_of_kallglot_message_is_played_marked_cleared_forwarded_or_ignored(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier,
        caplog: pytest.LogCaptureFixture) -> None:
    transcripts: list[Transcript] = []
    health: list[dict[str, float]] = []
    ended: list[tuple[RelayEnd, str]] = []
    relay = MediaRelay(carrier, started_codec(), open_stream(session), speaker="customer", chunk_ms=100,
                       context="test", on_transcript=transcripts.append, on_health=health.append,
                       on_end=lambda end, reason: ended.append((end, reason)))
    thread, ends = run_relay(relay)
    caplog.set_level(logging.INFO, logger="app.relay.core")
    # One utterance, then silence: its audio is played, then a mark follows it (after the utterance gap).
    push(emulator, session.id, audio_output(MULAW_20MS), audio_output(b"\x00" * 64, encoding="opus", rate=48000),
         audio_output(b"\x00" * 64, encoding="opus", rate=48000),
         {"type": "transcript.final", "id": "t1", "speaker": "customer", "language": "en", "text": "hello",
          "translation": {"language": "es", "text": "hola"}},
         {"type": "session.error", "error": {"code": "rate_limited", "message": "slow down"}},
         {"type": "something.new"}, {"type": "something.new"}, {"type": "session.ready"})
    assert wait_until(lambda: carrier.events("mark"), timeout=10), carrier.sent
    (mark,) = carrier.events("mark")
    assert [base64.b64decode(m["media"]["payload"]) for m in carrier.events("media")] == [MULAW_20MS]
    carrier.mark_played(mark["mark"]["name"])  # playback reached it: the lag is reported to the live console
    assert wait_until(lambda: any("playback_lag_ms" in h for h in health), timeout=10), health
    # Barge-in, then Kallglot ends the session with a reason.
    push(emulator, session.id, {"type": "audio.clear"}, {"type": "session.ended", "reason": "max_duration"})
    thread.join(timeout=15)
    assert ends == [RelayEnd.KALLGLOT_ENDED] and ended == [(RelayEnd.KALLGLOT_ENDED, "max_duration")]
    assert len(carrier.events("clear")) == 1 and carrier.close_code == 1000
    assert [(t.text, t.translation, t.final) for t in transcripts] == [("hello", "hola", True)]
    stats = relay.stats
    assert (stats.frames_to_carrier, stats.marks_sent, stats.clears) == (1, 1, 1)
    assert dict(stats.unknown_kallglot) == {"something.new": 2}
    # The unplayable format is dropped and said once; Kallglot's error is logged, not fatal.
    assert sum("unsupported format" in r.getMessage() for r in caplog.records) == 1
    assert any("session.error rate_limited" in r.getMessage() for r in caplog.records)
    assert close_codes_once_closed(emulator, session.id) == [1000]


class GoneCarrier(ScriptedCarrier):
    """A carrier socket whose peer has gone: every send fails, as simple-websocket's does."""

    def send(self, data: str | bytes) -> None:
        raise ConnectionClosed(1006, "gone")


def test_a_carrier_gone_while_kallglot_speaks_ends_the_relay_as_carrier_lost(
        emulator: EmulatorControl, session: KallglotSession) -> None:
    carrier = GoneCarrier()
    ended: list[RelayEnd] = []
    relay = MediaRelay(carrier, started_codec(), open_stream(session), speaker="customer", chunk_ms=100,
                       context="test", on_end=lambda end, _: ended.append(end))
    thread, ends = run_relay(relay)
    push(emulator, session.id, audio_output(MULAW_20MS))
    thread.join(timeout=15)
    assert ends == ended == [RelayEnd.CARRIER_LOST]
    assert close_codes_once_closed(emulator, session.id) == [1000]  # Kallglot still sees a normal close


def test_a_failing_end_hook_still_closes_both_sockets(emulator: EmulatorControl, session: KallglotSession,
                                                     carrier: ScriptedCarrier,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def record_end(end: RelayEnd, reason: str) -> None:
        raise RuntimeError("state store bug")

    relay = MediaRelay(carrier, started_codec(), open_stream(session), speaker="customer", chunk_ms=100,
                       context="test", on_end=record_end)
    thread, ends = run_relay(relay)
    carrier.media(MULAW_20MS)
    carrier.stop()
    thread.join(timeout=15)
    assert ends == [RelayEnd.CARRIER_STOP] and carrier.close_code == 1000
    assert any("recording the relay's end failed" in r.getMessage() for r in caplog.records)
    assert close_codes_once_closed(emulator, session.id) == [1000]
    assert base64.b64decode(emulator.session(session.id)["audio_received"]["customer"]) == MULAW_20MS


class BrokenCodec:
    """The product's codec with a bug in its frame parser (the uplink must end the call, not the worker)."""

    def __init__(self) -> None:
        self._codec = started_codec()
        self.carrier = self._codec.carrier

    def __getattr__(self, name: str):
        return getattr(self._codec, name)

    def parse(self, raw: str | bytes):
        raise RuntimeError("parser bug")


def test_a_bug_in_the_uplink_ends_the_call_as_a_protocol_error(emulator: EmulatorControl, session: KallglotSession,
                                                              carrier: ScriptedCarrier) -> None:
    relay = MediaRelay(carrier, BrokenCodec(), open_stream(session), speaker="customer", chunk_ms=100,
                       context="test")
    thread, ends = run_relay(relay)
    carrier.media(MULAW_20MS)
    thread.join(timeout=15)
    assert ends == [RelayEnd.PROTOCOL_ERROR] and not carrier.connected
    assert close_codes_once_closed(emulator, session.id) == [1000]


def test_a_bug_in_the_downlink_ends_the_call_as_a_protocol_error(emulator: EmulatorControl,
                                                                session: KallglotSession,
                                                                carrier: ScriptedCarrier) -> None:
    def on_transcript(message: Transcript) -> None:
        raise RuntimeError("console bug")

    relay = MediaRelay(carrier, started_codec(), open_stream(session), speaker="customer", chunk_ms=100,
                       context="test", on_transcript=on_transcript)
    thread, ends = run_relay(relay)
    push(emulator, session.id, {"type": "transcript.partial", "speaker": "customer", "text": "hel"})
    thread.join(timeout=15)
    assert ends == [RelayEnd.PROTOCOL_ERROR] and not carrier.connected
    assert close_codes_once_closed(emulator, session.id) == [1000]
