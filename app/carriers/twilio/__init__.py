"""The Twilio adapter: voice and status webhooks, and the Media Streams relay socket.

This package (with ``app.carriers.telnyx`` later) is the only code that knows Twilio's wire formats.
"""
from flask import Blueprint

bp = Blueprint("twilio", __name__, url_prefix="/twilio")

from app.carriers.twilio import media, webhooks  # noqa: E402,F401  (routes register themselves on bp)
