"""The relay core in-process over a real Kallglot stream socket (the emulator): chunking at other sizes, the
keepalive, and the 5 s backlog kept while a dropped Kallglot stream is reopened.

The carrier side is a scripted socket fed with real Twilio frames (the product's Twilio codec parses them);
everything on the Kallglot side is real: sockets, the emulator's validation and its record of what arrived.
"""
from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import pytest
import requests

from app.kallglot import stream_protocol
from app.kallglot.client import KallglotClient, KallglotSession
from app.kallglot.stream import KallglotStream
from app.relay.core import MediaRelay, RelayEnd
from app.relay.outcome import RelayStats
from app.relay.reopen import KALLGLOT_RECONNECT_BUFFER_MS, KallglotLink
from tests.support.controls import EmulatorControl
from tests.support.scripted_carrier import ScriptedCarrier, run_relay, started_codec
from tests.support.settings import EMULATOR_API_KEY
from tests.support.waiting import wait_until

@pytest.fixture
def session(emulator: EmulatorControl) -> KallglotSession:
    return KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                             idempotency_key="relay-inprocess")


@pytest.fixture
def carrier() -> Iterator[ScriptedCarrier]:
    scripted = ScriptedCarrier()
    yield scripted
    scripted.connected = False


@pytest.mark.parametrize("chunk_ms", [20, 40, 200])
def test_uplink_chunks_follow_uplink_chunk_ms(emulator: EmulatorControl, session: KallglotSession,
                                              carrier: ScriptedCarrier, chunk_ms: int) -> None:
    emulator.behaviour("silent")
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=chunk_ms, context="test")
    thread, ends = run_relay(relay)
    audio = bytes(range(256)) * 25  # 6400 bytes = 40 frames = 800 ms
    for n in range(0, len(audio), 160):
        carrier.media(audio[n:n + 160])
    carrier.stop()
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP]
    record = emulator.session(session.id)
    assert base64.b64decode(record["audio_received"]["customer"]) == audio
    # Every message but the flushed last one carries exactly chunk_ms of audio.
    assert record["audio_input_messages"]["customer"] == -(-len(audio) // (chunk_ms * 8))
    assert record["sequences_increasing"] is True


def test_the_relay_keeps_a_quiet_kallglot_stream_alive(emulator: EmulatorControl, session: KallglotSession,
                                                       carrier: ScriptedCarrier) -> None:
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test", ping_interval_seconds=0.2)
    thread, _ = run_relay(relay)
    try:
        # Nobody speaks: the relay's keepalive is all that crosses the stream.
        assert wait_until(lambda: emulator.session(session.id)["connections"][0]["pings_received"] >= 3, timeout=5)
    finally:
        carrier.stop()
        thread.join(timeout=10)


def test_a_reopened_stream_gets_the_last_5_s_in_order_and_older_audio_is_counted_as_dropped(
        emulator: EmulatorControl, session: KallglotSession) -> None:
    """README: while Kallglot is away, the last 5 s of caller audio are kept and sent, in order, on reopen."""
    emulator.behaviour("silent")
    stats = RelayStats()
    opened = [KallglotStream.open(session.stream.url, session.stream.token)]

    def reopen() -> KallglotStream:
        opened.append(KallglotStream.open(session.stream.url, session.stream.token))
        return opened[-1]

    chunk_ms = 100
    link = KallglotLink(opened[0], reopen=reopen, stats=stats, context="test",
                        backlog_chunks=KALLGLOT_RECONNECT_BUFFER_MS // chunk_ms, backoff_seconds=(0.05,))
    requests.post(f"{emulator.url}/_emulator/sessions/{session.id}/drop", timeout=5).raise_for_status()
    assert wait_until(lambda: not opened[0].connected, timeout=5)
    # 7 s of audio while Kallglot is away: 70 chunks of 100 ms, each distinguishable by its bytes.
    chunks = [bytes([n]) * 800 for n in range(70)]
    for sequence, chunk in enumerate(chunks, start=1):
        assert link.send_audio(stream_protocol.audio_input(base64.b64encode(chunk).decode(), sequence=sequence,
                                                           timestamp_ms=100 * sequence, speaker="customer"))
    assert link.reopen(threading.Event())
    try:
        record = wait_until(lambda: (r := emulator.session(session.id))["audio_input_messages"].get(
            "customer", 0) == 50 and r, timeout=5)
        assert record, emulator.session(session.id)
        assert base64.b64decode(record["audio_received"]["customer"]) == b"".join(chunks[20:])  # last 5 s, in order
        assert record["audio_sequences"]["customer"] == list(range(21, 71))
        assert stats.chunks_dropped_while_reconnecting == 20  # the first 2 s, counted
        assert stats.kallglot_reconnects == 1 and stats.chunks_to_kallglot == 50
    finally:
        link.close()
