"""Graceful shutdown of a worker (every Heroku or Render deploy sends SIGTERM).

On SIGTERM gunicorn's gevent worker stops accepting connections and waits up to ``graceful_timeout`` for
the open ones. Calls are open connections that may last an hour, so waiting alone would end in a SIGKILL
that cuts them with no record. Instead (see ``gunicorn.conf.py``):

1. :meth:`Drain.begin` marks the worker draining: ``/readyz`` answers 503 and a media socket that still
   reaches this worker is refused (the carrier's ``<Connect action>`` then restores it elsewhere);
2. live calls go on for most of the grace period, so short ones finish naturally;
3. shortly before the grace period ends, every relay still running is stopped with
   :attr:`~app.relay.core.RelayEnd.WORKER_DRAINING`: its last audio is flushed, its leg is recorded as
   *lost* (not clean), so the session lifecycle holds the session for the reconnect window — held, not
   leaked — and the carrier's ``<Connect action>`` re-attaches the call to a worker of the new release.

The drain state of a worker hangs off its Flask app (``app.extensions``), not a module global.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from app.background import spawn

log = logging.getLogger(__name__)

EXTENSION_KEY = "kallglot_bridge_drain"
#: Relays are handed over this long before the grace period ends (their Redis writes and closes need it).
HANDOFF_MARGIN_SECONDS = 5.0


class StoppableRelay(Protocol):
    """What the drain needs of a relay (:class:`app.relay.core.MediaRelay`)."""

    def stop(self) -> None:
        """End the relay as drained."""


class Drain:
    """One worker's shutdown state and the relays it would hand over."""

    def __init__(self) -> None:
        self._draining = threading.Event()
        # Weak: a relay that ended and was forgotten must not be kept alive by the drain.
        self._relays: weakref.WeakSet[Any] = weakref.WeakSet()
        self._handed_over = False

    @property
    def draining(self) -> bool:
        """True once the worker was told to shut down."""
        return self._draining.is_set()

    @contextlib.contextmanager
    def track(self, relay: StoppableRelay) -> Iterator[None]:
        """Register ``relay`` for hand-over while the block runs (stopped at once if that already happened:
        a media socket accepted just before the listener closed must not outlive the grace period)."""
        self._relays.add(relay)
        if self._handed_over:
            relay.stop()
        try:
            yield
        finally:
            self._relays.discard(relay)

    def live_relays(self) -> int:
        """How many relays are registered now."""
        return len(self._relays)

    def begin(self, grace_seconds: float, margin_seconds: float = HANDOFF_MARGIN_SECONDS) -> threading.Thread:
        """Start draining: from now on not ready; relays still live after ``grace_seconds - margin`` (at least
        half the grace period) are handed over. Returns the (daemon) thread that does it, for tests to join."""
        self._draining.set()
        handoff_after = max(grace_seconds - min(margin_seconds, grace_seconds / 2), 0.0)
        log.warning("worker draining: not ready; %d live calls handed over in %.1fs unless they end first",
                    self.live_relays(), handoff_after)
        return spawn(self._hand_over_after, handoff_after, name="drain")

    def hand_over(self) -> int:
        """Stop every live relay now (its leg is recorded as lost, its session held); returns how many."""
        self._handed_over = True
        relays = list(self._relays)
        for relay in relays:
            relay.stop()
        if relays:
            log.warning("worker draining: handed %d live calls over to the session lifecycle", len(relays))
        return len(relays)

    def _hand_over_after(self, seconds: float) -> None:
        threading.Event().wait(seconds)
        self.hand_over()


def drain_for(app: Any) -> Drain:
    """The :class:`Drain` of a Flask ``app`` (created on first use)."""
    return app.extensions.setdefault(EXTENSION_KEY, Drain())


def current_drain() -> Drain:
    """The :class:`Drain` of the current Flask app (inside a request or WebSocket handler)."""
    from flask import current_app

    return drain_for(current_app)


def begin_worker_drain(wsgi_app: Any, grace_seconds: float) -> bool:
    """gunicorn hook helper: start draining ``wsgi_app`` if it is the bridge; False for other apps (the
    emulator and test fakes share ``gunicorn.conf.py``)."""
    extensions = getattr(wsgi_app, "extensions", None)
    if not isinstance(extensions, dict) or "kallglot_bridge" not in extensions:
        return False
    drain_for(wsgi_app).begin(grace_seconds)
    return True
