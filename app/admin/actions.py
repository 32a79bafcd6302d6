"""Admin actions on live calls. One call site each, so the lifecycle can change what they do underneath."""
from __future__ import annotations

from app.calls.lifecycle import EndOutcome
from app.extensions import services


def end_session_now(session_id: str) -> EndOutcome:
    """End ``session_id`` at Kallglot on an admin's request, live legs or not (the lifecycle hangs those up)."""
    return services().lifecycle.end_session(session_id, "admin")
