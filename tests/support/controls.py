"""Test-side handles on the fakes' control APIs: the Kallglot emulator and the fake Telnyx."""
from __future__ import annotations

from typing import Any

import requests

from tests.support.waiting import wait_until


class EmulatorControl:
    """Test-side handle on the emulator's control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.api_url = url + "/v1"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(method, self.url + path, timeout=5, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def reset(self) -> None:
        """Forget all sessions, idempotency keys and faults."""
        self._call("POST", "/_emulator/reset")

    def sessions(self) -> list[dict[str, Any]]:
        """Every session the emulator knows, with what it received."""
        return self._call("GET", "/_emulator/sessions")["sessions"]

    def session(self, session_id: str) -> dict[str, Any]:
        """One session's record."""
        return self._call("GET", f"/_emulator/sessions/{session_id}")

    def stats(self) -> dict[str, Any]:
        """Totals: created, ended, end_calls, double_end_calls, connections_live…"""
        return self._call("GET", "/_emulator/stats")

    def fault(self, **fault: Any) -> None:
        """Queue one fault (endpoint, status, times, retry_after, delay_seconds, session_id, outage)."""
        self._call("POST", "/_emulator/faults", json={"faults": [fault]})

    def clear_faults(self) -> None:
        """Drop the faults not yet taken (Kallglot is healthy again)."""
        self._call("DELETE", "/_emulator/faults")

    def behaviour(self, behaviour: str) -> None:
        """``echo`` or ``silent``."""
        self._call("POST", "/_emulator/behaviour", json={"behaviour": behaviour})

    def send(self, session_id: str, *messages: dict[str, Any]) -> int:
        """Push raw messages to the session's live stream connections; returns how many got them."""
        return int(self._call("POST", f"/_emulator/sessions/{session_id}/send",
                              json={"messages": list(messages)})["connections"])


class FakeCallControl:
    """Test-side handle on the fake Telnyx's control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.api_url = url + "/v2"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(method, self.url + path, timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Forget all calls and commands."""
        self._call("POST", "/_fake/reset")

    def commands(self, action: str | None = None) -> list[dict[str, Any]]:
        """Commands received (optionally only ``action``), oldest first."""
        return [c for c in self._call("GET", "/_fake/commands")["commands"] if action in (None, c["action"])]

    def place_call(self, **scenario: Any) -> str:
        """Place an inbound Call Control call; returns its call_control_id."""
        return str(self._call("POST", "/_fake/calls", json=scenario)["call_control_id"])

    def call(self, call_control_id: str) -> dict[str, Any]:
        """What the fake saw of one call."""
        return self._call("GET", f"/_fake/calls/{call_control_id}")


def finished_call(fake: FakeCallControl, call_control_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The fake's view of the call once it hung up and every webhook was delivered."""
    def done() -> dict[str, Any] | None:
        call = fake.call(call_control_id)
        return call if call["hung_up"] and any(w["event"] == "call.hangup" for w in call["webhooks"]) else None
    call = wait_until(done, timeout)
    assert call, fake.call(call_control_id)
    return call
