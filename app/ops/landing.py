"""The service's landing page (the admin UI arrives with its own issue)."""
from __future__ import annotations

from flask import Blueprint, render_template

from app.extensions import services

bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> str:
    """Where to point a Twilio number, rendered from the configured public URL."""
    settings = services().settings
    return render_template("index.html", settings=settings)
