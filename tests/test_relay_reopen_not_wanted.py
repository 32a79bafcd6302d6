"""A reopen stops at once when the leg or its session is over (chaos-run logs: relays of ended sessions walked the
whole ~8 s backoff, every attempt refused by Kallglot, before the caller heard goodbye)."""
from __future__ import annotations

import threading
import time

from app.relay.outcome import RelayStats
from app.relay.reopen import KallglotLink, StreamNotWanted


class PlannedWaits(threading.Event):
    """The relay's ``ending`` event, never set, recording each backoff wait the link plans instead of waiting it:
    the test asserts on the waits planned, not on how long a loaded machine took."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0.0))
        return False


class DeadStream:
    """The dropped stream: only closed by the link."""

    def close(self) -> None:
        pass


def test_a_reopen_told_the_leg_is_over_gives_up_after_one_attempt_without_walking_the_backoff() -> None:
    attempts: list[float] = []

    def reopen() -> DeadStream:
        attempts.append(time.monotonic())
        raise StreamNotWanted("the session is over")

    link = KallglotLink(DeadStream(), reopen=reopen, stats=RelayStats(), context="test", backlog_chunks=5,
                        backoff_seconds=(0.01, 0.5, 5.0))
    ending = PlannedWaits()
    assert link.reopen(ending) is False
    # One attempt after the first backoff step, then no further wait: the 0.5 s and 5 s steps are not walked.
    assert len(attempts) == 1 and ending.waits == [0.01]


def test_any_other_reopen_failure_is_still_retried_through_the_backoff() -> None:
    attempts: list[float] = []

    def reopen() -> DeadStream:
        attempts.append(time.monotonic())
        raise OSError("connection refused")

    link = KallglotLink(DeadStream(), reopen=reopen, stats=RelayStats(), context="test", backlog_chunks=5,
                        backoff_seconds=(0.01, 0.5, 5.0))
    ending = PlannedWaits()
    assert link.reopen(ending) is False
    assert len(attempts) == 3 and ending.waits == [0.01, 0.5, 5.0]  # every step of the backoff, in order
