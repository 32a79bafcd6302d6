"""A faithful local emulator of the Kallglot REST API and stream WebSocket, for tests and the demo.

It implements the newer Kallglot docs plus the project's working assumptions where they are silent
(listed in :mod:`app.kallglot.stream_protocol`).
Run it as ONE process: ``python -m app.devtools.emulator`` or one gunicorn gevent worker
(``gunicorn -k gevent -w 1 'app.devtools.emulator:create_emulator_app()'``), since all state is in memory.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

# Config names and defaults; values come from the environment unless the factory's config overrides them.
CONFIG_DEFAULTS: dict[str, Any] = {
    "KALLGLOT_EMULATOR_API_KEY": "sk_test_emulator",
    "KALLGLOT_EMULATOR_STREAM_TOKEN_TTL": 300,
    "KALLGLOT_EMULATOR_PUBLIC_URL": None,
    # Where (and with which signing secret) to send session.ended / transcript.ready / recording.ready;
    # unset: no webhooks (the bridge's KALLGLOT_WEBHOOK_SECRET must match).
    "KALLGLOT_EMULATOR_WEBHOOK_URL": None,
    "KALLGLOT_EMULATOR_WEBHOOK_SECRET": None,
    # The SIP domain the emulated SIP endpoint answers for (unset: its own host:port, which the simulators dial).
    "KALLGLOT_EMULATOR_SIP_DOMAIN": None,
}


def create_emulator_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the emulator's Flask app; its state is ``app.extensions["kallglot_emulator"]``."""
    # Imported here so that ``python -m app.devtools.emulator`` can monkey-patch with gevent before flask loads.
    from flask import Flask
    from flask_sock import Sock

    from .artifacts import notify_ended, register_artifact_routes
    from .carrier_stream import serve_direct
    from .sip import register_sip_routes
    from .rest import register_rest_routes
    from .state import EmulatorState
    from .stream import register_stream_route

    settings = {name: os.environ.get(name) or default for name, default in CONFIG_DEFAULTS.items()}
    settings.update(config or {})
    app = Flask(__name__)
    app.config.update(settings)
    app.json.sort_keys = False  # keep the documented field order
    state = EmulatorState(
        api_key=str(settings["KALLGLOT_EMULATOR_API_KEY"]),
        token_ttl_seconds=float(settings["KALLGLOT_EMULATOR_STREAM_TOKEN_TTL"]),
        public_url=settings["KALLGLOT_EMULATOR_PUBLIC_URL"] or None,
    )
    app.extensions["kallglot_emulator"] = state
    def ended(session_id: str) -> None:
        notify_ended(app, state, session_id)

    register_rest_routes(app, state, on_ended=ended)
    register_artifact_routes(app, state)
    register_stream_route(Sock(app), state, on_ended=ended,
                          direct=lambda ws, session_id: serve_direct(state, ws, session_id))
    register_sip_routes(app, state, domain=settings["KALLGLOT_EMULATOR_SIP_DOMAIN"] or None)
    return app
