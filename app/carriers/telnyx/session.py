"""Starting a Kallglot session for a Telnyx call leg; shared by the TeXML and Call Control flows."""
from __future__ import annotations

from dataclasses import dataclass

from app.extensions import Services
from app.calls.legs import start_inbound_leg
from app.kallglot.client import StreamGrant
from app.profiles import NumberProfile
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.relay.tokens import RelayGrant
from app.carriers.telnyx import CARRIER


@dataclass(frozen=True)
class StartedLeg:
    """A leg bridged to a session: what the answer (TeXML or ``answer``) needs."""

    session_id: str
    relay_token: str
    mode: str
    profile: NumberProfile

    def __repr__(self) -> str:  # the relay token carries the sealed Kallglot stream token
        return f"StartedLeg(session_id={self.session_id!r}, mode={self.mode!r})"


def start_leg(svc: Services, *, call_id: str, to_number: str, from_number: str,
              metadata: dict[str, str]) -> StartedLeg:
    """Bridge an incoming call: re-attach it to the caller's held session, or create (or, for a retried
    webhook, re-find) its session; register the leg and seal its relay token.

    ``call_id`` is the call_control_id (TeXML's ``CallSid`` is one too). Raises :class:`KallglotError`
    or ``redis.RedisError``; the caller then apologises and hangs up.
    """
    started = start_inbound_leg(svc, carrier=CARRIER, call_id=call_id, to_number=to_number,
                                from_number=from_number, metadata=metadata)
    session = started.session
    assert session.stream is not None
    return StartedLeg(session.id, seal_relay_token(svc, session.id, call_id, session.stream), started.profile.mode,
                      started.profile)


def seal_relay_token(svc: Services, session_id: str, call_id: str, stream: StreamGrant,
                     speaker: str = SPEAKER_CUSTOMER) -> str:
    """A relay token that lets the media socket of ``call_id`` into ``session_id``'s stream."""
    expires = stream.expires_at.timestamp() if stream.expires_at else None
    return svc.relay_tokens.seal(RelayGrant(session_id=session_id, carrier=CARRIER, call_id=call_id, speaker=speaker,
                                            stream_url=stream.url, stream_token=stream.token,
                                            stream_expires_at=expires))
