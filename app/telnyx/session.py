"""Starting a Kallglot session for a Telnyx call leg; shared by the TeXML and Call Control flows."""
from __future__ import annotations

from dataclasses import dataclass

from app.extensions import Services
from app.kallglot.client import KallglotError, KallglotNotFound, KallglotSession, StreamGrant
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.relay.tokens import RelayGrant
from app.telnyx import CARRIER


@dataclass(frozen=True)
class StartedLeg:
    """A leg bridged to a session: what the answer (TeXML or ``answer``) needs."""

    session_id: str
    relay_token: str
    mode: str

    def __repr__(self) -> str:  # the relay token carries the sealed Kallglot stream token
        return f"StartedLeg(session_id={self.session_id!r}, mode={self.mode!r})"


def start_leg(svc: Services, *, call_id: str, to_number: str, from_number: str,
              metadata: dict[str, str]) -> StartedLeg:
    """Bridge an incoming call: re-attach it to the caller's held session, or create (or, for a retried
    webhook, re-find) its session; register the leg and seal its relay token.

    ``call_id`` is the call_control_id (TeXML's ``CallSid`` is one too). Raises :class:`KallglotError`
    or ``redis.RedisError``; the caller then apologises and hangs up.
    """
    profile = svc.profiles.for_number(to_number)
    leg = dict(carrier=CARRIER, call_id=call_id, speaker=SPEAKER_CUSTOMER, from_number=from_number,
               to_number=to_number, mode=profile.mode, hangup_grace_seconds=profile.hangup_grace_seconds,
               reconnect_window_seconds=profile.effective_reconnect_window(svc.settings.reconnect_window_seconds))
    held = _held_session(svc, to_number, from_number)
    if held and held.stream and svc.lifecycle.register_leg(session_id=held.id, reattach_from=(to_number, from_number),
                                                           **leg):
        return StartedLeg(held.id, seal_relay_token(svc, held.id, call_id, held.stream), profile.mode)
    session = svc.kallglot.create_session(
        mode=profile.mode, source_language=profile.source_language or None,
        target_language=profile.target_language or None, phone_number=to_number or None,
        # Derived from the call: a retried webhook replays the same session instead of creating one.
        idempotency_key=f"telnyx-call-{call_id}",
        metadata={**profile.metadata, **metadata, "from_number": from_number, "to_number": to_number})
    if session.stream is None:
        raise KallglotError("session has no stream", code="no_stream")
    if not svc.lifecycle.register_leg(session_id=session.id, **leg):
        raise KallglotError("the call's session has already ended", code="session_ended")
    return StartedLeg(session.id, seal_relay_token(svc, session.id, call_id, session.stream), profile.mode)


def _held_session(svc: Services, to_number: str, from_number: str) -> KallglotSession | None:
    """The session a returning caller may re-attach to (held for the reconnect window and not ended)."""
    held_id = svc.lifecycle.held_session_for(to_number, from_number)
    if not held_id:
        return None
    try:
        session = svc.kallglot.get_session(held_id)  # also refreshes the stream grant (§9.4)
    except KallglotNotFound:
        return None
    return session if session.status != "ended" else None


def seal_relay_token(svc: Services, session_id: str, call_id: str, stream: StreamGrant,
                     speaker: str = SPEAKER_CUSTOMER) -> str:
    """A relay token that lets the media socket of ``call_id`` into ``session_id``'s stream."""
    expires = stream.expires_at.timestamp() if stream.expires_at else None
    return svc.relay_tokens.seal(RelayGrant(session_id=session_id, carrier=CARRIER, call_id=call_id, speaker=speaker,
                                            stream_url=stream.url, stream_token=stream.token,
                                            stream_expires_at=expires))
