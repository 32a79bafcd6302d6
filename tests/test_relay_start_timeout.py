"""A media socket closed because no ``start`` came in time is logged (a chaos run's Call Control calls lost their
first stream this way, at load 15, and nothing in the bridge's log said so)."""
from __future__ import annotations

import json
import logging

import pytest
from simple_websocket import ConnectionClosed

from app.carriers.twilio.codec import TwilioMediaCodec
from app.relay.sockets import await_start, close_quietly


class SilentSocket:
    """A carrier socket that never sends anything (receive times out) and records how it was closed."""

    connected = True

    def __init__(self) -> None:
        self.closed_with: tuple[int | None, str | None] | None = None

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        return None

    def send(self, data: str | bytes) -> None:  # pragma: no cover - never called before start
        raise AssertionError("nothing is sent before start")

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.closed_with, self.connected = (reason, message), False


def test_a_socket_closed_for_no_start_says_so_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    ws = SilentSocket()
    with caplog.at_level(logging.INFO, logger="app.relay.sockets"):
        assert await_start(ws, TwilioMediaCodec(), timeout=0.01) is None
    assert ws.closed_with == (1008, "no start event")
    assert any("no start within 0.0 s" in r.getMessage() and "twilio" in r.getMessage() for r in caplog.records)


class LateSocket(SilentSocket):
    """A socket whose ``connected`` and ``start`` were received in time but are read only after the deadline (the
    worker was starved): every wait times out, a read that does not wait finds the next frame."""

    def __init__(self, frames: list[str]) -> None:
        super().__init__()
        self.frames = frames

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        return self.frames.pop(0) if timeout == 0.0 and self.frames else None


def test_a_start_already_received_when_the_deadline_passes_is_taken_not_refused() -> None:
    start = json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + "0" * 32,
                        "start": {"streamSid": "MZ" + "0" * 32, "accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32,
                                  "tracks": ["inbound"], "customParameters": {},
                                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
    ws = LateSocket([json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}), start])
    started = await_start(ws, TwilioMediaCodec(), timeout=0.0)
    assert started is not None and ws.closed_with is None


def test_a_peer_sending_only_noise_past_the_deadline_is_still_closed() -> None:
    noise = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    ws = LateSocket([noise] * 100)
    assert await_start(ws, TwilioMediaCodec(), timeout=0.0) is None
    assert ws.closed_with == (1008, "no start event") and len(ws.frames) > 90


class ScriptedSocket(SilentSocket):
    """A socket that yields the given frames, then raises ``ConnectionClosed`` (the peer went away)."""

    def __init__(self, frames: list[str]) -> None:
        super().__init__()
        self.frames = frames

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        if not self.frames:
            raise ConnectionClosed(1006, "gone")
        return self.frames.pop(0)


def test_a_socket_the_carrier_closes_before_start_ends_quietly_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    ws = ScriptedSocket([json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})])
    with caplog.at_level(logging.INFO, logger="app.relay.sockets"):
        assert await_start(ws, TwilioMediaCodec(), timeout=5.0) is None
    assert ws.closed_with is None  # already closed by the carrier: nothing to close
    assert any("twilio media socket closed before start" in r.getMessage() for r in caplog.records)


def test_a_stop_before_start_closes_the_socket_normally() -> None:
    ws = ScriptedSocket([json.dumps({"event": "stop", "sequenceNumber": "1", "streamSid": "MZ" + "0" * 32,
                                     "stop": {"accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32}})])
    assert await_start(ws, TwilioMediaCodec(), timeout=5.0) is None
    assert ws.closed_with == (1000, None)  # the caller hung up before the stream started: a normal close


class BrokenSocket(SilentSocket):
    """A socket whose close fails the way a broken connection's does."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        raise self.error


@pytest.mark.parametrize("error", [ConnectionClosed(1006, "gone"), BrokenPipeError("broken pipe")])
def test_closing_a_broken_socket_raises_nothing(error: Exception) -> None:
    close_quietly(BrokenSocket(error), 1011, "bye")  # the relay's end path must go on to its bookkeeping
