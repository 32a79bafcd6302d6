"""The Kallglot stream socket's closing handshake, against a raw TCP WebSocket peer that never stops talking.

A stand-in for Kallglot that streams return audio without pause is the worst case for a close: the relay's
socket always has unread input, so a close without a handshake makes the kernel answer with a reset, which
discards whatever the relay sent last. This peer records exactly what arrived and how the connection ended.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from app.kallglot import stream_protocol
from app.kallglot.stream import KallglotStream

SOCKET_TIMEOUT_SECONDS = 5.0
RETURN_AUDIO = json.dumps({"type": "audio.output", "audio": {
    "encoding": "mulaw", "sample_rate_hz": 8000, "payload": base64.b64encode(b"\x7f" * 6000).decode()}})


class TalkativePeer:
    """Accepts one WebSocket, sends ``session.ready``, then return audio non-stop until the client's close."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SOCKET_TIMEOUT_SECONDS)
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/v1/sessions/sess_x/connect"
        self.messages: list[dict] = []
        self.close_code: int | None = None
        self.reset = False
        self.eof = False
        self.frames_sent = 0
        self.done = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.done.set()
            return
        conn.settimeout(SOCKET_TIMEOUT_SECONDS)
        ws = WSConnection(ConnectionType.SERVER)
        try:
            self._handshake(conn, ws)
            talker = threading.Thread(target=self._talk, args=(conn, ws), daemon=True)
            talker.start()
            self._read(conn, ws)
            self._closing.set()
            talker.join(timeout=SOCKET_TIMEOUT_SECONDS)
        finally:
            conn.close()
            self.done.set()

    def _handshake(self, conn: socket.socket, ws: WSConnection) -> None:
        while True:
            ws.receive_data(conn.recv(65536))
            for event in ws.events():
                if isinstance(event, Request):
                    conn.sendall(ws.send(AcceptConnection()))
                    conn.sendall(ws.send(TextMessage(data=json.dumps({"type": "session.ready",
                                                                       "session_id": "sess_x"}))))
                    return

    def _talk(self, conn: socket.socket, ws: WSConnection) -> None:
        while not self._closing.is_set():
            with self._lock:
                if self._closing.is_set():
                    return
                try:
                    conn.sendall(ws.send(TextMessage(data=RETURN_AUDIO)))
                except (OSError, Exception):
                    return
                self.frames_sent += 1

    def _read(self, conn: socket.socket, ws: WSConnection) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                self.reset = True
                return
            if not data:
                self.eof = True
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    self.messages.append(json.loads(event.data))
                elif isinstance(event, CloseConnection):
                    with self._lock:  # no more audio after the client's close, then answer it
                        self._closing.set()
                        self.close_code = event.code
                        try:
                            conn.sendall(ws.send(event.response()))
                        except OSError:
                            pass

    def close(self) -> None:
        self._closing.set()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[TalkativePeer]:
    talkative = TalkativePeer()
    yield talkative
    talkative.close()


@pytest.mark.parametrize("attempt", range(5))
def test_close_delivers_every_last_message_and_completes_the_handshake(peer: TalkativePeer, attempt: int) -> None:
    stream = KallglotStream.open(peer.url, "kst_test_token", timeout=SOCKET_TIMEOUT_SECONDS)
    assert stream.receive(timeout=SOCKET_TIMEOUT_SECONDS).type == "session.ready"
    # Wait until the peer is mid-stream, so the socket has unread input when we close.
    while peer.frames_sent < 50:
        stream.receive(timeout=SOCKET_TIMEOUT_SECONDS)
    for sequence in range(1, 21):
        stream.send(stream_protocol.audio_input(base64.b64encode(bytes([sequence]) * 160).decode(),
                                                sequence=sequence, timestamp_ms=20 * sequence, speaker="customer"))
    stream.close()
    assert peer.done.wait(SOCKET_TIMEOUT_SECONDS)
    assert [m["sequence"] for m in peer.messages] == list(range(1, 21))  # every last message arrived
    assert peer.close_code == 1000  # the close frame arrived: Kallglot records a normal closure
    assert peer.eof and not peer.reset  # the connection ended with FIN, not a reset
    assert not stream.connected


def test_close_is_bounded_when_the_peer_never_answers() -> None:
    """A peer that ignores our close frame: close() gives up after its timeout, never hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SOCKET_TIMEOUT_SECONDS)
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/connect"
    accepted: list[socket.socket] = []

    def accept_and_ignore() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(conn.recv(65536))
            if any(isinstance(event, Request) for event in ws.events()):
                conn.sendall(ws.send(AcceptConnection()))
                return

    server = threading.Thread(target=accept_and_ignore, daemon=True)
    server.start()
    try:
        stream = KallglotStream.open(url, "kst_test_token", timeout=SOCKET_TIMEOUT_SECONDS)
        server.join(timeout=SOCKET_TIMEOUT_SECONDS)
        finished = threading.Event()
        closer = threading.Thread(target=lambda: (stream.close(timeout=0.3), finished.set()), daemon=True)
        closer.start()
        assert finished.wait(SOCKET_TIMEOUT_SECONDS)  # bounded: the handshake timeout, not the peer, decides
        assert not stream.connected
    finally:
        for conn in accepted:
            conn.close()
        listener.close()
