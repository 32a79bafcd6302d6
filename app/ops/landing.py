"""The service's landing page: where to point each carrier, and links to the admin and the metrics."""
from __future__ import annotations

from flask import Blueprint, render_template

from app.extensions import services

bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> str:
    """Where to point Twilio and Telnyx numbers, rendered from the configured public URL."""
    settings = services().settings
    return render_template("index.html", settings=settings, admin_enabled=bool(settings.admin_password))
