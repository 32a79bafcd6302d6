"""What Kallglot's own telephony guides say a carrier needs to reach a session without the bridge's relay.

- **Direct streaming** (Kallglot's Twilio and Telnyx guides, "Sessions vs Calls"): the carrier's media stream
  goes to the session's ``stream.url`` and carries ``stream.token`` (and the session id) as stream custom
  parameters named :data:`DIRECT_TOKEN_PARAMETER` and :data:`DIRECT_SESSION_PARAMETER` — the names of
  Kallglot's own ``<Parameter>`` example. The token is checked at connect only and lives 5 minutes, so every
  stream (a first answer, a restore, a returning caller) is given a token fresh from create or ``GET``.
- **Programmatic SIP** (Kallglot's SIP guide): the session is created with ``routing.type = "sip"`` and the
  carrier dials ``sip:{session_id}@sip.kallglot.com`` (the domain is ``KALLGLOT_SIP_DOMAIN``).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from app.kallglot.client import StreamGrant, session_path_id

#: ``<Parameter name="token" value="{stream.token}"/>`` in Kallglot's Twilio and Telnyx examples.
DIRECT_TOKEN_PARAMETER = "token"
#: ``<Parameter name="session_id" value="{session.id}"/>`` in Kallglot's Telnyx example.
DIRECT_SESSION_PARAMETER = "session_id"
#: A grant this close to its ``expires_at`` is not handed to a carrier: the carrier connects a moment later.
TOKEN_SAFETY_MARGIN = timedelta(seconds=30)


def sip_uri(session_id: str, domain: str) -> str:
    """The SIP URI a carrier dials to put a call on ``session_id``; the id is validated as for a URL path
    (letters, digits, ``_`` and ``-``: nothing that could change the URI), else :class:`KallglotValidationError`."""
    return f"sip:{session_path_id(session_id)}@{domain}"


def grant_fresh(grant: StreamGrant | None, now: datetime | None = None) -> bool:
    """Whether ``grant`` can still be handed to a carrier to connect with (unknown expiry: trusted as fresh)."""
    if grant is None:
        return False
    if grant.expires_at is None:
        return True
    return grant.expires_at - TOKEN_SAFETY_MARGIN > (now or datetime.now(timezone.utc))


def direct_parameters(session_id: str, grant: StreamGrant) -> dict[str, str]:
    """The stream custom parameters of a direct stream, in Kallglot's example order (token, session id)."""
    return {DIRECT_TOKEN_PARAMETER: grant.token, DIRECT_SESSION_PARAMETER: session_id}
