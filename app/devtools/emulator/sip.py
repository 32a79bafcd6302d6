"""Kallglot's programmatic SIP endpoint, emulated over HTTP (Kallglot's SIP guide: create the session with
``routing.type = "sip"``, then send the call to ``sip:{session_id}@sip.kallglot.com``).

A real INVITE is SIP; the simulators stand in for the carrier's SIP side with two requests, so tests and the demo
can check what a SIP leg would do:

- ``POST /_emulator/sip/invite`` ``{"uri", "from", "payload"}`` — the carrier dials ``uri``. Answered (200) only for
  this endpoint's domain, an existing session created with SIP routing that has not ended; otherwise the SIP
  answer a carrier would see (404 unknown user or domain, 403 session not SIP-routed, 480 session ended). The
  caller's μ-law 8 kHz ``payload`` (base64) is recorded as the customer's audio and echoed back in ``heard``.
- ``POST /_emulator/sip/bye`` ``{"leg_id"}`` — the carrier hung up; the leg's end is recorded. When the session
  was ended first (Kallglot "hangs up calls" on end), the answer says so.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from .state import EmulatorState, random_id

SIP_URI = re.compile(r"^sip:(?P<user>[A-Za-z0-9_-]{1,64})@(?P<host>[A-Za-z0-9.-]+(:\d{1,5})?)$")


#: The HTTP status each SIP answer travels with (480 "temporarily unavailable" has no HTTP twin: 409).
HTTP_STATUS_FOR_SIP = {200: 200, 400: 400, 403: 403, 404: 404, 480: 409}


def _answer(sip_status: int, reason: str, **extra: Any) -> Response:
    response = jsonify({"sip_status": sip_status, "reason": reason, **extra})
    response.status_code = HTTP_STATUS_FOR_SIP[sip_status]
    return response


def register_sip_routes(app: Flask, state: EmulatorState, *, domain: str | None) -> None:
    """Attach the emulated SIP endpoint; ``domain`` is the one it answers for (None: its own host:port)."""

    @app.post("/_emulator/sip/invite")
    def sip_invite() -> Response:
        body = request.get_json(silent=True) or {}
        match = SIP_URI.match(str(body.get("uri", "")))
        if match is None:
            return _answer(400, "bad request: not a sip:user@host URI")
        if match["host"] != (domain or request.host):
            return _answer(404, f"not found: this endpoint answers for {domain or request.host}")
        try:
            audio = base64.b64decode(str(body.get("payload", "")), validate=True)
        except (binascii.Error, ValueError):
            return _answer(400, "bad request: payload must be base64 mu-law")
        with state.lock:
            session = state.sessions.get(match["user"])
            if session is None:
                return _answer(404, "not found: no such session")
            if (session.routing or {}).get("type") != "sip":
                return _answer(403, "forbidden: the session was not created with SIP routing")
            if session.status == "ended":
                return _answer(480, "temporarily unavailable: the session has ended")
            leg = {"id": random_id("sipleg_", 16), "uri": match.string, "from": str(body.get("from", ""))[:64],
                   "started_at": time.time(), "ended_at": None, "audio_bytes": len(audio)}
            session.sip_legs.append(leg)
            session.status = "active"
            session.started_at = session.started_at or time.time()
            if audio:
                session.audio.setdefault("customer", bytearray()).extend(audio)
                session.audio_messages["customer"] = session.audio_messages.get("customer", 0) + 1
            echo = state.behaviour == "echo"
        return _answer(200, "OK", leg_id=leg["id"], heard=base64.b64encode(audio).decode() if echo else "")

    @app.post("/_emulator/sip/bye")
    def sip_bye() -> Response:
        leg_id = str((request.get_json(silent=True) or {}).get("leg_id", ""))
        with state.lock:
            for session in state.sessions.values():
                for leg in session.sip_legs:
                    if leg["id"] == leg_id:
                        leg["ended_at"] = leg["ended_at"] or time.time()
                        return _answer(200, "OK", session_ended_first=session.status == "ended")
        return _answer(404, "not found: no such SIP leg (481 call does not exist)")
