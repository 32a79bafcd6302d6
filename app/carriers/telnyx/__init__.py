"""The Telnyx adapter: TeXML and Call Control webhooks (Ed25519-verified) and the media-streaming socket.

This package is the only code that knows Telnyx's wire formats (telephony-protocols.md section B).
"""
from flask import Blueprint

bp = Blueprint("telnyx", __name__, url_prefix="/telnyx")
#: The carrier name in relay tokens, Redis keys and the lifecycle.
CARRIER = "telnyx"

from app.carriers.telnyx import call_control, media, signature, texml  # noqa: E402,F401  (routes register on bp)
