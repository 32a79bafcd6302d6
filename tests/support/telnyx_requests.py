"""Telnyx webhook requests to an in-process bridge (Flask test client), signed as Telnyx signs them."""
from __future__ import annotations

import json
import uuid
from typing import Any

from flask.testing import FlaskClient

from app.devtools.simulator.telnyx import TelnyxSigner

#: The numbers of in-process webhook tests (each test has a Redis namespace of its own, so they cannot leak).
TO, FROM = "+15005550006", "+15551230000"


def post(client: FlaskClient, path: str, body: str, signer: TelnyxSigner | None, *, timestamp: int | None = None,
         content_type: str = "application/x-www-form-urlencoded", headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` to ``path``, signed by ``signer`` (Ed25519 over ``timestamp|body``) unless it is None."""
    signed = signer.headers(body, timestamp) if signer else {}
    return client.post(path, data=body.encode(), content_type=content_type, headers={**signed, **(headers or {})})


def event(event_type: str, call_id: str, event_id: str | None = None, **payload: Any) -> str:
    """A Call Control webhook body for ``event_type`` on ``call_id`` (``payload`` adds fields)."""
    return json.dumps({"data": {"record_type": "event", "event_type": event_type, "id": event_id or str(uuid.uuid4()),
                                "occurred_at": "2026-01-01T00:00:00.000000Z",
                                "payload": {"call_control_id": call_id, "call_leg_id": str(uuid.uuid4()),
                                            "call_session_id": str(uuid.uuid4()), "from": FROM, "to": TO,
                                            **payload}},
                       "meta": {"attempt": 1}})


def cc(client: FlaskClient, signer: TelnyxSigner, body: str) -> Any:
    """POST a signed Call Control webhook."""
    return post(client, "/telnyx/call-control", body, signer, content_type="application/json")
