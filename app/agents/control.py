"""Call control of browser agent legs, for the vendor-free lifecycle (as a carrier's ``CarrierControl``)."""
from __future__ import annotations

from app.calls.agent_queue import BROWSER_LEG
from app.carriers.contract import CarrierError


class BrowserAgentControl:
    """There is no carrier to ask: a browser leg ends when its page's socket closes. Hanging one up is recorded
    by the lifecycle (the relay's next heartbeat is refused) and, when the session ends, Kallglot's
    ``session.ended`` closes the page's socket at once."""

    carrier = BROWSER_LEG

    def hang_up(self, call_id: str) -> None:
        """Nothing to do at a carrier (see the class docstring)."""

    def dial(self, *, to: str, from_: str, session_id: str, speaker: str) -> str:
        """Browser agents take calls from the Agent page; they cannot be dialled."""
        raise CarrierError("browser agents take calls from the Agent page; they cannot be dialled")
