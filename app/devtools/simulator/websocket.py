"""WebSocket client pieces every carrier simulator shares: a simple-websocket client whose connect obeys a
timeout, and the http→ws URL scheme mapping."""
from __future__ import annotations

import socket
import ssl
import threading
from urllib.parse import urlsplit

from simple_websocket import Client
from simple_websocket.ws import Base
from wsproto import ConnectionType


class TimedClient(Client):
    """simple_websocket Client whose TCP connect and handshake obey a timeout.

    The stock client connects and reads the handshake with a blocking socket and no timeout.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        parts = urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        self.host, self.port = parts.hostname, parts.port or (443 if secure else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.subprotocols, self.extra_headeers = [], list(headers.items())
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            # Daemon reader thread: a peer that never closes must not keep the interpreter alive.
            Base.__init__(self, sock, connection_type=ConnectionType.CLIENT,
                          thread_class=lambda target: threading.Thread(target=target, daemon=True))
        except BaseException:
            sock.close()
            raise

    def handshake(self) -> None:
        super().handshake()
        self.sock.settimeout(None)  # the reader thread blocks in recv(); our receive() calls time out



def ws_scheme(url: str) -> str:
    """http -> ws, https -> wss (other schemes unchanged)."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


def drop_connection(sock: socket.socket) -> None:
    """Drop a media socket's TCP connection without ``stop`` or a close frame, as a carrier losing a call's media."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already gone
        pass
    sock.close()
