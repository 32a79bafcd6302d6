"""The WebSocket layer beneath flask-sock's routes: simple-websocket (flask-sock's own) or, with
``WEBSOCKET_LAYER=sansio``, :class:`SansIoServer`.

:class:`SansIoServer` keeps simple-websocket's ``Server`` API (``receive(timeout)``, ``send``, ``close``,
``connected``, ``sock``) but frames with the ``websockets`` library's sans-I/O protocol (its C speedup unmasks)
and reads in the handler's own greenlet: no reader greenlet and condition-variable hand-off per socket, and every
frame that one ``recv`` brought is parsed in one pass. RFC 6455 rules (fragmentation, control frames between
fragments, the close handshake, masking, size limits) are the protocol's; UTF-8 of text messages is checked here
(1007). Outbound unfragmented text frames are built directly (a server frame is unmasked: header + payload).
The reading, framing and closing it shares with the client side (the Kallglot stream socket) are
:class:`app.websocket_sansio.SansIoConnection`'s.

:class:`MediaSock` is flask-sock's ``Sock`` whose routes build the server class the app configured
(``SOCK_SERVER_CLASS``); routes are declared exactly as with flask-sock.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from websockets.http11 import Request
from websockets.server import ServerProtocol

from app.websocket_sansio import CLOSE_HANDSHAKE_SECONDS, PROTOCOL_LOG, RECEIVE_BYTES, SansIoConnection

__all__ = ["CLOSE_HANDSHAKE_SECONDS", "HandshakeRefused", "LAYERS", "MediaSock", "SansIoServer"]

log = logging.getLogger(__name__)


class HandshakeRefused(Exception):
    """The upgrade request was not a valid WebSocket handshake; the 4xx answer has been written."""


def _socket_from_environ(environ: dict[str, Any]) -> tuple[socket.socket, str]:
    """The client's socket and the server's name (as simple-websocket finds them)."""
    if "gunicorn.socket" in environ:
        return environ["gunicorn.socket"], "gunicorn"
    if "werkzeug.socket" in environ:
        return environ["werkzeug.socket"], "werkzeug"
    raise RuntimeError("Cannot obtain socket from WSGI environment.")


def _request_bytes(environ: dict[str, Any]) -> bytes:
    """The upgrade request as it came over the wire, rebuilt from the WSGI environ (the WSGI server read it)."""
    path = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{key[5:].replace('_', '-').title()}: {value}" for key, value in environ.items()
              if key.startswith("HTTP_")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class SansIoServer(SansIoConnection):
    """One server-side WebSocket connection (simple-websocket's ``Server`` API, see the module docstring)."""

    def __init__(self, environ: dict[str, Any], subprotocols: Any = None, receive_bytes: int = RECEIVE_BYTES,
                 ping_interval: float | None = None, max_message_size: int | None = None, **_: Any) -> None:
        sock, self.mode = _socket_from_environ(environ)
        protocol = ServerProtocol(max_size=max_message_size, logger=PROTOCOL_LOG)
        # Reads go through a duplicate of the socket: its timeout (each receive's) never applies to sends.
        super().__init__(sock, protocol, sock.dup(), receive_bytes)
        self.subprotocol = None
        # The protocol parses the request itself (and so is ready for frames after it).
        protocol.receive_data(_request_bytes(environ))
        requests = [e for e in protocol.events_received() if isinstance(e, Request)]
        response = (protocol.accept(requests[0]) if requests
                    else protocol.reject(400, "Failed to open a WebSocket connection.\n"))
        protocol.send_response(response)
        with self._lock:
            self._write_pending()
        if response.status_code != 101:
            self._close_reader()
            raise HandshakeRefused(response.status_code)
        self.connected = True

    def _text_frame(self, payload: bytes) -> bytes | None:
        size = len(payload)
        if size < 126:  # pre-built header: FIN + text, unmasked (a server's frames are never masked)
            return bytes((0x81, size)) + payload
        if size < 65536:
            return b"\x81\x7e" + size.to_bytes(2, "big") + payload
        return None


#: ``WEBSOCKET_LAYER`` values (:data:`app.config.WEBSOCKET_LAYERS`) → the server class a media route gets.
LAYERS: dict[str, type] = {"simple-websocket": Server, "sansio": SansIoServer}


class MediaSock(Sock):
    """flask-sock's ``Sock``; each route builds the app's ``SOCK_SERVER_CLASS`` (default simple-websocket)."""

    def route(self, path: str, bp: Any = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        """Declare a WebSocket route, exactly as :meth:`flask_sock.Sock.route`."""
        def decorator(f: Callable[..., Any]) -> Any:
            @wraps(f)
            def websocket_route(*args: Any, **kw: Any) -> Any:
                server_class = current_app.config.get("SOCK_SERVER_CLASS", Server)
                try:
                    ws = server_class(request.environ, **current_app.config.get("SOCK_SERVER_OPTIONS", {}))
                except HandshakeRefused:
                    return _AlreadyAnswered(mode="gunicorn" if "gunicorn.socket" in request.environ else "")
                try:
                    f(ws, *args, **kw)
                except ConnectionClosed:
                    pass
                try:
                    ws.close()
                except Exception:  # already closed: nothing left to do
                    pass
                # The socket's last line, after everything its handler did (a relay's end, a goodbye to the
                # caller): with the call's log context, it tells an operator (and a test) the socket is done.
                log.info("media socket %s closed", request.path)
                return _AlreadyAnswered(mode=ws.mode)

            kwargs["websocket"] = True
            if bp:
                bp.route(path, **kwargs)(websocket_route)
            elif self.app:
                self.app.route(path, **kwargs)(websocket_route)
            else:
                if self.bp is None:
                    from flask import Blueprint
                    self.bp = Blueprint("__flask_sock", __name__)
                self.bp.route(path, **kwargs)(websocket_route)
            return websocket_route
        return decorator


class _AlreadyAnswered(Response):
    """The socket was taken over: tell the WSGI server not to write a response of its own (as flask-sock does)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self._mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._mode == "gunicorn":
            raise StopIteration()
        if self._mode == "werkzeug":
            return super().__call__(*args, **kwargs)
        return []
