"""Reading a plain gevent socket without gevent's ``recv(timeout)``: the sans-I/O WebSocket layer's hot wait.

gevent's ``recv`` with a timeout tries the socket, fails with ``EAGAIN``, waits on the socket's watcher under a new
``Timeout`` (an exception object and a timer watcher) and tries again. A relay's socket wakes 20–60 times a second
per call, and right after a read that emptied it the first try can only fail. :class:`GeventReads` waits first
then (one system call and the exception fewer) and waits in the hub with one timer watcher and no ``Timeout``;
otherwise it tries first, as gevent does. Closing the socket from another greenlet still raises ``OSError``
(EBADF) in the waiting one, as in gevent's own waits (``Hub.cancel_wait`` throws through the waiter).
"""
from __future__ import annotations

import socket
import time

from gevent.hub import Waiter
from gevent.socket import socket as GeventSocket

#: A receive this soon after a read that emptied the socket waits for it to be readable before calling ``recv``;
#: a later one tries ``recv`` first (data may have come meanwhile: the uplink's hold, a busy worker).
WAIT_FIRST_SECONDS = 0.005


class GeventReads:
    """The reads of one plain gevent socket (not TLS: its library may hold decrypted bytes the socket does not
    show as readable). Not thread-safe: the caller serializes reads (``SansIoConnection._read_lock``)."""

    def __init__(self, reader: socket.socket, receive_bytes: int) -> None:
        self._reader = reader
        self._receive_bytes = receive_bytes
        self._drained_at = -1.0  # when the last recv emptied the socket (-1: not known to be empty)

    @staticmethod
    def usable(reader: socket.socket) -> bool:
        """Whether ``reader`` is a plain gevent socket this class can read."""
        return type(reader) is GeventSocket and getattr(reader, "_read_event", None) is not None

    def recv(self, timeout: float | None) -> bytes | None:
        """One ``recv`` waiting at most ``timeout`` (None: forever, 0: not at all); None if nothing came, b"" at
        EOF; ``OSError`` as ``recv`` raises it."""
        reader = self._reader
        if reader.timeout != 0.0:
            reader.settimeout(0.0)  # every recv below returns at once; the waiting is ours
        waited = False
        if timeout != 0.0 and time.monotonic() - self._drained_at < WAIT_FIRST_SECONDS:
            if not self._wait_readable(timeout):
                return None
            waited = True
        while True:
            try:
                data = reader.recv(self._receive_bytes)
            except BlockingIOError:
                if waited or timeout == 0.0:  # a wake-up with nothing to read, or no wait asked: nothing came
                    return None
                if not self._wait_readable(timeout):
                    return None
                waited = True
                continue
            self._drained_at = time.monotonic() if 0 < len(data) < self._receive_bytes else -1.0
            return data

    def _wait_readable(self, timeout: float | None) -> bool:
        """Wait in the hub until the socket is readable (True) or ``timeout`` passed (False)."""
        hub = self._reader.hub  # type: ignore[attr-defined]
        watcher = self._reader._read_event  # type: ignore[attr-defined]
        waiter = Waiter(hub)
        timer = hub.loop.timer(timeout) if timeout is not None else None
        watcher.start(waiter.switch, True)
        try:
            if timer is not None:  # from the clock's time now, not the loop's last (as gevent's Timeout does)
                timer.start(waiter.switch, False, update=True)
            return bool(waiter.get())
        finally:
            watcher.stop()
            if timer is not None:
                timer.close()
