"""``/healthz`` (the process answers) and ``/readyz`` (it can take calls)."""
from __future__ import annotations

import redis
from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from app.extensions import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Liveness: the process is up and serving requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Readiness: Redis answers and the configuration is complete (503 with the reasons otherwise)."""
    svc = services()
    problems = list(svc.settings.problems())
    try:
        svc.redis.ping()
    except redis.RedisError as exc:
        problems.append(f"Redis unreachable: {type(exc).__name__}")
    return jsonify(status="ready" if not problems else "not ready", problems=problems), 200 if not problems else 503
