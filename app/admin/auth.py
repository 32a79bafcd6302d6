"""Admin sign-in: one shared ``ADMIN_PASSWORD``, a signed session cookie revocable server-side, CSRF, throttling.

- The session is Flask's cookie signed with ``SECRET_KEY`` (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when
  ``PUBLIC_URL`` is https), valid for :data:`SESSION_HOURS`. It carries a marker derived from the password, so
  changing ``ADMIN_PASSWORD`` signs everyone out, and a random nonce whose digest must be present in Redis:
  signing out deletes it, so a copy of the cookie replayed afterwards is refused.
- Every POST under ``/admin`` (sign-in included) must carry the session's CSRF token (Flask-WTF's
  ``CSRFProtect``, checked here for the admin only: carrier webhooks and the API authenticate otherwise).
- Failed sign-ins are throttled per client address and per (name, address): :mod:`app.admin.throttle`.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, current_app, g, redirect, render_template, request, session, url_for
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_limiter import RateLimitExceeded, RequestLimit
from flask_wtf.csrf import CSRFError, CSRFProtect

from app.admin.blueprint import bp
from app.admin.forms import SignInForm
from app.admin.throttle import SIGN_IN_ENDPOINT, SignInDelay, client_address, init_sign_in_limiter, retry_after_seconds
from app.extensions import EXTENSION_KEY, services

log = logging.getLogger(__name__)

SESSION_HOURS = 12
#: Pages reachable without a session (the sign-in page needs its stylesheet).
PUBLIC_ENDPOINTS = frozenset({"admin.sign_in", "admin.static"})


@bp.record_once
def configure_admin(state: BlueprintSetupState) -> None:
    """Harden the session cookie, enable CSRF tokens for the admin's forms, attach the sign-in limiter."""
    app: Flask = state.app
    built = app.extensions[EXTENSION_KEY]
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=built.settings.public_url.startswith("https://"),
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
                      # Checked by guard() for admin POSTs only; a token lives as long as the session.
                      WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=SESSION_HOURS * 3600)
    CSRFProtect(app)  # also provides the csrf_token() template global
    init_sign_in_limiter(app, built.settings, built.keys, on_breach=_too_many_attempts)


def admin_name() -> str:
    """Who is signed in, for the audit log (the name given at sign-in)."""
    return str(session.get("admin_name") or "admin")


def _password_marker() -> str:
    # Binds the session to the current password without putting anything secret in the (readable) cookie.
    settings = services().settings
    return hmac.new(settings.secret_key.encode(), b"admin:" + settings.admin_password.encode(),
                    hashlib.sha256).hexdigest()[:32]


def session_owner() -> str:
    """A stable id of this admin session that is not its secret (a digest of its nonce): what a browser agent's
    leg is bound to, so only the tab that took a call may stream into it. Empty when not signed in."""
    nonce = session.get("admin_nonce")
    return hashlib.sha256(b"agent:" + nonce.encode()).hexdigest()[:32] if isinstance(nonce, str) and nonce else ""


def _session_key(nonce: str) -> str:
    # Redis holds a digest of the nonce, never the nonce itself (no bearer secret in Redis).
    return services().keys.admin_session(hashlib.sha256(nonce.encode()).hexdigest())


def signed_in() -> bool:
    """Whether the request carries a valid admin session that was not signed out."""
    if not hmac.compare_digest(str(session.get("admin", "")), _password_marker()):
        return False
    nonce = session.get("admin_nonce")
    return isinstance(nonce, str) and bool(nonce) and bool(services().redis.exists(_session_key(nonce)))


def _start_session(name: str) -> None:
    # A fresh session (and CSRF token) on sign-in: nothing planted before sign-in survives it.
    session.clear()
    nonce = secrets.token_urlsafe(32)
    services().redis.set(_session_key(nonce), "1", ex=SESSION_HOURS * 3600)
    session.permanent = True
    session.update(admin=_password_marker(), admin_name=name or "admin", admin_nonce=nonce)


def _end_session() -> None:
    nonce = session.get("admin_nonce")
    if isinstance(nonce, str) and nonce:
        services().redis.delete(_session_key(nonce))
    session.clear()


@bp.before_request
def guard() -> ResponseReturnValue | None:
    """Admin disabled → 404; no session → sign-in; a POST without the session's CSRF token → 400."""
    if not services().settings.admin_password:
        return render_template("admin/disabled.html"), 404
    if request.endpoint not in PUBLIC_ENDPOINTS and not signed_in():
        return redirect(url_for("admin.sign_in", next=request.full_path.rstrip("?")))
    if request.method == "POST":
        try:
            current_app.extensions["csrf"].protect()
        except CSRFError as exc:
            log.info("admin form refused: %s", exc.description)
            return render_template("admin/error.html", title="Form expired",
                                   message="This form was stale or not sent from this site. Go back, reload "
                                           "the page and try again."), 400
    return None


def _safe_next(target: str | None) -> str:
    # Only ever redirect within the admin: an absolute or scheme-relative "next" would be an open redirect.
    parts = urlsplit(target or "")
    if target and not parts.scheme and not parts.netloc and parts.path.startswith("/admin/") \
            and "\\" not in target:
        return target
    return url_for("admin.numbers")


def _refused(form: SignInForm, wait: int) -> ResponseReturnValue:
    wording = f"{(wait + 59) // 60} minute(s)" if wait >= 60 else f"{wait} second(s)"
    response = current_app.make_response((render_template(
        "admin/sign_in.html", form=form, next_url=_safe_next(form.next.data),
        error=f"Too many failed attempts. Try again in {wording}."), 429))
    response.headers["Retry-After"] = str(wait)
    return response


def _too_many_attempts(limit: RequestLimit) -> None:
    # Called by the limiter, before the view runs, once per breached limit: the longest wait is the answer.
    log.warning("admin sign-in throttled for %s (%s)", client_address(), limit.limit)
    g.admin_sign_in_wait = max(g.get("admin_sign_in_wait", 0), retry_after_seconds(limit))


@bp.errorhandler(RateLimitExceeded)
def sign_in_throttled(exc: RateLimitExceeded) -> ResponseReturnValue:
    """The sign-in page with the wait, instead of the app's JSON error (the password was not checked)."""
    if request.endpoint != SIGN_IN_ENDPOINT or "admin_sign_in_wait" not in g:
        return exc.get_response()
    return _refused(SignInForm(request.form), int(g.admin_sign_in_wait))


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> ResponseReturnValue:
    """Show the sign-in form; check the password (constant time), throttled per address and per name+address."""
    form = SignInForm(request.form if request.method == "POST" else request.args)
    next_url = _safe_next(form.next.data)
    if request.method == "GET":
        return render_template("admin/sign_in.html", form=form, next_url=next_url, error=None)
    svc, client, name = services(), client_address(), form.name.data
    delay = SignInDelay(svc.redis, svc.keys)
    wait = delay.wait_seconds(name, client)
    if wait:
        return _refused(form, wait)
    if not hmac.compare_digest(form.password.data.encode(), svc.settings.admin_password.encode()):
        delay.failed(name, client)
        log.warning("admin sign-in failed from %s", client)
        return render_template("admin/sign_in.html", form=form, next_url=next_url, error="Wrong password."), 401
    delay.succeeded(name, client)
    _start_session(name)
    return redirect(next_url)


@bp.post("/sign-out")
def sign_out() -> ResponseReturnValue:
    """End the admin session here and server-side: the same cookie is refused from now on."""
    _end_session()
    return redirect(url_for("admin.sign_in"))
