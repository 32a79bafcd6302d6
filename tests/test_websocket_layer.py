"""RFC 6455 conformance of the WebSocket layers under the media routes (app/websocket.py), over real sockets to
gunicorn + gevent, in the style of the Autobahn test suite's cases: every frame is written by hand (masked or
not, fragmented, with control frames in between, with bad UTF-8 or reserved bits) and every server frame is
parsed by hand (a server frame must never be masked).

Each case runs against ``sansio`` (the faster layer) and ``simple-websocket`` (flask-sock's own, wsproto) as the
oracle: both must behave as the RFC says. The client side (the relay's Kallglot stream socket) is checked the
same way against a raw server peer at the end.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from simple_websocket import ConnectionClosed

from app.devtools.localstack import RunningServer, run_gunicorn
from app.kallglot.stream import KallglotStream
from app.websocket_sansio import HandshakeFailed, SansIoClient
from tests.support.websocket_echo import ECHO_MAX_MESSAGE_BYTES

pytestmark = pytest.mark.e2e

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@pytest.fixture(scope="module", params=["sansio", "simple-websocket"])
def echo_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with run_gunicorn("tests.support.websocket_echo:create_echo_app()", {"ECHO_WEBSOCKET_LAYER": request.param},
                      ready_path="/healthz") as server:
        yield server


class RawPeer:
    """Byte-level framing shared by the raw test peers: send frames, read exact byte counts and frame lengths."""

    buffer = b""

    def _socket(self) -> socket.socket:
        raise NotImplementedError

    def send(self, *frames: bytes) -> None:
        self._socket().sendall(b"".join(frames))

    def _read_exact(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            chunk = self._socket().recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _read_length(self, second_byte: int) -> int:
        size = second_byte & 0x7F
        if size == 126:
            return struct.unpack("!H", self._read_exact(2) or b"\0\0")[0]
        if size == 127:
            return struct.unpack("!Q", self._read_exact(8) or b"\0" * 8)[0]
        return size


class RawClient(RawPeer):
    """A WebSocket client that writes frames byte by byte, so it can also write the broken ones."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed during the handshake"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"permessage-deflate" not in head.lower()

    @staticmethod
    def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
        head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
        size = len(payload)
        mask_bit = 0x80 if mask else 0
        if size < 126:
            head += bytes([mask_bit | size])
        elif size < 65536:
            head += bytes([mask_bit | 126]) + struct.pack("!H", size)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
        if not mask:
            return head + payload
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    def _socket(self) -> socket.socket:
        return self.sock

    def read(self) -> tuple[int, bool, bytes] | None:
        """The next server frame (opcode, fin, payload); None when the server closed TCP."""
        head = self._read_exact(2)
        if head is None:
            return None
        assert not head[1] & 0x80, "a server frame must not be masked"
        assert not head[0] & 0x70, "no extension was negotiated: reserved bits must be 0"
        size = self._read_length(head[1])
        payload = self._read_exact(size) if size else b""
        assert payload is not None
        return head[0] & 0x0F, bool(head[0] & 0x80), payload

    def read_message(self) -> tuple[int, bytes]:
        """The next data message (reassembled), skipping pongs."""
        opcode, fin, payload = self.read() or (None, True, b"")
        while opcode == PONG:
            opcode, fin, payload = self.read() or (None, True, b"")
        assert opcode is not None, "closed instead of a message"
        while not fin:
            _, fin, more = self.read() or (None, True, b"")
            payload += more
        return opcode, payload

    def expect_close(self, code: int) -> None:
        """The server sends a close frame with ``code``, then closes the TCP connection."""
        frame = self.read()
        while frame is not None and frame[0] in (PONG, TEXT, BINARY, CONT):
            frame = self.read()
        assert frame is not None and frame[0] == CLOSE, frame
        assert struct.unpack("!H", frame[2][:2])[0] == code, frame
        try:
            self.send(self.frame(CLOSE, frame[2][:2]))
        except OSError:
            pass
        try:  # then the TCP connection ends (simple-websocket resets it on some violations: not an RFC 6455 MUST)
            assert self.read() is None
        except ConnectionResetError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(echo_server: RunningServer) -> Iterator[RawClient]:
    raw = RawClient(echo_server.port)
    yield raw
    raw.close()


