"""The relay's connection to a Kallglot session's stream socket.

The socket is :class:`app.websocket_sansio.SansIoClient`: the same sans-I/O path as the carrier's side (the
``websockets`` protocol, frames parsed in one pass per ``recv`` in the downlink's own greenlet, no reader
greenlet per socket), masked as a client must, with Nagle off and a real closing handshake on close.
"""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import quote

import gevent
from simple_websocket import ConnectionClosed

from app.kallglot import stream_protocol
from app.kallglot.stream_protocol import ServerMessage
from app.websocket_sansio import SansIoClient

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


class KallglotStreamError(Exception):
    """The stream socket could not be opened."""


class KallglotStream:
    """One call leg's stream socket to Kallglot; sends are serialized so two threads may share it."""

    def __init__(self, ws: SansIoClient) -> None:
        self._ws = ws
        self._send_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, token: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> KallglotStream:
        """Connect to ``{url}?token=…`` (the newer docs' only stream auth) within ``timeout`` seconds."""
        full_url = f"{url}{'&' if '?' in url else '?'}token={quote(token, safe='')}"
        try:
            with gevent.Timeout(timeout, KallglotStreamError("timed out connecting to the Kallglot stream")):
                ws = SansIoClient.connect(full_url, timeout=timeout, max_message_size=MAX_MESSAGE_BYTES)
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
            self._ws.send(text)

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
        """Whether the socket is still open (a close or EOF that already arrived counts, read or not)."""
        return self._ws.poll()

    def close(self, timeout: float = CLOSE_HANDSHAKE_SECONDS) -> None:
        """Close with a closing handshake (normal closure): send close, stop writing, drain until Kallglot's
        close or EOF (at most ``timeout`` seconds), then close the socket. Safe to call more than once."""
        started = time.monotonic()
        with self._send_lock:  # a send in progress finishes before the close frame goes out
            try:
                self._ws.close(timeout=max(0.0, timeout - (time.monotonic() - started)))
            except (ConnectionClosed, OSError):  # already closed (by Kallglot, or a broken socket): released
                pass
