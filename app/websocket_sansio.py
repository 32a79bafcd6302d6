"""WebSocket connections on the ``websockets`` library's sans-I/O protocol, read in the caller's own greenlet.

:class:`SansIoConnection` is what both ends share: ``receive(timeout)``, ``send``, ``close`` and ``connected`` as
simple-websocket has them, but every frame one ``recv`` brought is parsed in one pass by the protocol (its C
speedup unmasks) and no reader greenlet or condition-variable hand-off sits between the socket and the caller.
RFC 6455 rules (fragmentation, control frames between fragments, the close handshake, masking, size limits) are
the protocol's; UTF-8 of text messages is checked here (1007). Unfragmented outbound text frames are built
directly. The media routes' server side is :class:`app.websocket.SansIoServer`; :class:`SansIoClient` is the
client side (the relay's Kallglot stream socket, :mod:`app.kallglot.stream`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from simple_websocket import ConnectionClosed
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Response
from websockets.protocol import OPEN, Protocol, State
from websockets.uri import parse_uri

from app.websocket_gevent import GeventReads

try:  # the C speedup; websockets falls back to the same pure-Python function when it was built without it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - only on a build of websockets without its C extension
    from websockets.utils import apply_mask

#: How long ``close()`` waits for the peer's close frame (or EOF) before the TCP connection is dropped.
CLOSE_HANDSHAKE_SECONDS = 1.0
#: One ``recv`` takes up to this much: every frame a busy socket has queued, parsed in one pass.
RECEIVE_BYTES = 65536


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs every connection's open and close at INFO; the relay logs each leg's end itself."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        """Dropped (see the class docstring); warnings and errors still go through."""


PROTOCOL_LOG = _ProtocolLog(logging.getLogger(__name__), {})


class SansIoConnection:
    """One WebSocket connection over ``sock`` driven by ``protocol`` (already past its opening handshake).

    The reading greenlet (whoever calls :meth:`receive`) may answer pings and closes while another greenlet sends:
    writes are serialized by a lock. Reads go through ``reader`` (a duplicate of a plain socket, so each
    receive's timeout never applies to sends).
    """

    def __init__(self, sock: socket.socket, protocol: Protocol, reader: socket.socket,
                 receive_bytes: int = RECEIVE_BYTES) -> None:
        self.sock = sock
        self.connected = False
        self.close_reason: int = CloseCode.NO_STATUS_RCVD
        self.close_message: str | None = None
        self._protocol = protocol
        self._reader = reader
        self._reader_closed = False
        self._receive_bytes = max(receive_bytes, RECEIVE_BYTES)
        self._messages: deque[str | bytes] = deque()
        self._fragments: list[bytes] = []
        self._fragmented_text = False
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._send_failed: str | None = None  # why: no more sends, but reads go on (a ``stop`` may sit unread)
        # Under gevent (the bridge), a plain socket is read without gevent's recv(timeout): app/websocket_gevent.py.
        self._gevent_reads = GeventReads(reader, self._receive_bytes) if GeventReads.usable(reader) else None

    # -- the simple-websocket API ---------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next message; None if none came within ``timeout``; ConnectionClosed once closed and drained."""
        messages = self._messages
        if messages:  # the hot path: a message the last read already parsed, no clock, no wait
            return messages.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not messages:
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not self._read(remaining) and remaining is not None and time.monotonic() >= deadline:
                return None
        return messages.popleft()

    def send(self, data: str | bytes) -> None:
        """Send one text (``str``) or binary message."""
        with self._lock:
            if self._send_failed is not None:
                raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, self._send_failed)
            if not self.connected or self._protocol.state is not OPEN:
                raise ConnectionClosed(self.close_reason, self.close_message)
            if isinstance(data, str):
                frame = self._text_frame(data.encode())
                if frame is not None:
                    self._sendall(frame)
                    return
                self._protocol.send_text(data.encode())
            else:
                self._protocol.send_binary(bytes(data))
            self._write_pending()

    def close(self, reason: int | None = None, message: str | None = None,
              timeout: float = CLOSE_HANDSHAKE_SECONDS) -> None:
        """Start the closing handshake, read on (at most ``timeout``) until the peer's answer, release the socket.

        Raises ConnectionClosed if the connection was already closed (by the peer or a protocol error).
        """
        with self._lock:
            if not self.connected or self._send_failed is not None:
                self.connected = False
                self._release()  # the peer closed or broke the protocol: only our side is left to free
                raise ConnectionClosed(self.close_reason, self.close_message)
            self.connected = False
            if self._protocol.state is OPEN:
                self._protocol.send_close(reason or CloseCode.NORMAL_CLOSURE, message or "")
            self._write_pending()
        # Read on after our close: with unread input queued (the peer was mid-stream), closing the socket now
        # would make the kernel answer with a reset, discarding what we sent last and our close frame.
        deadline = time.monotonic() + timeout
        try:
            while not self._close_done() and not self._reader_closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._read(remaining, closing=True):
                    break
        finally:
            self._release()

    # -- what the two sides do differently ------------------------------------------------------------------
    def _text_frame(self, payload: bytes) -> bytes | None:
        """The whole frame for a text message (None: too long, let the protocol frame it)."""
        raise NotImplementedError

    def _close_done(self) -> bool:
        """Whether the closing handshake has come far enough to release the socket."""
        return self._protocol.state is State.CLOSED

    def _release(self) -> None:
        """Free what this side owns once the connection is over (always the reader)."""
        self._close_reader()

    # -- reading --------------------------------------------------------------------------------------------
    def _read(self, timeout: float | None, *, closing: bool = False) -> bool:
        """One ``recv`` (waiting at most ``timeout``), parsed in one pass; False if nothing came.

        One reader at a time: :meth:`close` may run in another greenlet than :meth:`receive` (the relay's uplink
        closes the Kallglot socket its downlink reads); it then waits for that read, which brings the peer's
        answer as well as anything else, instead of waiting on the same socket.
        """
        if not self._read_lock.acquire(blocking=False):  # contended only while closing: wait, within timeout
            started = time.monotonic()
            if not self._read_lock.acquire(timeout=-1 if timeout is None else timeout):
                return False
            if timeout is not None:
                timeout = max(timeout - (time.monotonic() - started), 0.0)
        try:
            if self._reader_closed or (closing and self._close_done()):
                self.connected = False
                return False
            try:
                if self._gevent_reads is not None:
                    received = self._gevent_reads.recv(timeout)
                    if received is None:
                        return False
                    data = received
                else:
                    self._reader.settimeout(timeout)
                    data = self._reader.recv(self._receive_bytes)
            except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
                return False
            except OSError:
                data = b""
            with self._lock:
                if data:
                    self._protocol.receive_data(data)
                else:
                    self._protocol.receive_eof()
                self._take_events(self._protocol.events_received())
                if self._send_failed is None:  # a pong or close answer, unless the peer is gone for writing
                    try:  # (not contextlib.suppress: no context-manager object per read on the media path)
                        self._write_pending()
                    except ConnectionClosed:
                        pass
                if self._protocol.state is not OPEN:
                    self.connected = False
                    if not closing or self._close_done():
                        self._remember_close()
            if not data:
                self._close_reader()
            return True
        finally:
            self._read_lock.release()

    def _take_events(self, frames: list[Any]) -> None:
        """Assemble messages from the frames received (control frames are answered by the protocol)."""
        for frame in frames:
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self._deliver(frame.data, opcode is Opcode.TEXT)
                else:
                    self._fragments, self._fragmented_text = [bytes(frame.data)], opcode is Opcode.TEXT
            elif opcode is Opcode.CONT:
                self._fragments.append(bytes(frame.data))
                if frame.fin:
                    data, self._fragments = b"".join(self._fragments), []
                    self._deliver(data, self._fragmented_text)

    def _deliver(self, data: bytes | bytearray, text: bool) -> None:
        if not text:
            self._messages.append(bytes(data))
            return
        try:
            self._messages.append(bytes(data).decode())
        except UnicodeDecodeError as exc:  # RFC 6455 8.1: fail the connection with 1007
            self._protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")

    def _remember_close(self) -> None:
        received, sent = self._protocol.close_rcvd, self._protocol.close_sent
        close = received or sent
        self.close_reason = close.code if close is not None else CloseCode.ABNORMAL_CLOSURE
        self.close_message = close.reason if close is not None else None

    # -- writing (under the lock) ---------------------------------------------------------------------------
    def _write_pending(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._sendall(data)
            else:  # the protocol's end of stream: close our side of the TCP connection
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)

    def _sendall(self, data: bytes) -> None:
        try:
            # One send() takes a whole media frame unless the socket's send buffer is full: gevent's sendall()
            # would first ask the kernel for SO_SNDBUF (a system call per frame) and slice a memoryview.
            sent = self.sock.send(data)
            if sent < len(data):  # a full buffer took part of it: the rest as sendall does (waits, times out)
                self.sock.sendall(memoryview(data)[sent:])
        except OSError as exc:
            self._send_failed = str(exc)  # not ``connected = False``: see __init__
            raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, self._send_failed) from exc

    def _close_reader(self) -> None:
        if not self._reader_closed:
            self._reader_closed = True
            self._reader.close()


