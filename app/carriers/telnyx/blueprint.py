"""The ``/telnyx`` blueprint every Telnyx route registers on."""
from __future__ import annotations

from flask import Blueprint

from app.carriers.telnyx import CARRIER

bp = Blueprint(CARRIER, __name__, url_prefix="/telnyx")