@pytest.mark.parametrize("size", [0, 125, 126, 65535 // 20, 4096])
def test_text_and_binary_messages_echo_at_every_length_encoding(client: RawClient, size: int) -> None:
    text = ("é" * size)[: size // 2] or ""
    client.send(client.frame(TEXT, text.encode()))
    assert client.read_message() == (TEXT, text.encode())
    data = os.urandom(min(size, ECHO_MAX_MESSAGE_BYTES))
    client.send(client.frame(BINARY, data))
    assert client.read_message() == (BINARY, data)


def test_a_fragmented_message_with_pings_between_fragments(client: RawClient) -> None:
    whole = "Grüße, 世界 — fragmented".encode()
    # A multi-byte character split across fragments is valid UTF-8 once reassembled.
    cut1, cut2 = whole.index("ü".encode()) + 1, whole.index("世".encode()) + 2
    client.send(client.frame(TEXT, whole[:cut1], fin=False), client.frame(PING, b"one"),
                client.frame(CONT, whole[cut1:cut2], fin=False), client.frame(PING, b"two"),
                client.frame(CONT, whole[cut2:]))
    assert client.read() == (PONG, True, b"one")
    assert client.read() == (PONG, True, b"two")
    assert client.read_message() == (TEXT, whole)


def test_many_frames_in_one_segment_all_arrive_in_order(client: RawClient) -> None:
    client.send(*(client.frame(TEXT, f"frame {n}".encode()) for n in range(200)))
    assert [client.read_message()[1] for _ in range(200)] == [f"frame {n}".encode() for n in range(200)]


def test_a_receive_timeout_returns_nothing_and_the_socket_stays_usable(client: RawClient) -> None:
    client.send(client.frame(TEXT, b"poll"))
    assert client.read_message() == (TEXT, b"none")
    client.send(client.frame(TEXT, b"still here"))
    assert client.read_message() == (TEXT, b"still here")


def test_the_client_closes_and_the_server_echoes_its_close(client: RawClient) -> None:
    client.send(client.frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
    frame = client.read()
    assert frame is not None and frame[0] == CLOSE and struct.unpack("!H", frame[2][:2])[0] == 1000
    assert client.read() is None


def test_the_server_closes_with_its_code_and_drops_tcp_after_the_answer(client: RawClient) -> None:
    client.send(client.frame(TEXT, b"close-me"))
    client.expect_close(4000)


@pytest.mark.parametrize("frames, code", [
    pytest.param([RawClient.frame(TEXT, b"unmasked", mask=False)], 1002, id="unmasked-client-frame"),
    pytest.param([RawClient.frame(TEXT, b"rsv", rsv=0b100)], 1002, id="reserved-bit-without-extension"),
    pytest.param([RawClient.frame(0x3, b"x")], 1002, id="reserved-opcode"),
    pytest.param([RawClient.frame(PING, b"x", fin=False)], 1002, id="fragmented-control-frame"),
    pytest.param([RawClient.frame(PING, b"x" * 126)], 1002, id="control-frame-over-125-bytes"),
    pytest.param([RawClient.frame(CONT, b"x")], 1002, id="continuation-without-a-start"),
    pytest.param([RawClient.frame(TEXT, b"a", fin=False), RawClient.frame(TEXT, b"b")], 1002,
                 id="new-message-inside-a-fragmented-one"),
    pytest.param([RawClient.frame(TEXT, b"\xff\xfe bad utf-8")], 1007, id="invalid-utf8"),
    pytest.param([RawClient.frame(TEXT, b"ok \xe4", fin=False), RawClient.frame(CONT, b"\x28 bad")], 1007,
                 id="invalid-utf8-across-fragments"),
    pytest.param([RawClient.frame(BINARY, b"x" * (ECHO_MAX_MESSAGE_BYTES + 1))], 1009, id="message-too-big"),
    pytest.param([RawClient.frame(BINARY, b"x" * 3000, fin=False), RawClient.frame(CONT, b"x" * 3000)], 1009,
                 id="fragments-too-big-together"),
])
def test_protocol_violations_fail_the_connection_with_the_rfc_code(client: RawClient, frames: list[bytes],
                                                                   code: int) -> None:
    client.send(*frames)
    client.expect_close(code)


@pytest.mark.parametrize("headers", [
    pytest.param({"Upgrade": "websocket", "Connection": "Upgrade"}, id="no-key"),
    pytest.param({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "bad",
                  "Sec-WebSocket-Version": "13"}, id="malformed-key"),
    pytest.param({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                  "Sec-WebSocket-Version": "8"}, id="old-version"),
])
def test_a_broken_upgrade_is_refused_with_a_4xx(echo_server: RunningServer, request: pytest.FixtureRequest,
                                                 headers: dict[str, str]) -> None:
    if request.node.callspec.params["echo_server"] == "simple-websocket":
        pytest.xfail("simple-websocket 1.1 answers 500 without a key and 101 to a malformed one (the reason for "
                     "WEBSOCKET_LAYER=sansio is not only speed)")
    response = requests.get(echo_server.url + "/echo", headers=headers, timeout=5)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)


# -- the client side: app.websocket_sansio.SansIoClient (the relay's Kallglot stream socket) ----------------------
# A raw server peer accepts the upgrade and then writes server frames by hand (unmasked, or masked to test the
# client's refusal) and parses every client frame by hand: a client frame MUST be masked (RFC 6455 5.3).


class RawServer(RawPeer):
    """Accepts one WebSocket upgrade (optionally with bytes in the same segment as the 101), then frames by hand."""

    def __init__(self, *, status: str = "101 Switching Protocols", after_response: bytes = b"",
                 tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.url = f"{'wss' if tls else 'ws'}://127.0.0.1:{self.listener.getsockname()[1]}/v1/connect"
        self._status, self._after_response, self._tls = status, after_response, tls
        self.conn: socket.socket | None = None
        self.buffer = b""
        self._accepted = threading.Thread(target=self._accept, daemon=True)
        self._accepted.start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        if self._tls is not None:
            conn = self._tls.wrap_socket(conn, server_side=True)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        head = (f"HTTP/1.1 {self._status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept.decode()}\r\n\r\n").encode()
        conn.sendall(head + self._after_response)  # one segment: the client must not wait for more to see it
        self.conn = conn

    def accepted(self) -> socket.socket:
        self._accepted.join(timeout=5)
        assert self.conn is not None, "the client never connected"
        return self.conn

    @staticmethod
    def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = False) -> bytes:
        return RawClient.frame(opcode, payload, fin=fin, mask=mask)

    def _socket(self) -> socket.socket:
        return self.accepted()

    def read(self) -> tuple[int, bool, bytes] | None:
        """The next client frame (opcode, fin, unmasked payload); None at EOF. Asserts the client masked it."""
        head = self._read_exact(2)
        if head is None:
            return None
        assert head[1] & 0x80, "a client frame MUST be masked"
        assert not head[0] & 0x70, "no extension was negotiated: reserved bits must be 0"
        size = self._read_length(head[1])
        key = self._read_exact(4)
        payload = self._read_exact(size) if size else b""
        assert key is not None and payload is not None
        return head[0] & 0x0F, bool(head[0] & 0x80), bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


def connect(server: RawServer) -> SansIoClient:
    """A client with a small message limit (the size-limit case exceeds it)."""
    return SansIoClient.connect(server.url, timeout=5, max_message_size=4096)


def close_code(frame: tuple[int, bool, bytes] | None) -> int:
    assert frame is not None and frame[0] == CLOSE, frame
    return struct.unpack("!H", frame[2][:2])[0]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 70000])
def test_client_masks_every_text_frame_at_every_length_encoding(raw_server: RawServer, size: int) -> None:
    client = connect(raw_server)
    text = "é" * (size // 2) + "x" * (size % 2)
    client.send(text)
    client.send(b"\x00\x01" * 3)
    assert raw_server.read() == (TEXT, True, text.encode())
    assert raw_server.read() == (BINARY, True, b"\x00\x01" * 3)
    client.close(timeout=0.2)


def test_client_masks_with_a_fresh_key_per_frame(raw_server: RawServer) -> None:
    client = connect(raw_server)
    client.send("same")
    client.send("same")
    conn = raw_server.accepted()
    wire = b""
    while len(wire) < 2 * (2 + 4 + 4):
        wire += conn.recv(64)
    first, second = wire[:10], wire[10:20]
    assert first[1] == second[1] == 0x80 | 4
    assert first[2:6] != second[2:6] and first[6:] != b"same"  # a predictable (or no) key is what 5.3 forbids
    client.close(timeout=0.2)


def test_client_reassembles_fragments_with_pings_between_and_answers_each_with_a_masked_pong(
        raw_server: RawServer) -> None:
    client = connect(raw_server)
    whole = "Grüße, 世界 — fragmented".encode()
    cut1, cut2 = whole.index("ü".encode()) + 1, whole.index("世".encode()) + 2
    raw_server.send(raw_server.frame(TEXT, whole[:cut1], fin=False), raw_server.frame(PING, b"one"),
                    raw_server.frame(CONT, whole[cut1:cut2], fin=False), raw_server.frame(PING, b"two"),
                    raw_server.frame(CONT, whole[cut2:]), raw_server.frame(BINARY, b"\xff\x00"))
    assert client.receive(timeout=5) == whole.decode()
    assert client.receive(timeout=5) == b"\xff\x00"
    assert raw_server.read() == (PONG, True, b"one")
    assert raw_server.read() == (PONG, True, b"two")
    assert client.receive(timeout=0.05) is None  # nothing more: a timeout, the socket still open
    assert client.connected
    client.close(timeout=0.2)


def test_client_keeps_the_frames_that_arrive_with_the_handshake_response() -> None:
    ready = RawServer.frame(TEXT, b'{"type": "session.ready"}')
    server = RawServer(after_response=ready + RawServer.frame(CLOSE, struct.pack("!H", 1008) + b"no"))
    try:
        client = SansIoClient.connect(server.url, timeout=5)
        assert client.receive(timeout=0) == '{"type": "session.ready"}'  # no read needed: it came with the 101
        assert close_code(server.read()) == 1008  # the server's close was answered
        with pytest.raises(ConnectionClosed):
            client.receive(timeout=1)
        assert client.close_reason == 1008
        client_close_is_quiet(client)
    finally:
        server.close()


@pytest.mark.parametrize("frames, code", [
    pytest.param([RawServer.frame(TEXT, b"masked", mask=True)], 1002, id="masked-server-frame"),
    pytest.param([RawServer.frame(TEXT, b"\xff\xfe bad utf-8")], 1007, id="invalid-utf8"),
    pytest.param([RawServer.frame(TEXT, b"ok \xe4", fin=False), RawServer.frame(CONT, b"\x28 bad")], 1007,
                 id="invalid-utf8-across-fragments"),
    pytest.param([RawServer.frame(PING, b"x", fin=False)], 1002, id="fragmented-control-frame"),
    pytest.param([RawServer.frame(CONT, b"x")], 1002, id="continuation-without-a-start"),
    pytest.param([RawServer.frame(BINARY, b"x" * 3000, fin=False), RawServer.frame(CONT, b"x" * 3000)], 1009,
                 id="fragments-too-big-together"),
])
def test_client_fails_the_connection_with_the_rfc_code(raw_server: RawServer, frames: list[bytes], code: int) -> None:
    client = connect(raw_server)
    raw_server.send(*frames)
    with pytest.raises(ConnectionClosed):
        client.receive(timeout=5)
    assert close_code(raw_server.read()) == code
    assert not client.connected
    client_close_is_quiet(client)


def client_close_is_quiet(client: SansIoClient) -> None:
    with pytest.raises(ConnectionClosed):  # already closed: close() only releases the socket
        client.close(timeout=0.2)


def test_client_answers_a_close_the_server_starts(raw_server: RawServer) -> None:
    client = connect(raw_server)
    raw_server.send(raw_server.frame(TEXT, b"last"), raw_server.frame(CLOSE, struct.pack("!H", 1001) + b"away"))
    assert client.receive(timeout=5) == "last"  # what came before the close is still delivered
    with pytest.raises(ConnectionClosed):
        client.receive(timeout=5)
    assert (client.close_reason, client.close_message) == (1001, "away")
    assert close_code(raw_server.read()) == 1001  # echoed (RFC 6455 5.5.1)
    client_close_is_quiet(client)
    assert raw_server.read() is None  # and the TCP connection is released


def test_client_close_reads_on_until_the_servers_close_then_releases(raw_server: RawServer) -> None:
    client = connect(raw_server)
    client.send("last words")
    # The server is mid-stream when the client closes: unread input must be read, not reset.
    raw_server.send(*(raw_server.frame(TEXT, b"x" * 1000) for _ in range(200)))
    closer = threading.Thread(target=client.close, kwargs={"timeout": 5}, daemon=True)
    closer.start()
    assert raw_server.read() == (TEXT, True, b"last words")
    assert close_code(raw_server.read()) == 1000
    raw_server.send(raw_server.frame(CLOSE, struct.pack("!H", 1000)))
    closer.join(timeout=5)
    assert not closer.is_alive()  # the server's close ended the wait (not the 5 s timeout)
    assert raw_server.read() is None  # FIN, not a reset (a reset raises here)
    assert not client.connected


def test_client_close_is_bounded_when_the_server_never_answers(raw_server: RawServer) -> None:
    client = connect(raw_server)
    started = time.monotonic()
    closer = threading.Thread(target=client.close, kwargs={"timeout": 0.3}, daemon=True)
    closer.start()
    # Bounded by its own timeout: the server never answers, yet close returns (a bound only a close that waits
    # for the peer forever can exceed, however loaded the machine) ...
    closer.join(timeout=10)
    assert not closer.is_alive()
    # ... and it did wait for the answer first (a lower bound: no load makes a wait shorter).
    assert time.monotonic() - started >= 0.3
    assert close_code(raw_server.read()) == 1000
    assert raw_server.read() is None


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a self-signed certificate for 127.0.0.1 that only this client trusts."""
    folder = tmp_path_factory.mktemp("wss")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_client_over_tls_sends_receives_and_closes_with_a_handshake(
        tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Kallglot's stream is ``wss://``: a TLS socket cannot be duplicated, so one socket reads and sends."""
    server_context, client_context = tls_contexts
    server = RawServer(tls=server_context, after_response=RawServer.frame(TEXT, b"ready"))
    try:
        client = SansIoClient.connect(server.url, timeout=5, ssl_context=client_context)
        assert client.receive(timeout=5) == "ready"
        client.send("x" * 300)
        assert server.read() == (TEXT, True, b"x" * 300)
        server.send(*(server.frame(TEXT, f"audio {n}".encode()) for n in range(50)))
        assert [client.receive(timeout=5) for _ in range(50)] == [f"audio {n}" for n in range(50)]
        closer = threading.Thread(target=client.close, kwargs={"timeout": 5}, daemon=True)
        closer.start()
        assert close_code(server.read()) == 1000
        server.send(server.frame(CLOSE, struct.pack("!H", 1000)))
        closer.join(timeout=5)
        assert not closer.is_alive() and not client.connected
    finally:
        server.close()


def test_a_refused_upgrade_is_a_handshake_error() -> None:
    server = RawServer(status="403 Forbidden")
    try:
        with pytest.raises(HandshakeFailed):
            SansIoClient.connect(server.url, timeout=5)
    finally:
        server.close()


def test_the_kallglot_stream_socket_has_no_reader_thread(raw_server: RawServer) -> None:
    """The sans-I/O client reads in its caller's greenlet: opening a stream starts no thread (or greenlet)."""
    def threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.is_alive() and t is not raw_server._accepted}

    before = threads()
    stream = KallglotStream.open(raw_server.url, "kst_test_token", timeout=5)
    try:
        assert threads() == before  # simple-websocket's client started a reader thread per socket here
        assert isinstance(stream._ws, SansIoClient)
    finally:
        stream.close(timeout=0.2)
