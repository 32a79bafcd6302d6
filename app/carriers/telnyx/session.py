"""Starting a Kallglot session for a Telnyx call leg; shared by the TeXML and Call Control flows."""
from __future__ import annotations

from app.calls.legs import StartedLeg, start_inbound_leg
from app.carriers.telnyx import CARRIER
from app.extensions import Services
from app.kallglot.client import StreamGrant
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.profiles import TRANSPORT_RELAY


def start_leg(svc: Services, *, call_id: str, to_number: str, from_number: str,
              metadata: dict[str, str]) -> tuple[StartedLeg, str]:
    """Bridge an incoming call: re-attach it to the caller's held session, or create (or, for a retried
    webhook, re-find) its session; register the leg. Returns the leg and its sealed relay token ("" when the
    number's transport keeps the call off our relay).

    ``call_id`` is the call_control_id (TeXML's ``CallSid`` is one too). Raises :class:`KallglotError`
    or ``redis.RedisError``; the caller then apologises and hangs up.
    """
    started = start_inbound_leg(svc, carrier=CARRIER, call_id=call_id, to_number=to_number,
                                from_number=from_number, metadata=metadata)
    if started.profile.transport != TRANSPORT_RELAY or started.session.stream is None:
        return started, ""  # direct and sip calls never reach our relay: nothing to seal
    return started, seal_relay_token(svc, started.session.id, call_id, started.session.stream)


def seal_relay_token(svc: Services, session_id: str, call_id: str, stream: StreamGrant,
                     speaker: str = SPEAKER_CUSTOMER) -> str:
    """A relay token that lets the media socket of ``call_id`` into ``session_id``'s stream."""
    return svc.relay_tokens.seal_stream(stream, session_id=session_id, carrier=CARRIER, call_id=call_id,
                                        speaker=speaker)
