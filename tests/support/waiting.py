"""Bounded polling for effects that land after a call returns (no sleeps longer than needed)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 8.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def only_session(emulator: Any) -> dict:
    """The emulator's one session (the test placed one call)."""
    sessions = emulator.sessions()
    assert len(sessions) == 1, sessions
    return sessions[0]
