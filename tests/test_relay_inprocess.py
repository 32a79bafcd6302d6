"""The relay core in-process over a real Kallglot stream socket (the emulator): chunking at other sizes, the
keepalive, and the 5 s backlog kept while a dropped Kallglot stream is reopened.

The carrier side is a scripted socket fed with real Twilio frames (the product's Twilio codec parses them);
everything on the Kallglot side is real: sockets, the emulator's validation and its record of what arrived.
"""
from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from prometheus_client import REGISTRY
from simple_websocket import ConnectionClosed

from app.kallglot import stream_protocol
from app.kallglot.client import KallglotClient, KallglotSession
from app.kallglot.stream import KallglotStream
from app.relay.core import MediaRelay, RelayEnd
from app.relay.outcome import RelayStats
from app.relay.playback import PlaybackTracker
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
    # No quiet-time flush: the count below must not depend on how the test's frames are spaced in time.
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=chunk_ms, context="test", quiet_flush_ms=0)
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


def test_after_the_quiet_time_a_half_full_batch_goes_out_while_the_call_goes_on(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier) -> None:
    """A carrier that suppresses silence sends nothing after the caller's last word: that word still reaches
    Kallglot (README, UPLINK_QUIET_FLUSH_MS) — with the carrier socket open and no ``stop``."""
    emulator.behaviour("silent")
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test", quiet_flush_ms=40)
    thread, ends = run_relay(relay)
    try:
        said = [bytes([n]) * 160 for n in range(1, 4)]  # 60 ms: less than one 100 ms batch, then silence
        for frame in said:
            carrier.media(frame)
        record = wait_until(lambda: (r := emulator.session(session.id))["audio_input_messages"].get(
            "customer", 0) == 1 and r, timeout=5)
        assert record, emulator.session(session.id)
        assert base64.b64decode(record["audio_received"]["customer"]) == b"".join(said)
        assert thread.is_alive() and not ends and carrier.connected  # the call goes on
        assert relay.uplink.quiet_flushes == 1
        # The caller speaks again: batching starts afresh, and nothing is lost or repeated.
        again = [bytes([n]) * 160 for n in range(10, 15)]
        for frame in again:
            carrier.media(frame)
        carrier.stop()
        thread.join(timeout=10)
        assert ends == [RelayEnd.CARRIER_STOP]
        assert base64.b64decode(emulator.session(session.id)["audio_received"]["customer"]) == b"".join(said + again)
    finally:
        carrier.stop()
        thread.join(timeout=10)


def test_with_the_quiet_flush_off_a_half_full_batch_waits_for_the_next_frame(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier) -> None:
    emulator.behaviour("silent")
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test", quiet_flush_ms=0)
    thread, ends = run_relay(relay)
    for n in range(3):
        carrier.media(bytes([n]) * 160)
    assert wait_until(lambda: carrier.inbox.empty(), timeout=5)  # the relay has read them, and holds them
    for n in range(3, 5):
        carrier.media(bytes([n]) * 160)
    carrier.stop()
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP]
    record = emulator.session(session.id)
    assert record["audio_input_messages"]["customer"] == 1  # one full batch: the first three frames waited
    assert relay.uplink.quiet_flushes == 0


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


def _audio_chunks(link: KallglotLink, chunks: list[bytes], first_sequence: int = 1) -> None:
    for sequence, chunk in enumerate(chunks, start=first_sequence):
        assert link.send_audio(stream_protocol.audio_input(base64.b64encode(chunk).decode(), sequence=sequence,
                                                           timestamp_ms=100 * sequence, speaker="customer"))


def _drain_until_closed(link: KallglotLink, timeout: float = 10.0) -> list[object]:
    """What Kallglot said on the current stream before it closed (as the downlink would read it)."""
    messages: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = link.receive(timeout=0.2)
        except ConnectionClosed:
            return messages
        if message is not None:
            messages.append(message)
    raise AssertionError(f"the stream never closed; got {messages}")


