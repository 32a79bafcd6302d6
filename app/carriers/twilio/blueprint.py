"""The ``/twilio`` blueprint every Twilio route registers on."""
from __future__ import annotations

from flask import Blueprint

from app.carriers.twilio import CARRIER

bp = Blueprint(CARRIER, __name__, url_prefix="/twilio")
