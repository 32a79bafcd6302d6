"""The uplink's hold: after a full chunk went to Kallglot, the carrier socket is left unread for the chunk's length
less a margin, so the next chunk's frames are taken in fewer wake-ups (README, Capacity) — without losing,
reordering or delaying the end of anything.

The carrier side is the scripted socket (real Twilio frames, the product's codec); the Kallglot side is real.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest

from app.kallglot.client import KallglotClient, KallglotSession
from app.kallglot.stream import KallglotStream
from app.relay.core import MediaRelay, RelayEnd
from tests.support.controls import EmulatorControl
from tests.support.scripted_carrier import ScriptedCarrier, run_relay, started_codec
from tests.support.settings import EMULATOR_API_KEY
from tests.support.waiting import wait_until


@pytest.fixture
def session(emulator: EmulatorControl) -> KallglotSession:
    return KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                             idempotency_key="uplink-hold")


@pytest.fixture
def carrier() -> Iterator[ScriptedCarrier]:
    scripted = ScriptedCarrier()
    yield scripted
    scripted.connected = False


def relay_for(session: KallglotSession, carrier: ScriptedCarrier, chunk_ms: int = 100, **options: int) -> MediaRelay:
    return MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                      speaker="customer", chunk_ms=chunk_ms, context="test", quiet_flush_ms=0, **options)


def frames(count: int, first: int = 0) -> list[bytes]:
    return [bytes([(first + n) % 256]) * 160 for n in range(count)]


def received(emulator: EmulatorControl, session: KallglotSession) -> bytes:
    return base64.b64decode(emulator.session(session.id)["audio_received"].get("customer", ""))


def test_after_a_chunk_the_uplink_holds_and_then_takes_every_frame_in_order(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier) -> None:
    emulator.behaviour("silent")
    relay = relay_for(session, carrier)
    thread, ends = run_relay(relay)
    first, second = frames(5), frames(7, first=5)
    for frame in first:
        carrier.media(frame)
    # The chunk went out and nothing was waiting behind it: the uplink holds (once) instead of waiting per frame.
    assert wait_until(lambda: relay.uplink.holds == 1, timeout=5), relay.uplink.holds
    for frame in second:
        carrier.media(frame)
    carrier.stop()
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP]
    assert received(emulator, session) == b"".join(first + second)  # nothing lost, repeated or reordered
    assert emulator.session(session.id)["audio_input_messages"]["customer"] == 3  # two full chunks, the flush


def test_no_hold_when_frames_are_already_waiting(emulator: EmulatorControl, session: KallglotSession,
                                                 carrier: ScriptedCarrier) -> None:
    """A late uplink (the next frames already queued when a chunk went out) reads on at once: holding would only
    add delay."""
    emulator.behaviour("silent")
    audio = frames(15)
    for frame in audio:
        carrier.media(frame)
    carrier.stop()
    relay = relay_for(session, carrier)
    thread, ends = run_relay(relay)
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP]
    assert relay.uplink.holds == 0
    assert received(emulator, session) == b"".join(audio)


def test_the_relays_end_cuts_a_hold_short(emulator: EmulatorControl, session: KallglotSession,
                                          carrier: ScriptedCarrier) -> None:
    """A 5 s chunk holds the uplink for 4.96 s; the relay's end (here stop(), as a draining worker asks) ends the
    hold at once instead."""
    emulator.behaviour("silent")
    relay = relay_for(session, carrier, chunk_ms=5000)
    thread, ends = run_relay(relay)
    for frame in frames(250):  # 5 s of audio: one chunk
        carrier.media(frame)
    assert wait_until(lambda: relay.uplink.holds == 1, timeout=5), relay.uplink.holds
    stopped_at = time.monotonic()
    relay.stop()
    thread.join(timeout=10)
    assert ends == [RelayEnd.WORKER_DRAINING]
    assert time.monotonic() - stopped_at < 3.0  # well inside the 4.96 s hold


@pytest.mark.parametrize("options", [{"hold_margin_ms": 0}, {"hold_margin_ms": 100}])
def test_no_hold_when_off_or_when_the_margin_covers_the_chunk(emulator: EmulatorControl, session: KallglotSession,
                                                             carrier: ScriptedCarrier, options: dict[str, int]) -> None:
    emulator.behaviour("silent")
    relay = relay_for(session, carrier, **options)
    thread, ends = run_relay(relay)
    audio = frames(5)
    for frame in audio:
        carrier.media(frame)
    assert wait_until(lambda: emulator.session(session.id)["audio_input_messages"].get("customer") == 1, timeout=5)
    carrier.stop()
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP]
    assert relay.uplink.holds == 0
    assert received(emulator, session) == b"".join(audio)
