"""``/healthz`` (the process answers) and ``/readyz`` (it can take calls)."""
from __future__ import annotations

import threading
import time
from typing import Any

import redis
import requests
from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from app.ops.draining import drain_for
from app.extensions import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Liveness: the process is up and serving requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Readiness: Redis and Kallglot answer, the configuration is complete and the worker is not shutting
    down (503 with the reasons otherwise)."""
    svc = services()
    problems = list(svc.settings.problems())
    try:
        svc.redis.ping()
    except redis.RedisError as exc:
        problems.append(f"Redis unreachable: {type(exc).__name__}")
    else:
        problems += store_script_problems(svc.redis, svc.keys.live_sessions(0))
    kallglot_problem = kallglot_reachability(current_app, svc.settings.kallglot_api_url)
    if kallglot_problem:
        problems.append(kallglot_problem)
    if drain_for(current_app).draining:
        problems.append("shutting down (draining): live calls are being handed over")
    return jsonify(status="ready" if not problems else "not ready", problems=problems), 200 if not problems else 503


#: A script reading a key, as the lifecycle's do: a store without Lua (fakeredis without lupa) fails it.
_LUA_PROBE = "return redis.call('EXISTS', KEYS[1])"


def store_script_problems(client: redis.Redis, probe_key: str) -> list[str]:
    """Why the store cannot run the lifecycle's Lua scripts ([] when it can): every call ends through them.

    ``probe_key`` is only read (``EXISTS``), never written.
    """
    try:
        client.eval(_LUA_PROBE, 1, probe_key)
    except redis.ResponseError as exc:
        return [f"Redis cannot run Lua scripts (EVAL failed: {str(exc)[:120]}); the call lifecycle needs them "
                "(a fakeredis store needs the 'lua' extra: pip install 'fakeredis[lua]')"]
    except redis.RedisError as exc:
        return [f"Redis unreachable: {type(exc).__name__}"]
    return []


#: A Kallglot probe's answer is reused this long: the platform polls /readyz every few seconds per instance.
KALLGLOT_PROBE_TTL_SECONDS = 10.0
KALLGLOT_PROBE_TIMEOUT_SECONDS = 2.0


def kallglot_reachability(app: Any, api_url: str) -> str:
    """Why Kallglot's API cannot be reached ("" when it answers any HTTP status), cached per app.

    Single-flight: when the cached answer is stale, exactly one request probes Kallglot and every concurrent
    one reuses the previous answer (or, before any answer, waits for that one probe), so a burst of
    unauthenticated ``/readyz`` requests never fans out to Kallglot.
    """
    probe: _KallglotProbe = app.extensions.setdefault("kallglot_probe", _KallglotProbe())
    return probe.problem(api_url)


class _KallglotProbe:
    """The cached Kallglot reachability answer of one app, refreshed by one caller at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answer: tuple[float, str] | None = None
        #: Probes actually sent (tests and the hostile-traffic script read it).
        self.probes_sent = 0

    def problem(self, api_url: str) -> str:
        """The cached answer, refreshed when older than :data:`KALLGLOT_PROBE_TTL_SECONDS`."""
        answer = self._answer
        if answer and time.monotonic() - answer[0] < KALLGLOT_PROBE_TTL_SECONDS:
            return answer[1]
        if not self._lock.acquire(blocking=answer is None):
            return answer[1] if answer else ""  # another request is refreshing: the previous answer stands
        try:
            answer = self._answer
            if answer and time.monotonic() - answer[0] < KALLGLOT_PROBE_TTL_SECONDS:
                return answer[1]  # refreshed while this request waited for the first probe
            self.probes_sent += 1
            try:
                # Unauthenticated on purpose: reachability only, and the API key never travels for a probe.
                requests.head(api_url, timeout=KALLGLOT_PROBE_TIMEOUT_SECONDS, allow_redirects=False)
                problem = ""
            except requests.RequestException as exc:
                problem = f"Kallglot API unreachable: {type(exc).__name__}"
            self._answer = (time.monotonic(), problem)
            return problem
        finally:
            self._lock.release()
