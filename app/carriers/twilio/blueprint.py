"""The ``/twilio`` blueprint every Twilio route registers on, with what every Twilio request shares: its log
context (the call's SID and number) and its metrics label."""
from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, request

from app import metrics
from app.carriers.twilio import CARRIER
from app.logging_setup import bind_log_context, request_log_fields

#: Twilio marks each webhook delivery with this header (the same on retries): the request ID when no proxy set one.
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"

bp = Blueprint(CARRIER, __name__, url_prefix="/twilio")
metrics.count_rejections(bp, CARRIER)


def log_fields(headers: Mapping[str, str], form: Mapping[str, str]) -> dict[str, str]:
    """A Twilio request's log context: the carrier, ``CallSid`` and the called number (``To``), plus Twilio's
    delivery token as the request ID when it carries one."""
    fields = request_log_fields(headers, (IDEMPOTENCY_HEADER,)) if headers.get(IDEMPOTENCY_HEADER) else {}
    return {**fields, "carrier": CARRIER, "call_id": form.get("CallSid", "")[:80], "number": form.get("To", "")[:32]}


@bp.before_request
def bind_call_log_context() -> None:
    """Every later log line of this request names the call (before the signature check, so refusals do too)."""
    bind_log_context(**log_fields(request.headers, request.values))
