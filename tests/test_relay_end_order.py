"""How a relay ends, in-process and deterministic (a scripted carrier, a real Kallglot stream socket to the
emulator): on every path the leg's end is recorded *before* the carrier socket closes, and both sockets have
Nagle off.

Why the order matters: the carrier reacts to the close at once (Twilio's ``<Connect action>`` restores the stream on
a new socket); an end recorded after that lands on the *restored* leg, which is then held and ended under a live
stream. The e2e test (tests/test_e2e_relay_end.py) shows the outcome over real sockets, where the race is
timing-dependent; this one checks the order itself on each path, so it fails every time the order is wrong.
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
import requests

from app.kallglot.client import KallglotClient, KallglotSession
from app.kallglot.stream import KallglotStream
from app.relay.core import MediaRelay, RelayEnd
from tests.support.controls import EmulatorControl
from tests.support.scripted_carrier import ScriptedCarrier, run_relay, started_codec
from tests.support.settings import EMULATOR_API_KEY
from tests.support.waiting import wait_until

MULAW_20MS = b"\x55" * 160
SOCKET_TIMEOUT_SECONDS = 5.0


class OrderedCarrier(ScriptedCarrier):
    """A scripted carrier socket that writes its close into the same journal as the relay's end hook."""

    def __init__(self, journal: list[tuple[str, object]]) -> None:
        super().__init__()
        self.journal = journal

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.journal.append(("carrier socket closed", reason))
        super().close(reason, message)


@pytest.fixture
def session(emulator: EmulatorControl) -> KallglotSession:
    emulator.behaviour("silent")
    return KallglotClient(emulator.api_url, EMULATOR_API_KEY).create_session(mode="ai_agent",
                                                                             idempotency_key="relay-end-order")


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of loopback TCP sockets (Nagle is a TCP option: a Unix socket pair has none)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SOCKET_TIMEOUT_SECONDS)
    client = socket.create_connection(listener.getsockname(), timeout=SOCKET_TIMEOUT_SECONDS)
    server, _ = listener.accept()
    listener.close()
    yield server, client
    server.close()
    client.close()


def _end_kallglot_session(emulator: EmulatorControl, session: KallglotSession) -> None:
    requests.post(f"{emulator.api_url}/sessions/{session.id}/end", timeout=SOCKET_TIMEOUT_SECONDS,
                  headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}).raise_for_status()


#: Each way a relay ends: what the test does once the relay runs, the end recorded, the carrier close code.
END_PATHS: dict[str, tuple[Callable[[OrderedCarrier, MediaRelay, EmulatorControl, KallglotSession], None],
                           RelayEnd, int]] = {
    "caller stop": (lambda carrier, relay, emulator, session: carrier.stop(), RelayEnd.CARRIER_STOP, 1000),
    # A binary frame is fatal for Twilio's protocol: the uplink's protocol-error path closes with 1003.
    "fatal carrier frame": (lambda carrier, relay, emulator, session: carrier.inbox.put(b"\x00binary"),
                            RelayEnd.PROTOCOL_ERROR, 1003),
    "kallglot ended the session": (lambda carrier, relay, emulator, session: _end_kallglot_session(emulator, session),
                                   RelayEnd.KALLGLOT_ENDED, 1000),
    "worker draining": (lambda carrier, relay, emulator, session: relay.stop(), RelayEnd.WORKER_DRAINING, 1000),
}


@pytest.mark.parametrize("path", list(END_PATHS))
def test_the_legs_end_is_recorded_before_the_carrier_socket_closes_on_every_path(
        path: str, emulator: EmulatorControl, session: KallglotSession) -> None:
    end_it, expected_end, expected_code = END_PATHS[path]
    journal: list[tuple[str, object]] = []
    carrier = OrderedCarrier(journal)
    relay = MediaRelay(carrier, started_codec(), KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=100, context="test",
                       on_end=lambda end, _reason: journal.append(("end recorded", end)))
    thread, ends = run_relay(relay)
    carrier.media(MULAW_20MS)
    assert wait_until(lambda: emulator.session(session.id)["connections_live"] == 1, timeout=10)
    end_it(carrier, relay, emulator, session)
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert ends == [expected_end]
    assert journal == [("end recorded", expected_end), ("carrier socket closed", expected_code)]


def test_both_relay_sockets_have_nagle_off(emulator: EmulatorControl, session: KallglotSession,
                                           tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """The relay's last flush and its 20 ms frames leave at once, not held back behind Nagle for an ACK."""
    server_side, _client_side = tcp_pair
    assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the kernel's default: on
    carrier = ScriptedCarrier()
    carrier.sock = server_side  # what flask-sock's simple-websocket Server exposes
    stream = KallglotStream.open(session.stream.url, session.stream.token)
    kallglot_socket = stream._ws.sock  # the product exposes no public handle on it; read-only here
    assert kallglot_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    relay = MediaRelay(carrier, started_codec(), stream, speaker="customer", chunk_ms=100, context="test")
    thread, ends = run_relay(relay)
    carrier.stop()
    thread.join(timeout=15)
    assert ends == [RelayEnd.CARRIER_STOP]
    assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
