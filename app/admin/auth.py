"""Admin sign-in: one shared ``ADMIN_PASSWORD``, a signed session cookie, CSRF tokens, sign-in throttling.

- The session is Flask's cookie signed with ``SECRET_KEY`` (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when
  ``PUBLIC_URL`` is https), valid for :data:`SESSION_HOURS`. It carries a marker derived from the password, so
  changing ``ADMIN_PASSWORD`` signs everyone out.
- Every POST under ``/admin`` (sign-in included) must carry the session's CSRF token.
- Failed sign-ins are counted in Redis per client address and in total over a window; past the limit sign-in
  answers 429 without checking the password.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, current_app, redirect, render_template, request, session, url_for
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue

from app.admin.blueprint import bp
from app.extensions import EXTENSION_KEY, services

log = logging.getLogger(__name__)

SESSION_HOURS = 12
CSRF_FIELD = "csrf_token"
#: Failed sign-ins allowed per client address, and in total (spoofed addresses cannot dodge the total), per window.
MAX_FAILURES_PER_CLIENT = 5
MAX_FAILURES_TOTAL = 50
FAILURE_WINDOW_SECONDS = 15 * 60
#: Pages reachable without a session (the sign-in page needs its stylesheet).
PUBLIC_ENDPOINTS = frozenset({"admin.sign_in", "admin.static"})


@bp.record_once
def configure_session_cookie(state: BlueprintSetupState) -> None:
    """Harden the session cookie: only the admin uses it."""
    app: Flask = state.app
    settings = app.extensions[EXTENSION_KEY].settings
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS))
    app.jinja_env.globals["csrf_token"] = csrf_token


def csrf_token() -> str:
    """This session's CSRF token (created on first use); every admin form posts it back."""
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return str(session[CSRF_FIELD])


def admin_name() -> str:
    """Who is signed in, for the audit log (the name given at sign-in)."""
    return str(session.get("admin_name") or "admin")


def _password_marker() -> str:
    # Binds the session to the current password without putting anything secret in the (readable) cookie.
    settings = services().settings
    return hmac.new(settings.secret_key.encode(), b"admin:" + settings.admin_password.encode(),
                    hashlib.sha256).hexdigest()[:32]


def signed_in() -> bool:
    """Whether the request carries a valid admin session."""
    return hmac.compare_digest(str(session.get("admin", "")), _password_marker())


@bp.before_request
def guard() -> ResponseReturnValue | None:
    """Admin disabled → 404; no session → sign-in; a POST without the session's CSRF token → 400."""
    if not services().settings.admin_password:
        return render_template("admin/disabled.html"), 404
    if request.endpoint not in PUBLIC_ENDPOINTS and not signed_in():
        return redirect(url_for("admin.sign_in", next=request.full_path.rstrip("?")))
    if request.method == "POST":
        sent = request.form.get(CSRF_FIELD, "")
        if not sent or CSRF_FIELD not in session or not hmac.compare_digest(sent, str(session[CSRF_FIELD])):
            return render_template("admin/error.html", title="Form expired",
                                   message="This form was stale or not sent from this site. Go back, reload "
                                           "the page and try again."), 400
    return None


def client_address() -> str:
    """The caller's address as the nearest proxy reports it (Heroku/Render append it to X-Forwarded-For)."""
    return request.access_route[-1] if request.access_route else (request.remote_addr or "unknown")


class SignInThrottle:
    """Counts failed sign-ins per client and in total, each in a fixed window that starts at the first failure."""

    def __init__(self) -> None:
        svc = services()
        self._redis, self._keys = svc.redis, svc.keys

    def _scopes(self, client: str) -> list[tuple[str, int]]:
        return [(self._keys.admin_signin_failures(client), MAX_FAILURES_PER_CLIENT),
                (self._keys.admin_signin_failures("*"), MAX_FAILURES_TOTAL)]

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        waits = [0]
        for key, limit in self._scopes(client):
            count = self._redis.get(key)
            if count is not None and int(count) >= limit:
                waits.append(max(int(self._redis.ttl(key)), 1))
        return max(waits)

    def failed(self, client: str) -> None:
        """Count one failed attempt by ``client``."""
        with self._redis.pipeline(transaction=True) as pipe:
            for key, _ in self._scopes(client):
                pipe.set(key, 0, ex=FAILURE_WINDOW_SECONDS, nx=True)
                pipe.incr(key)
            pipe.execute()

    def succeeded(self, client: str) -> None:
        """Forget ``client``'s failures (the total keeps counting: it guards against many addresses)."""
        self._redis.delete(self._keys.admin_signin_failures(client))


def _safe_next(target: str | None) -> str:
    # Only ever redirect within the admin: an absolute or scheme-relative "next" would be an open redirect.
    parts = urlsplit(target or "")
    if target and not parts.scheme and not parts.netloc and parts.path.startswith("/admin/") \
            and "\\" not in target:
        return target
    return url_for("admin.numbers")


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> ResponseReturnValue:
    """Show the sign-in form; check the password (constant time), throttled per client."""
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("admin/sign_in.html", next_url=next_url, error=None, name="")
    throttle, client = SignInThrottle(), client_address()
    name = request.form.get("name", "").strip()[:60]
    wait = throttle.retry_after(client)
    if wait:
        response = current_app.make_response((render_template(
            "admin/sign_in.html", next_url=next_url, name=name,
            error=f"Too many failed attempts. Try again in {(wait + 59) // 60} minute(s)."), 429))
        response.headers["Retry-After"] = str(wait)
        return response
    password = request.form.get("password", "")
    if not hmac.compare_digest(password.encode(), services().settings.admin_password.encode()):
        throttle.failed(client)
        log.warning("admin sign-in failed from %s", client)
        return render_template("admin/sign_in.html", next_url=next_url, name=name,
                               error="Wrong password."), 401
    throttle.succeeded(client)
    # A fresh session (and CSRF token) on sign-in: nothing planted before sign-in survives it.
    session.clear()
    session.permanent = True
    session["admin"] = _password_marker()
    session["admin_name"] = name or "admin"
    csrf_token()
    return redirect(next_url)


@bp.post("/sign-out")
def sign_out() -> ResponseReturnValue:
    """End the admin session."""
    session.clear()
    return redirect(url_for("admin.sign_in"))
