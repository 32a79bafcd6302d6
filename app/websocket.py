"""The WebSocket layer beneath flask-sock's routes: simple-websocket (flask-sock's own) or, with
``WEBSOCKET_LAYER=sansio``, :class:`SansIoServer`.

:class:`SansIoServer` keeps simple-websocket's ``Server`` API (``receive(timeout)``, ``send``, ``close``,
``connected``, ``sock``) but frames with the ``websockets`` library's sans-I/O protocol (its C speedup unmasks)
and reads in the handler's own greenlet: no reader greenlet and condition-variable hand-off per socket, and every
frame that one ``recv`` brought is parsed in one pass. RFC 6455 rules (fragmentation, control frames between
fragments, the close handshake, masking, size limits) are the protocol's; UTF-8 of text messages is checked here
(1007). Outbound unfragmented text frames are built directly (a server frame is unmasked: header + payload).

:class:`MediaSock` is flask-sock's ``Sock`` whose routes build the server class the app configured
(``SOCK_SERVER_CLASS``); routes are declared exactly as with flask-sock.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

#: How long ``close()`` waits for the peer's close frame before the TCP connection is dropped.
CLOSE_HANDSHAKE_SECONDS = 1.0
#: One ``recv`` takes up to this much: every frame a busy socket has queued, parsed in one pass.
RECEIVE_BYTES = 65536

log = logging.getLogger(__name__)


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs every connection's open and close at INFO; the relay logs each leg's end itself."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        """Dropped (see the class docstring); warnings and errors still go through."""


_PROTOCOL_LOG = _ProtocolLog(logging.getLogger(__name__), {})


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


class SansIoServer:
    """One server-side WebSocket connection (simple-websocket's ``Server`` API, see the module docstring)."""

    def __init__(self, environ: dict[str, Any], subprotocols: Any = None, receive_bytes: int = RECEIVE_BYTES,
                 ping_interval: float | None = None, max_message_size: int | None = None, **_: Any) -> None:
        self.sock, self.mode = _socket_from_environ(environ)
        self.subprotocol = None
        self.connected = False
        self.close_reason: int = CloseCode.NO_STATUS_RCVD
        self.close_message: str | None = None
        self._receive_bytes = max(receive_bytes, RECEIVE_BYTES)
        self._protocol = ServerProtocol(max_size=max_message_size, logger=_PROTOCOL_LOG)
        self._messages: deque[str | bytes] = deque()
        self._fragments: list[bytes] = []
        self._fragmented_text = False
        # The handler's greenlet reads (and may answer pings) while the downlink greenlet sends.
        self._lock = threading.Lock()
        # Reads go through a duplicate of the socket: its timeout (each receive's) never applies to sends.
        self._reader = self.sock.dup()
        self._reader_closed = False
        # The protocol parses the request itself (and so is ready for frames after it).
        self._protocol.receive_data(_request_bytes(environ))
        requests = [e for e in self._protocol.events_received() if isinstance(e, Request)]
        response = (self._protocol.accept(requests[0]) if requests
                    else self._protocol.reject(400, "Failed to open a WebSocket connection.\n"))
        self._protocol.send_response(response)
        with self._lock:
            self._write_pending()
        if response.status_code != 101:
            self._close_reader()
            raise HandshakeRefused(response.status_code)
        self.connected = True

    # -- the simple-websocket API ---------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next message; None if none came within ``timeout``; ConnectionClosed once closed and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not self._read(remaining) and remaining is not None and time.monotonic() >= deadline:
                return None
        return self._messages.popleft()

    def send(self, data: str | bytes) -> None:
        """Send one text (``str``) or binary message."""
        with self._lock:
            if not self.connected or self._protocol.state is not OPEN:
                raise ConnectionClosed(self.close_reason, self.close_message)
            if isinstance(data, str):
                payload = data.encode()
                size = len(payload)
                if size < 126:  # pre-built header: FIN + text, unmasked (a server's frames are never masked)
                    frame = bytes((0x81, size)) + payload
                elif size < 65536:
                    frame = b"\x81\x7e" + size.to_bytes(2, "big") + payload
                else:
                    self._protocol.send_text(payload)
                    self._write_pending()
                    return
                self._sendall(frame)
            else:
                self._protocol.send_binary(bytes(data))
                self._write_pending()

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        """Start the closing handshake, wait briefly for the peer's answer, release the socket."""
        with self._lock:
            if not self.connected:
                self._close_reader()  # the peer closed or broke the protocol: only our duplicate is left
                raise ConnectionClosed(self.close_reason, self.close_message)
            self.connected = False
            if self._protocol.state is OPEN:
                self._protocol.send_close(reason or CloseCode.NORMAL_CLOSURE, message or "")
            self._write_pending()
        deadline = time.monotonic() + CLOSE_HANDSHAKE_SECONDS
        try:
            while self._protocol.state is not State.CLOSED and not self._reader_closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._read(remaining, closing=True):
                    break
        finally:
            self._close_reader()

    # -- reading --------------------------------------------------------------------------------------------
    def _read(self, timeout: float | None, *, closing: bool = False) -> bool:
        """One ``recv`` (waiting at most ``timeout``), parsed in one pass; False if nothing came."""
        if self._reader_closed:
            self.connected = False
            return False
        try:
            self._reader.settimeout(timeout)
            data = self._reader.recv(self._receive_bytes)
        except (socket.timeout, BlockingIOError):
            return False
        except OSError:
            data = b""
        with self._lock:
            if data:
                self._protocol.receive_data(data)
            else:
                self._protocol.receive_eof()
            self._take_events()
            self._write_pending()
            if self._protocol.state is not OPEN:
                self.connected = False
                if not closing or self._protocol.state is State.CLOSED:
                    self._remember_close()
        if not data:
            self._close_reader()
        return True

    def _take_events(self) -> None:
        """Assemble messages from the frames received (control frames are answered by the protocol)."""
        for frame in self._protocol.events_received():
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
            else:  # the protocol's end of stream: a server closes its side of the TCP connection
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.connected = False
            raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, str(exc)) from exc

    def _close_reader(self) -> None:
        if not self._reader_closed:
            self._reader_closed = True
            self._reader.close()


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
