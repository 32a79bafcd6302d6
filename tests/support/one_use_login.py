"""A test-only, dev-only wrapper around the bridge app: ``GET /test-only/login/<token>`` hands the browser the
cookies of an admin session a test signed in to over HTTP (the real sign-in form, the real session nonce in
Redis), once, and redirects to the page the test chose.

Used by browsers a test cannot drive through WebDriver (Firefox here has no geckodriver): the test signs in and
takes the call with ``requests``, stores the session's cookies under a random token in Redis (:func:`hand_over`),
and starts the browser at the token's URL. The token is deleted on first use (``GETDEL``), so the URL is single-use.
Never imported by production code: gunicorn runs it as ``tests.support.one_use_login:create_app()``.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import redis
from flask import Flask

from app import create_app as create_bridge_app

PREFIX = "/test-only/login/"


def _key(namespace: str, token: str) -> str:
    return f"{namespace}:test-only:login:{token}"


def hand_over(client: redis.Redis, namespace: str, cookies: Iterable[tuple[str, str]], next_path: str,
              ttl_seconds: int = 120) -> str:
    """Store ``cookies`` (name, value) for one browser to pick up; returns the single-use path to open."""
    token = secrets.token_urlsafe(24)
    client.set(_key(namespace, token), json.dumps({"cookies": list(cookies), "next": next_path}), ex=ttl_seconds)
    return PREFIX + token


def create_app() -> Flask:
    """The bridge app (settings from the environment, as ``app:create_app()``) behind the one-use login route."""
    app = create_bridge_app()
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    namespace = os.environ["REDIS_NAMESPACE"]
    bridge = app.wsgi_app

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX):
            return bridge(environ, start_response)
        raw = client.getdel(_key(namespace, path[len(PREFIX):]))
        if raw is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown or used login token\n"]
        grant = json.loads(raw)
        headers = [("Location", grant["next"]), ("Cache-Control", "no-store")]
        headers += [("Set-Cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Lax")
                    for name, value in grant["cookies"]]
        start_response("303 See Other", headers)
        return [b""]

    app.wsgi_app = wsgi  # type: ignore[method-assign]
    return app
