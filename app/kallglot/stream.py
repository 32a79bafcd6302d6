"""The relay's connection to a Kallglot session's stream socket."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any
from urllib.parse import quote

import gevent
from simple_websocket import Client, ConnectionClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from app.kallglot import stream_protocol
from app.kallglot.stream_protocol import ServerMessage

#: Kallglot's reachability is checked at call time; a stream connect that takes longer is a failure.
CONNECT_TIMEOUT_SECONDS = 5.0
#: Largest frame accepted from Kallglot (a few seconds of return audio is ~100 KB of base64).
MAX_MESSAGE_BYTES = 1 << 20
#: How long :meth:`KallglotStream.close` waits for Kallglot's close frame (or EOF) before closing anyway.
CLOSE_HANDSHAKE_SECONDS = 1.0


def set_tcp_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle off: a relay's small, latency-bound frames (and its last flush) must leave at once."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a test double, a Unix socket): nothing to tune
        pass


class _StreamClient(Client):
    """simple-websocket's client with two fixes the relay needs.

    * A handshake race: ``Client.handshake`` consumes only the first event of its read; when Kallglot's first
      frame (``session.ready``, or ``session.error`` + close on refusal) arrives in the same TCP read as the 101
      response, it would sit unprocessed until more bytes came. Handle what is buffered before reading on.
    * A real closing handshake. The library's ``close()`` sends the close frame and closes the socket at once;
      with unread input still queued (Kallglot's echo of an earlier chunk) Linux answers with a reset, which
      discards our last audio and the close frame still in flight. Here the reader keeps reading after our close
      until Kallglot's close frame or EOF (:meth:`close_gracefully` bounds the wait), and answers a close that
      Kallglot starts, so the socket is closed only once both sides are done.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before the library's __init__ starts the reader, which sets it once the socket is closed.
        self.reader_done = threading.Event()
        super().__init__(*args, **kwargs)

    def _thread(self) -> None:
        try:
            self.connected = self._handle_events()
            self._answer_peer_close()
            # Unlike the library's loop (``while self.connected``), go on after *our* close: until the peer's
            # close frame or EOF, whatever Kallglot sends must be read, or the kernel resets the connection.
            while self.ws.state in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
                try:
                    in_data = self.sock.recv(self.receive_bytes)
                except OSError:
                    break
                if not in_data:
                    break
                try:
                    self.ws.receive_data(in_data)
                    keep_going = self._handle_events()
                except (LocalProtocolError, OSError):
                    break
                self._answer_peer_close()
                if not keep_going:
                    break
        finally:
            self.connected = False
            self.event.set()
            try:
                self.sock.close()
            finally:
                self.reader_done.set()

    def _answer_peer_close(self) -> None:
        """Echo a close frame Kallglot started (RFC 6455 §5.5.1); the library's client never answers one."""
        if self.ws.state is not ConnectionState.REMOTE_CLOSING:
            return
        try:
            self.sock.sendall(self.ws.send(CloseConnection(self.close_reason or CloseReason.NORMAL_CLOSURE)))
        except (LocalProtocolError, OSError):
            pass

    def send_text(self, text: str) -> None:
        """Send one whole text frame (``sendall``: the library's ``sock.send`` may write part of it)."""
        if not self.connected:
            raise ConnectionClosed(self.close_reason, self.close_message)
        try:
            data = self.ws.send(TextMessage(data=text))
        except LocalProtocolError:  # our close already went out
            raise ConnectionClosed(self.close_reason, self.close_message) from None
        self.sock.sendall(data)

    def close_gracefully(self, code: int = CloseReason.NORMAL_CLOSURE, timeout: float = CLOSE_HANDSHAKE_SECONDS) -> None:
        """Send our close frame, stop writing, and wait (at most ``timeout``) for the reader to see the end."""
        if self.ws.state is ConnectionState.OPEN:
            try:
                self.sock.sendall(self.ws.send(CloseConnection(code)))
            except (LocalProtocolError, OSError):
                pass
        self.connected = False  # no more sends; receive() returns what is buffered, then raises
        self.event.set()
        if self.reader_done.wait(timeout):
            return
        # Kallglot did not answer in time: give up on the handshake; closing the socket ends the reader.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class KallglotStreamError(Exception):
    """The stream socket could not be opened."""


class KallglotStream:
    """One call leg's stream socket to Kallglot; sends are serialized so two threads may share it."""

    def __init__(self, ws: _StreamClient) -> None:
        self._ws = ws
        self._send_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, token: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> KallglotStream:
        """Connect to ``{url}?token=…`` (the newer docs' only stream auth) within ``timeout`` seconds."""
        full_url = f"{url}{'&' if '?' in url else '?'}token={quote(token, safe='')}"
        try:
            with gevent.Timeout(timeout, KallglotStreamError("timed out connecting to the Kallglot stream")):
                ws = _StreamClient.connect(full_url, max_message_size=MAX_MESSAGE_BYTES)
        except KallglotStreamError:
            raise
        except (OSError, ConnectionError, ConnectionClosed, ValueError) as exc:
            # The exception text may contain the URL; keep the token out of it.
            raise KallglotStreamError(f"could not connect to the Kallglot stream ({type(exc).__name__})") from None
        set_tcp_nodelay(ws.sock)
        return cls(ws)

    def send(self, text: str) -> None:
        """Send one text frame; raises ``ConnectionClosed`` when the socket is gone."""
        with self._send_lock:
            self._ws.send_text(text)

    def ping(self) -> None:
        """Send Kallglot's application-level keepalive."""
        self.send(stream_protocol.PING)

    def receive(self, timeout: float | None) -> ServerMessage | None:
        """Next message from Kallglot, ``None`` on timeout; raises ``ConnectionClosed`` when closed."""
        raw = self._ws.receive(timeout=timeout)
        if raw is None:
            return None
        return stream_protocol.parse_server_message(raw)

    @property
    def connected(self) -> bool:
        """Whether the socket is still open."""
        return bool(self._ws.connected)

    def close(self, timeout: float = CLOSE_HANDSHAKE_SECONDS) -> None:
        """Close with a closing handshake (normal closure): send close, stop writing, drain until Kallglot's
        close or EOF (at most ``timeout`` seconds), then close the socket. Safe to call more than once."""
        started = time.monotonic()
        with self._send_lock:  # a send in progress finishes before the close frame goes out
            try:
                self._ws.close_gracefully(timeout=max(0.0, timeout - (time.monotonic() - started)))
            except (ConnectionClosed, OSError):
                pass
