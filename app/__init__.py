"""kallglot-bridge: puts Twilio (and Telnyx) phone calls on Kallglot sessions.

``create_app`` is the WSGI factory: ``gunicorn -k gevent 'app:create_app()'``. It is imported lazily so that
``import app.<anything>`` stays light: the emulator's entry point must monkey-patch with gevent before
Flask, requests or redis are imported.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app (see :func:`app.factory.create_app`)."""
    from app.factory import create_app as build

    return build(config)
