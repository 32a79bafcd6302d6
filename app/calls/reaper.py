"""The reaper: each worker runs one; together they end held sessions when due, retry failed ends, and treat
legs whose relay stopped beating as lost. Every step is atomic in Redis, so any number may run at once."""
from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence

import redis

from app.background import spawn
from app.calls.lifecycle import SessionLifecycle

log = logging.getLogger(__name__)

REAPER_INTERVAL_SECONDS = 1.0


class Reaper:
    """Polls the lifecycle's deadlines and heartbeats."""

    def __init__(self, lifecycle: SessionLifecycle, interval_seconds: float = REAPER_INTERVAL_SECONDS,
                 extra_passes: Sequence[Callable[[], int]] = (),
                 on_leg_lost: Callable[[str, str], object] | None = None) -> None:
        self.lifecycle = lifecycle
        #: Runs for each leg a pass gave up as lost, (carrier, call id): a browser agent's call is offered again.
        self.on_leg_lost = on_leg_lost
        #: More due work polled with the same cadence (calls whose browser-agent wait ran out).
        self.extra_passes = tuple(extra_passes)
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()

    def run_once(self) -> tuple[int, int, int]:
        """One pass: (lost legs handled, due sessions handled, orphaned creates handled)."""
        handled = (self.lifecycle.expire_lost_legs(on_lost=self.on_leg_lost), self.lifecycle.end_due_sessions(),
                   self.lifecycle.end_orphaned_creates())
        for extra in self.extra_passes:
            extra()
        return handled

    def run_forever(self) -> None:
        """Poll until :meth:`stop`; Redis outages are logged and waited out, never fatal."""
        failures = 0
        # Jittered (0.5–1.5 × the interval): the reapers of every worker and instance poll out of step, so
        # whichever wakes first after a deadline takes it and due work spreads over the fleet.
        while not self._stop.wait(self.interval_seconds * random.uniform(0.5, 1.5) * (1 + min(failures, 10))):
            try:
                self.run_once()
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    log.error("reaper cannot reach Redis (%d failures): %s", failures, exc)
            except Exception:  # a bug must not stop the reaper for the worker's lifetime
                failures += 1
                log.exception("reaper pass failed")

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return."""
        self._stop.set()


def start_background_reaper(lifecycle: SessionLifecycle,
                            extra_passes: Sequence[Callable[[], int]] = (),
                            on_leg_lost: Callable[[str, str], object] | None = None) -> Reaper | None:
    """Start a reaper thread when running under gevent (gunicorn's gevent worker); else return None.

    Under the plain test client nothing is started; tests call :meth:`Reaper.run_once` themselves.
    """
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    if not monkey.is_module_patched("threading"):
        return None
    reaper = Reaper(lifecycle, extra_passes=extra_passes, on_leg_lost=on_leg_lost)
    spawn(reaper.run_forever, name="session-reaper")
    return reaper
