"""What the lifecycle records about a call leg when it joins a session, built once per leg."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.profiles import NumberProfile


@dataclass(frozen=True)
class LegSpec:
    """One leg joining a session: who, which way, and the session's settings should the leg start it.

    The session's settings (``mode`` aside) are written only by its first leg; later legs leave them as they are.
    """

    carrier: str
    call_id: str
    speaker: str
    from_number: str
    to_number: str
    mode: str
    reconnect_window_seconds: int
    hangup_grace_seconds: int = 0
    agent_hangup_ends_call: bool = True
    #: How the leg's audio reaches Kallglot (``relay``, ``direct``, ``sip``: :data:`app.profiles.TRANSPORTS`).
    #: Only a relayed leg has a relay beating its heartbeat; the carrier's callbacks end the others.
    transport: str = "relay"
    #: How long the leg may wait for its media stream to start before it counts as lost (0: the lifecycle's
    #: default). A browser agent's page opens its socket at once, so it gets a short bound.
    start_grace_seconds: int = 0

    @property
    def relayed(self) -> bool:
        """Whether the bridge's relay carries this leg's audio (and so beats its heartbeat)."""
        return self.transport == "relay"

    @classmethod
    def from_profile(cls, profile: NumberProfile, *, carrier: str, call_id: str, speaker: str, from_number: str,
                     to_number: str, default_reconnect_window_seconds: int) -> LegSpec:
        """A leg of a session that ``profile`` (the called number's) governs."""
        return cls(carrier=carrier, call_id=call_id, speaker=speaker, from_number=from_number, to_number=to_number,
                   mode=profile.mode,
                   reconnect_window_seconds=profile.effective_reconnect_window(default_reconnect_window_seconds),
                   hangup_grace_seconds=profile.hangup_grace_seconds,
                   agent_hangup_ends_call=profile.agent_hangup_ends_call, transport=profile.transport)

    @classmethod
    def joining(cls, session: Mapping[str, str], *, carrier: str, call_id: str, speaker: str, from_number: str,
                to_number: str, default_mode: str = "") -> LegSpec:
        """A leg dialled into a running session (an agent leg): the session's own recorded settings apply."""
        return cls(carrier=carrier, call_id=call_id, speaker=speaker, from_number=from_number, to_number=to_number,
                   mode=session.get("mode", default_mode),
                   reconnect_window_seconds=int(session.get("reconnect_window") or 0),
                   hangup_grace_seconds=int(session.get("hangup_grace") or 0))