class HandshakeFailed(ConnectionError):
    """The server did not accept the WebSocket upgrade (or the connection broke during it)."""


class SansIoClient(SansIoConnection):
    """The client side: connects (``ws://`` or ``wss://``), masks every frame it sends (RFC 6455 5.3)."""

    @classmethod
    def connect(cls, url: str, *, timeout: float, max_message_size: int | None = None,
                ssl_context: ssl.SSLContext | None = None) -> SansIoClient:
        """Open the TCP (and TLS) connection and complete the opening handshake within ``timeout`` seconds.

        Raises ``HandshakeFailed`` (a ``ConnectionError``) when refused, ``OSError`` when unreachable and
        ``ValueError`` for a URL that is not a WebSocket URL.
        """
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(str(exc)) from None
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        try:
            if uri.secure:
                sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=uri.host)
            protocol = ClientProtocol(uri, max_size=max_message_size, logger=PROTOCOL_LOG)
            protocol.send_request(protocol.connect())
            for data in protocol.data_to_send():
                sock.sendall(data)
            # A duplicate for reads (so their timeouts never apply to sends); a TLS socket cannot be duplicated,
            # there the one socket serves both (sends are small and the peer reads continuously).
            reader = sock if uri.secure else sock.dup()
            client = cls(sock, protocol, reader)
            client._handshake(deadline)
        except BaseException:
            sock.close()
            raise
        return client

    def _handshake(self, deadline: float) -> None:
        """Read until the server's response; frames that came in the same read are kept as messages."""
        protocol = self._protocol
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._release()
                raise HandshakeFailed("timed out waiting for the WebSocket handshake")
            try:
                self._reader.settimeout(remaining)
                data = self._reader.recv(self._receive_bytes)
            except socket.timeout:
                continue
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            events = protocol.events_received()
            if protocol.handshake_exc is not None or not data:
                self._release()
                raise HandshakeFailed(f"WebSocket handshake failed ({type(protocol.handshake_exc).__name__})")
            if events and isinstance(events[0], Response):
                break
        self.connected = True
        # Kallglot's first frame (session.ready, or session.error and a close) often shares the response's read.
        self._take_events(events[1:])
        self._write_pending()  # a pong to a ping, or the answer to a close, that came with the response
        if self._protocol.state is not OPEN:
            self.connected = False
            self._remember_close()

    def poll(self) -> bool:
        """Whether the connection is still open, after taking in whatever has already arrived (never waits).

        There is no reader greenlet to notice a close or EOF by itself: a caller that is not receiving (a sender
        deciding whether to queue) asks here. Messages read meanwhile wait for :meth:`receive`.
        """
        if self.connected:
            self._read(0.0)  # a no-op while another greenlet is reading (it will notice the end itself)
        return self.connected

    def _text_frame(self, payload: bytes) -> bytes | None:
        size = len(payload)
        if size < 126:  # FIN + text, mask bit set, a fresh 4-byte key, the payload masked with it
            head = bytes((0x81, 0x80 | size))
        elif size < 65536:
            head = b"\x81\xfe" + size.to_bytes(2, "big")
        else:
            return None
        key = os.urandom(4)
        return head + key + apply_mask(payload, key)

    def _close_done(self) -> bool:
        # A client may release once the server's close frame came (the server then closes the TCP connection;
        # nothing more can arrive that would be left unread), or at EOF.
        return self._protocol.close_rcvd is not None or self._protocol.state is State.CLOSED

    def _release(self) -> None:
        self._close_reader()
        try:
            self.sock.close()
        except OSError:
            pass
