"""The ``/telnyx`` blueprint every Telnyx route registers on, with what every Telnyx request shares: its log
context (the call_control_id and number, from TeXML's form or Call Control's JSON) and its metrics label."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, request

from app import metrics
from app.carriers.telnyx import CARRIER
from app.logging_setup import bind_log_context

bp = Blueprint(CARRIER, __name__, url_prefix="/telnyx")
metrics.count_rejections(bp, CARRIER)


def log_fields(form: Mapping[str, str], json_body: Any = None) -> dict[str, str]:
    """A Telnyx request's log context: the carrier, the call_control_id and the called number, from a TeXML
    form (``CallSid``, ``To``) or a Call Control event (``data.payload.call_control_id``, ``.to``)."""
    call_id, number = form.get("CallSid", ""), form.get("To", "")
    data = json_body.get("data") if isinstance(json_body, dict) else None
    payload = data.get("payload") if isinstance(data, dict) else None
    if isinstance(payload, dict):
        call_id = call_id or str(payload.get("call_control_id") or "")
        number = number or str(payload.get("to") or "")
    return {"carrier": CARRIER, "call_id": call_id[:80], "number": number[:32]}


@bp.before_request
def bind_call_log_context() -> None:
    """Every later log line of this request names the call (before the signature check, so refusals do too)."""
    bind_log_context(**log_fields(request.values, request.get_json(silent=True) if request.is_json else None))