def test_audio_written_to_a_stream_kallglot_then_refuses_goes_out_again_on_the_reopened_stream(
        emulator: EmulatorControl, session: KallglotSession) -> None:
    """Kallglot refuses a stream after the WebSocket handshake (``session.error``, then a close): what the relay
    wrote to it meanwhile was never read. The chaos run lost whole calls' audio this way (the caller heard
    nothing); that audio is now sent again, first and in order, once the stream is reopened."""
    emulator.behaviour("silent")
    # The handshake succeeds; 2 s later Kallglot refuses the stream without reading a byte of it.
    emulator.fault(endpoint="connect", status=503, code="service_unavailable", delay_seconds=2.0, times=1)
    stats = RelayStats()
    opened = [KallglotStream.open(session.stream.url, session.stream.token)]

    def reopen() -> KallglotStream:
        opened.append(KallglotStream.open(session.stream.url, session.stream.token))
        return opened[-1]

    link = KallglotLink(opened[0], reopen=reopen, stats=stats, context="test", backlog_chunks=50,
                        backoff_seconds=(0.05,))
    chunks = [bytes([n + 1]) * 800 for n in range(3)]
    _audio_chunks(link, chunks)
    # The case under test: all three went out on the stream that is about to be refused.
    assert stats.chunks_to_kallglot == 3 and opened[0].connected
    said = _drain_until_closed(link)
    assert [type(m).__name__ for m in said] == ["SessionError"], said
    assert emulator.session(session.id)["audio_input_messages"].get("customer", 0) == 0  # nothing was read
    assert link.reopen(threading.Event())
    _audio_chunks(link, [b"\x7f" * 800], first_sequence=4)
    try:
        record = wait_until(lambda: (r := emulator.session(session.id))["audio_input_messages"].get(
            "customer", 0) >= 4 and r, timeout=5)
        assert record, emulator.session(session.id)
        assert base64.b64decode(record["audio_received"]["customer"]) == b"".join(chunks) + b"\x7f" * 800
        assert record["audio_sequences"]["customer"] == [1, 2, 3, 4]
        assert stats.chunks_dropped_while_reconnecting == 0 and stats.kallglot_reconnects == 1
    finally:
        link.close()


def test_audio_kallglot_accepted_is_not_sent_twice_after_a_drop(emulator: EmulatorControl,
                                                               session: KallglotSession) -> None:
    """Once Kallglot has said something healthy on a stream (``session.ready``), what was written to it is
    Kallglot's: a later drop and reopen does not send it again."""
    emulator.behaviour("silent")
    opened = [KallglotStream.open(session.stream.url, session.stream.token)]

    def reopen() -> KallglotStream:
        opened.append(KallglotStream.open(session.stream.url, session.stream.token))
        return opened[-1]

    link = KallglotLink(opened[0], reopen=reopen, stats=RelayStats(), context="test", backlog_chunks=50,
                        backoff_seconds=(0.05,))
    ready = wait_until(lambda: link.receive(timeout=0.2), timeout=5)
    assert type(ready).__name__ == "Informational" and ready.type == "session.ready"
    link.healthy()  # what the downlink does with every healthy message
    _audio_chunks(link, [b"\x01" * 800, b"\x02" * 800])
    assert wait_until(lambda: emulator.session(session.id)["audio_input_messages"].get("customer", 0) == 2)
    requests.post(f"{emulator.url}/_emulator/sessions/{session.id}/drop", timeout=5).raise_for_status()
    _drain_until_closed(link)
    assert link.reopen(threading.Event())
    _audio_chunks(link, [b"\x03" * 800], first_sequence=3)
    try:
        record = wait_until(lambda: (r := emulator.session(session.id))["audio_input_messages"].get(
            "customer", 0) >= 3 and r, timeout=5)
        assert record and record["audio_sequences"]["customer"] == [1, 2, 3], emulator.session(session.id)
    finally:
        link.close()


class HangingUpCarrier(ScriptedCarrier):
    """A caller who has hung up: sends to them fail (their socket is closing), while their ``stop`` is still
    on its way in."""

    def __init__(self) -> None:
        super().__init__()
        self.send_failed = threading.Event()

    def send(self, data: str | bytes) -> None:
        self.send_failed.set()
        raise ConnectionClosed(1000, "caller hung up")

    def stop(self) -> None:
        super().stop()
        self.connected = False  # the close frame follows the stop


def test_a_clean_hang_up_is_not_recorded_as_lost_when_the_echo_finds_the_socket_closing(
        emulator: EmulatorControl, session: KallglotSession) -> None:
    """A caller says something and hangs up: Kallglot's answer meets the closing socket before the relay has
    read the caller's ``stop``. The relay used to end right there as "carrier lost" — a clean hang-up taken
    for a loss, so the session was held for a reconnect instead of ended. The uplink now says why."""
    carrier = HangingUpCarrier()
    ends: list[tuple[RelayEnd, str]] = []
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test",
                       on_end=lambda end, reason: ends.append((end, reason)))
    thread, returned = run_relay(relay)
    carrier.media(b"\x05" * 800)  # one chunk: the emulator echoes it, and the echo cannot be delivered
    assert carrier.send_failed.wait(timeout=10)
    carrier.stop()
    thread.join(timeout=15)
    assert returned == [RelayEnd.CARRIER_STOP]
    assert ends == [(RelayEnd.CARRIER_STOP, "")]


def playback_lags_observed() -> float:
    return REGISTRY.get_sample_value("kallglot_bridge_playback_lag_seconds_count", {"carrier": "twilio"}) or 0.0


