"""The relay's connection to a Kallglot session's stream socket."""
from __future__ import annotations

import threading
from urllib.parse import quote

import gevent
from simple_websocket import Client, ConnectionClosed

from app.kallglot import stream_protocol
from app.kallglot.stream_protocol import ServerMessage

#: Kallglot's reachability is checked at call time; a stream connect that takes longer is a failure.
CONNECT_TIMEOUT_SECONDS = 5.0
#: Largest frame accepted from Kallglot (a few seconds of return audio is ~100 KB of base64).
MAX_MESSAGE_BYTES = 1 << 20


class _StreamClient(Client):
    """simple-websocket's client, minus a handshake race.

    ``Client.handshake`` consumes only the first event of its read; when Kallglot's first frame
    (``session.ready``, or ``session.error`` + close on refusal) arrives in the same TCP read as the 101
    response, it would sit unprocessed until more bytes came. Handle what is buffered before reading on.
    """

    def _thread(self) -> None:
        self.connected = self._handle_events()
        super()._thread()


class KallglotStreamError(Exception):
    """The stream socket could not be opened."""


class KallglotStream:
    """One call leg's stream socket to Kallglot; sends are serialized so two threads may share it."""

    def __init__(self, ws: Client) -> None:
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
        """Whether the socket is still open."""
        return bool(self._ws.connected)

    def close(self) -> None:
        """Close the socket (normal closure) if it is still open."""
        try:
            with self._send_lock:
                if self._ws.connected:
                    self._ws.close()
        except (ConnectionClosed, OSError):
            pass
