"""Ed25519 webhook signatures (``telnyx-signature-ed25519`` over ``f"{telnyx-timestamp}|{raw body}"``).

Verified with the telnyx SDK's ``verify_webhook_signature`` over the *raw* body: TeXML bodies are
form-encoded, so the SDK's ``webhooks.unwrap()`` (which parses JSON) cannot be used, and re-serialised
JSON would not verify. The SDK refuses timestamps more than 300 s away from now (replays).
"""
from __future__ import annotations

import logging

from flask import abort, request
from telnyx.lib.webhook_verification import WebhookVerificationError, verify_webhook_signature

from app.extensions import services
from app.carriers.telnyx.blueprint import bp

log = logging.getLogger(__name__)


def verified_body(public_key: str) -> str:
    """The current request's raw body as text, if it carries a valid Telnyx signature; otherwise abort 403.

    Fails closed: without ``TELNYX_PUBLIC_KEY`` nothing verifies.
    """
    if not public_key:
        log.warning("telnyx %s refused: TELNYX_PUBLIC_KEY is not configured", request.path)
        abort(403, description="Telnyx webhooks are not enabled (no TELNYX_PUBLIC_KEY)")
    try:
        body = request.get_data(cache=True).decode("utf-8")
        verify_webhook_signature(body, request.headers, public_key)
    except (WebhookVerificationError, UnicodeDecodeError) as exc:
        log.warning("telnyx %s refused: %s", request.path, getattr(exc, "message", "body is not UTF-8"))
        abort(403, description="invalid Telnyx signature")
    return body


@bp.before_request
def require_telnyx_signature() -> None:
    """Every Telnyx webhook must be signed; the media socket is not (Telnyx signs no upgrade) — its relay
    token is checked on ``start`` instead."""
    if request.endpoint != "telnyx.media_socket":
        verified_body(services().settings.telnyx_public_key)
