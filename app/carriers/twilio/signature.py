"""``X-Twilio-Signature`` checks with the twilio library's ``RequestValidator``.

The URL signed is the one *Twilio* requested: ``PUBLIC_URL`` + path (+ query), never ``request.url``, which
is ``http://internal-host`` behind Heroku's and Render's TLS-terminating proxies. Werkzeug's
``request.full_path`` always ends in ``?``, so the query is appended only when there is one.
"""
from __future__ import annotations

from flask import request
from twilio.request_validator import RequestValidator

from app.config import Settings


def signed_url(settings: Settings, *, websocket: bool) -> str:
    """The public URL Twilio signed for the current request (``wss://`` for the media socket upgrade)."""
    base = settings.public_ws(request.path) if websocket else settings.public(request.path)
    query = request.query_string.decode("latin-1")
    return f"{base}?{query}" if query else base


def request_is_from_twilio(settings: Settings, *, websocket: bool = False) -> bool:
    """True when the current request carries a valid Twilio signature; fails closed without an auth token."""
    signature = request.headers.get("X-Twilio-Signature", "")
    if not settings.twilio_auth_token or not signature:
        return False
    # Form POSTs sign their parameters; GETs and the WebSocket upgrade sign the URL alone.
    params = request.form if request.method == "POST" and not websocket else {}
    return bool(RequestValidator(settings.twilio_auth_token).validate(signed_url(settings, websocket=websocket),
                                                                      params, signature))
