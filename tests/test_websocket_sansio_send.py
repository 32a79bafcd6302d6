"""Sending on the sans-I/O layer: one ``send()`` per frame, and the rest through ``sendall()`` when the socket's
send buffer took only part of it (a slow peer) — nothing lost, nothing reordered, a failure still a close."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from simple_websocket import ConnectionClosed
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from app.websocket import SansIoServer
from app.websocket_sansio import SansIoConnection


class PartialSocket:
    """Takes at most ``accept`` bytes per ``send()`` (a nearly full send buffer); ``sendall()`` takes the rest."""

    def __init__(self, accept: int, fail_sendall: bool = False) -> None:
        self.accept = accept
        self.fail_sendall = fail_sendall
        self.calls: list[tuple[str, bytes]] = []

    def send(self, data: bytes) -> int:
        taken = bytes(data[:self.accept])
        self.calls.append(("send", taken))
        return len(taken)

    def sendall(self, data: bytes | memoryview) -> None:
        if self.fail_sendall:
            raise BrokenPipeError("peer gone")
        self.calls.append(("sendall", bytes(data)))


class Server(SansIoConnection):
    """The server side's framing over a socket double (no WSGI environ, no handshake)."""

    _text_frame = SansIoServer._text_frame

    def __init__(self, sock: PartialSocket, reader: socket.socket) -> None:
        protocol = ServerProtocol()
        protocol.state = OPEN
        super().__init__(sock, protocol, reader)  # type: ignore[arg-type]
        self.connected = True


def _opened_server_protocol() -> ServerProtocol:
    """A server protocol that went through a client's opening handshake (so it parses frames)."""
    protocol = ServerProtocol()
    protocol.receive_data(b"GET / HTTP/1.1\r\nHost: bridge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    (request,) = protocol.events_received()
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()  # the 101 response: not this test's concern
    assert protocol.state is OPEN
    return protocol


@pytest.fixture
def reader() -> Iterator[socket.socket]:
    """The connection's reader (unused here: these tests only send)."""
    ours, theirs = socket.socketpair()
    yield ours
    ours.close()
    theirs.close()


def test_a_frame_the_socket_takes_whole_is_one_send(reader: socket.socket) -> None:
    sock = PartialSocket(accept=1 << 20)
    Server(sock, reader).send('{"event":"media"}')
    assert sock.calls == [("send", b'\x81\x11{"event":"media"}')]


@pytest.mark.parametrize("accept", [0, 1, 2, 300])
def test_the_rest_of_a_partly_taken_frame_follows_in_order(accept: int, reader: socket.socket) -> None:
    sock = PartialSocket(accept=accept)
    payload = "x" * 1000
    Server(sock, reader).send(payload)
    frame = b"\x81\x7e" + (1000).to_bytes(2, "big") + payload.encode()
    assert sock.calls == [("send", frame[:accept]), ("sendall", frame[accept:])]
    assert b"".join(data for _, data in sock.calls) == frame


def test_a_failing_rest_closes_the_connection_for_sending(reader: socket.socket) -> None:
    conn = Server(PartialSocket(accept=10, fail_sendall=True), reader)
    with pytest.raises(ConnectionClosed):
        conn.send("y" * 100)
    with pytest.raises(ConnectionClosed):  # and for every later send
        conn.send("z")


def test_after_a_failed_send_the_reader_still_hands_over_what_the_peer_sent_before_it_closed() -> None:
    """A caller hangs up: the carrier sends ``stop`` and closes, and the relay's next send to it fails before the
    relay has read the ``stop``. That ``stop`` must still be read (a clean hang-up, not a lost stream, which would
    hold the session for a reconnect), then the close."""
    ours, theirs = socket.socketpair()
    try:
        conn = Server(PartialSocket(accept=10, fail_sendall=True), ours)
        conn._protocol = _opened_server_protocol()  # this test reads too: a protocol past a real handshake
        stop = b'{"event":"stop"}'
        theirs.sendall(bytes([0x81, 0x80 | len(stop)]) + b"\0\0\0\0" + stop)  # masked (a zero key), as clients must
        theirs.close()
        with pytest.raises(ConnectionClosed):
            conn.send("y" * 100)
        assert conn.receive(timeout=2) == stop.decode()
        with pytest.raises(ConnectionClosed):
            conn.receive(timeout=2)
        assert not conn.connected
    finally:
        ours.close()
