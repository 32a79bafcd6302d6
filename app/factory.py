"""The composition root: the application factory and its ``register_*`` helpers.

The one place that wires the rooms together: settings → services (:mod:`app.extensions`), each carrier of
:mod:`app.carriers.registry` (its call control into the services, its blueprint into the app), every other
blueprint, the CLI and the background reaper.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from app.calls.reaper import start_background_reaper
from app.calls.workers import start_worker_liveness
from app.carriers.registry import CARRIERS
from app.config import Settings
from app.extensions import Services, init_services, init_sock
from app.logging_setup import configure_logging, register_request_log_context

log = logging.getLogger(__name__)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from ``config`` (field names of :class:`Settings`) or, by default, the environment.

    Raises :class:`app.config.ConfigError` listing every configuration problem at once.
    """
    from app.profiles.cli import settings_for_command_line

    # Under `flask numbers …` only the store must be configured (checked there); the reaper does not run.
    command_line = settings_for_command_line() if config is None else None
    settings = command_line or (Settings.from_mapping(config) if config is not None else Settings.from_env())
    if command_line is None:
        settings.validate()
    configure_logging()
    app = Flask(__name__, template_folder=str(template_folder()))
    app.config["SECRET_KEY"] = settings.secret_key
    # Werkzeug refuses larger bodies with 413 before anything reads them, chunked ones included (gunicorn
    # sets wsgi.input_terminated, so the limit wraps the stream itself rather than trusting Content-Length).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if settings.trusted_proxy_hops:
        # Exactly that many X-Forwarded-For entries, counted from the right, were written by our own proxies;
        # anything left of them is the client's to forge. With 0 the socket peer is the client address.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    built = register_services(app, settings)
    register_body_limit(app)
    register_request_log_context(app)
    register_carriers(app)
    register_blueprints(app)
    register_error_handlers(app)
    register_cli(app)
    if command_line is None:
        from app.calls.agent import browser_leg_lost, expire_agent_waits

        app.extensions["reaper"] = start_background_reaper(
            built.lifecycle, extra_passes=[lambda: expire_agent_waits(built)],
            on_leg_lost=lambda carrier, call_id: browser_leg_lost(built, carrier, call_id))
        # Beside the reaper: this worker's liveness key, so a leg's relay on a killed worker is known gone.
        start_worker_liveness(built.workers)
    if settings.demo_mode and command_line is None:
        log.warning("DEMO MODE: Kallglot is the local emulator at %s and the secrets are demo values. "
                    "Set KALLGLOT_API_KEY and REDIS_URL for real calls.", settings.kallglot_api_url)
    return app


def register_body_limit(app: Flask) -> None:
    """A chunked body (no ``Content-Length``) over ``MAX_CONTENT_LENGTH`` is refused with 413 up front.

    Werkzeug stops reading such a body at the limit but then hands handlers the truncated prefix, which
    would fail later as a bad signature or bad JSON; reading at most the limit here (carriers always send
    ``Content-Length``, so this is rare) turns it into a clear 413 and keeps memory bounded.
    """
    from flask import abort, request

    @app.before_request
    def _refuse_oversized_chunked_body() -> None:
        if request.content_length is not None or "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
            return
        limit = request.max_content_length
        if limit and len(request.get_data(cache=True)) >= limit:
            abort(413, description=f"request body larger than {limit} bytes")
def template_folder() -> Path:
    """The Jinja templates: inside the package in a wheel (``setup.py`` copies them there), else the source
    tree's top-level ``templates/`` (an editable install or a checkout)."""
    package = Path(__file__).resolve().parent
    packaged = package / "templates"
    return packaged if packaged.is_dir() else package.parent / "templates"


def register_services(app: Flask, settings: Settings) -> Services:
    """Build the app's services, with every registered carrier's call control, and attach flask-sock."""
    from app.agents.control import BrowserAgentControl

    controls = {carrier.name: carrier.control(settings) for carrier in CARRIERS}
    browser = BrowserAgentControl()
    built = init_services(app, settings, controls, other_legs={browser.carrier: browser})
    init_sock(app, settings.websocket_layer)
    return built


def register_carriers(app: Flask) -> None:
    """Every registered carrier's webhooks and media socket."""
    for carrier in CARRIERS:
        app.register_blueprint(carrier.blueprint)


def register_blueprints(app: Flask) -> None:
    """One blueprint per other entry point."""
    from app import metrics
    from app.admin import bp as admin_bp
    from app.agents.media import bp as agents_bp
    from app.api import bp as api_bp
    from app.kallglot.webhooks import bp as kallglot_bp
    from app.ops import health
    from app.ops.landing import bp as web_bp

    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(kallglot_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(web_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(agents_bp)


def register_error_handlers(app: Flask) -> None:
    """HTTP errors answer short JSON (carriers log the body); nothing leaks a traceback."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        return jsonify(error=exc.name, message=exc.description), exc.code or 500

    @app.errorhandler(RecursionError)
    def nested_too_deeply(_exc: RecursionError) -> ResponseReturnValue:
        # json.loads recurses per nesting level: 200 000 "[" in a (size-limited) body is the client's fault.
        return jsonify(error="Bad Request", message="body is nested too deeply"), 400


def register_cli(app: Flask) -> None:
    """``flask numbers …``."""
    from app.profiles.cli import register_cli as register_numbers

    register_numbers(app)
