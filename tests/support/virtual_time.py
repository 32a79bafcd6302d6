"""A virtual clock for budgets and backoffs: tests assert on what the code planned (its waits and timeouts),
never on how fast a loaded machine happened to run it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class VirtualClock:
    """A monotonic clock that moves only when the code under test sleeps or a request times out."""

    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """Record the wait and move the clock by it, without waiting."""
        self.slept.append(seconds)
        self.now += seconds


class TimedTransport(requests.Session):
    """A real ``requests`` session that records each attempt's timeout; a request that times out moves the
    virtual clock by the read timeout it was given, as it would have taken that long."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock
        self.attempts: list[dict[str, Any]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        connect_timeout, read_timeout = kwargs["timeout"]
        attempt: dict[str, Any] = {"at": self.clock.now, "connect_timeout": connect_timeout,
                                   "read_timeout": read_timeout, "outcome": ""}
        self.attempts.append(attempt)
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.Timeout:
            attempt["outcome"] = "timeout"
            self.clock.now += read_timeout
            raise
        attempt["outcome"] = str(response.status_code)
        return response