def test_playback_lag_runs_from_each_mark_to_its_echo_and_knows_when_the_caller_heard_everything(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier) -> None:
    """Two utterances of return audio (the emulator's echo), each ended by a mark; the carrier echoes them late."""
    health: list[dict[str, float]] = []
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test", on_health=health.append)
    observed_before = playback_lags_observed()
    thread, ends = run_relay(relay)
    try:
        for utterance in (1, 2):
            for n in range(5):  # one full 100 ms batch: echoed as one utterance, then a mark
                carrier.media(bytes([utterance * 10 + n]) * 160)
            assert wait_until(lambda: len(carrier.events("mark")) == utterance, timeout=5), carrier.sent
        assert [m["mark"]["name"] for m in carrier.events("mark")] == ["utt-1", "utt-2"]
        time.sleep(0.1)  # the caller's ear trails: the carrier echoes utt-1 at least 100 ms after it was sent
        carrier.mark_played("utt-1")
        assert wait_until(lambda: relay.stats.marks_played == 1, timeout=5)
        assert wait_until(lambda: any("playback_lag_ms" in h for h in health), timeout=5)
        assert health[-1]["playback_lag_ms"] >= 100
        assert relay.stats.playback_caught_up == 0  # utt-2 is still queued at the carrier
        carrier.mark_played("utt-2")
        assert wait_until(lambda: relay.stats.playback_caught_up == 1, timeout=5)
        assert relay.playback.in_flight == 0
        assert playback_lags_observed() - observed_before == 2
        carrier.mark_played("utt-99")  # a mark the relay never sent is ignored
        carrier.stop()
        thread.join(timeout=10)
        assert ends == [RelayEnd.CARRIER_STOP] and relay.stats.marks_played == 3
        assert playback_lags_observed() - observed_before == 2
    finally:
        carrier.stop()
        thread.join(timeout=10)


def test_the_caller_has_not_heard_everything_while_audio_after_the_last_mark_is_unmarked() -> None:
    tracker = PlaybackTracker()
    first = tracker.next_mark()
    tracker.audio_sent()  # the next utterance has begun playing out; its mark is not sent yet
    played = tracker.played(first)
    assert played is not None and not played.heard_everything
    second = tracker.next_mark()
    played = tracker.played(second)
    assert played is not None and played.heard_everything and played.lag_seconds >= 0


def test_an_echo_settles_earlier_marks_a_clear_discarded_and_marks_in_flight_are_bounded() -> None:
    tracker = PlaybackTracker()
    names = [tracker.next_mark() for _ in range(3)]
    played = tracker.played(names[2])
    assert played is not None and played.heard_everything and tracker.in_flight == 0
    assert tracker.played(names[0]) is None
    for _ in range(200):  # a carrier that never echoes
        tracker.next_mark()
    assert tracker.in_flight == 64


def test_a_caller_who_hangs_up_while_a_refused_stream_waits_to_be_reopened_is_logged_not_silent(
        emulator: EmulatorControl, session: KallglotSession, carrier: ScriptedCarrier,
        caplog: pytest.LogCaptureFixture) -> None:
    """Chaos-run "open bug": Kallglot refused the first stream at once, the caller's audio and ``stop`` were
    already queued (the relay started late), and the leg ended with "0 chunks, 0 kallglot reconnects" and no
    other line, like a downlink that stalled. It is the caller leaving inside the reopen's backoff: the relay
    now says that the reopen was abandoned and how much of the caller's audio never reached Kallglot."""
    emulator.fault(endpoint="connect", status=503, code="service_unavailable", delay_seconds=0.0, times=1)
    stream = KallglotStream.open(session.stream.url, session.stream.token)
    refused = wait_until(lambda: not stream.connected or None, timeout=5)  # session.error + close, read
    assert refused
    opened: list[KallglotStream] = []

    def reopen() -> KallglotStream:
        opened.append(KallglotStream.open(session.stream.url, session.stream.token))
        return opened[-1]

    relay = MediaRelay(carrier, started_codec(), stream, speaker="customer", chunk_ms=100, context="late-relay",
                       reopen_kallglot=reopen, reconnect_backoff_seconds=(2.0,))
    caplog.set_level("INFO", logger="app.relay")
    thread, ends = run_relay(relay)
    assert wait_until(lambda: relay.link.reconnecting, timeout=5)  # the downlink read the refusal: backoff
    for _ in range(3):
        carrier.media(b"\x05" * 800)
    carrier.stop()  # the caller talked and left inside the backoff, as when the relay started late
    thread.join(timeout=10)
    assert ends == [RelayEnd.CARRIER_STOP] and opened == []
    assert relay.stats.kallglot_reconnects == 0 and relay.stats.chunks_to_kallglot == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("late-relay")]
    assert any("kallglot stream not reopened: the relay ended during the 2.0 s backoff" in line
               for line in lines), lines
    assert any("3 chunks of customer audio never reached Kallglot" in line for line in lines), lines
