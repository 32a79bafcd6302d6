"""A reopen stops at once when the leg or its session is over (chaos-run logs: relays of ended sessions walked the
whole ~8 s backoff, every attempt refused by Kallglot, before the caller heard goodbye)."""
from __future__ import annotations

import threading
import time

from app.relay.outcome import RelayStats
from app.relay.reopen import KallglotLink, StreamNotWanted


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
    started = time.monotonic()
    assert link.reopen(threading.Event()) is False
    assert len(attempts) == 1 and time.monotonic() - started < 0.5


def test_any_other_reopen_failure_is_still_retried_through_the_backoff() -> None:
    attempts: list[float] = []

    def reopen() -> DeadStream:
        attempts.append(time.monotonic())
        raise OSError("connection refused")

    link = KallglotLink(DeadStream(), reopen=reopen, stats=RelayStats(), context="test", backlog_chunks=5,
                        backoff_seconds=(0.01, 0.01, 0.01))
    assert link.reopen(threading.Event()) is False
    assert len(attempts) == 3
