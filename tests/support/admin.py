"""Driving the admin UI from a Flask test client: CSRF tokens, sign-in, form posts."""
from __future__ import annotations

import re
from typing import Any

from flask.testing import FlaskClient

from tests.support.settings import ADMIN_PASSWORD


def csrf_token_in(html: str) -> str:
    """The CSRF token of the first form on an admin page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def admin_sign_in(client: FlaskClient, password: str = ADMIN_PASSWORD, name: str = "Ada") -> Any:
    """Sign ``client`` in to the admin; returns the sign-in POST's response."""
    token = csrf_token_in(client.get("/admin/sign-in").get_data(as_text=True))
    return client.post("/admin/sign-in", data={"csrf_token": token, "password": password, "name": name})


def admin_post(client: FlaskClient, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """POST an admin form with the session's CSRF token."""
    token = csrf_token_in(client.get("/admin/numbers").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token, **(data or {})}, **kwargs)
