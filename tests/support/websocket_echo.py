"""A tiny app on the product's WebSocket layer (app/websocket.py) for the RFC 6455 conformance tests: gunicorn
serves it with ``ECHO_WEBSOCKET_LAYER`` naming the layer. ``/echo`` echoes every message; ``close-me`` makes the
server close with 4000; ``poll`` answers ``none`` when nothing else came within 50 ms (a receive timeout)."""
from __future__ import annotations

import os

from flask import Flask

from app.websocket import LAYERS, MediaSock

#: Small enough to test the limit without megabytes of traffic.
ECHO_MAX_MESSAGE_BYTES = 4096


def create_echo_app() -> Flask:
    """The echo app on the layer ``ECHO_WEBSOCKET_LAYER`` names."""
    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": ECHO_MAX_MESSAGE_BYTES}
    app.config["SOCK_SERVER_CLASS"] = LAYERS[os.environ.get("ECHO_WEBSOCKET_LAYER", "sansio")]
    sock = MediaSock(app)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @sock.route("/echo")
    def echo(ws) -> None:  # type: ignore[no-untyped-def]
        while True:
            message = ws.receive(timeout=10)
            if message is None:
                return
            if message == "close-me":
                ws.close(4000, "asked to")
                return
            if message == "poll":
                ws.send("none" if ws.receive(timeout=0.05) is None else "something")
                continue
            ws.send(message)

    return app
