"""Security headers on every admin response.

The templates have no inline scripts or styles (CSS comes from ``static/admin.css``), so the policy needs no
``unsafe-inline``: an injected ``<script>`` or ``style`` attribute would not run. Pages are never cached (they
show live calls, audit entries and exports of every profile) and never framed (click-jacking of the End and
Delete buttons).
"""
from __future__ import annotations

from flask import Response, request

from app.admin.blueprint import bp

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "style-src 'self'", "img-src 'self'", "form-action 'self'", "frame-ancestors 'none'",
    "base-uri 'none'",
    # The live console: static/live.js (no inline script), its Server-Sent Events, recordings played via the admin.
    "script-src 'self'", "connect-src 'self'", "media-src 'self'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: Flask-WTF checks the Referer of HTTPS form posts against the host.
    "Referrer-Policy": "same-origin",
}


@bp.after_request
def add_security_headers(response: Response) -> Response:
    """Add :data:`SECURITY_HEADERS` to every admin response, and ``no-store`` to all but the static assets."""
    response.headers.update(SECURITY_HEADERS)
    if request.endpoint != "admin.static":  # CSS and the console's script hold no data: they may be cached
        response.headers["Cache-Control"] = "no-store"
    return response
