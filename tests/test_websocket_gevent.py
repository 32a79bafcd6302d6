"""app/websocket_gevent.py: reading a plain gevent socket with the hub's own wait (no gevent ``Timeout``, no
``EAGAIN`` try right after a read that emptied the socket) — same results as gevent's ``recv(timeout)``."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket as gsocket

from app.websocket_gevent import WAIT_FIRST_SECONDS, GeventReads


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = gsocket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_only_plain_gevent_sockets_are_read_this_way(pair: tuple[socket.socket, socket.socket]) -> None:
    assert GeventReads.usable(pair[0])
    plain, other = socket.socketpair()
    try:
        assert not GeventReads.usable(plain)
    finally:
        plain.close()
        other.close()


def test_what_is_there_is_read_and_nothing_more_within_the_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reads = GeventReads(ours, 65536)
    theirs.sendall(b"frame-1")
    assert reads.recv(1.0) == b"frame-1"
    # The hub's idea of "now" goes stale while this thread blocks outside it (as in a worker between wake-ups,
    # or a test process that ran other tests): a timeout must count from the clock, not from the loop's last now.
    time.sleep(0.2)
    started = time.monotonic()
    assert reads.recv(0.05) is None  # within WAIT_FIRST_SECONDS? no: tries, finds nothing, waits, times out
    assert 0.04 <= time.monotonic() - started < 1.0
    assert reads.recv(0.0) is None  # no wait asked: at once
    theirs.sendall(b"frame-2")
    assert reads.recv(0.0) == b"frame-2"


def test_a_waiting_read_wakes_when_data_comes(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reads = GeventReads(ours, 65536)
    theirs.sendall(b"a")
    assert reads.recv(1.0) == b"a"  # drained: the next read waits first (WAIT_FIRST_SECONDS)
    sender = gevent.spawn_later(WAIT_FIRST_SECONDS / 10, theirs.sendall, b"b")
    assert reads.recv(5.0) == b"b"
    sender.join(timeout=5)
    later = gevent.spawn_later(0.05, theirs.sendall, b"c")  # not right after a read: tries first, then waits
    time.sleep(WAIT_FIRST_SECONDS * 2)
    assert reads.recv(5.0) == b"c"
    later.join(timeout=5)
    forever = gevent.spawn_later(0.02, theirs.sendall, b"d")
    assert reads.recv(None) == b"d"
    forever.join(timeout=5)


def test_eof_is_an_empty_read(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reads = GeventReads(ours, 65536)
    theirs.shutdown(socket.SHUT_WR)
    assert reads.recv(1.0) == b""


def test_closing_the_socket_from_another_greenlet_ends_a_wait_with_oserror(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    reads = GeventReads(ours, 65536)
    closer = gevent.spawn_later(0.02, ours.close)
    with pytest.raises(OSError):
        with gevent.Timeout(5):  # a bound for the test, not the code under test
            reads.recv(None)
    closer.join(timeout=5)
