"""``POST /kallglot/webhooks``: Kallglot's signed events, each handled once however often it is delivered."""
from __future__ import annotations

import json
import logging
from typing import Any

import redis
from flask import Blueprint, abort, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from app.calls import usage
from app.calls.events import SESSION, event_log_for
from app.extensions import services
from app.kallglot.signature import verify
from app.redis_keys import first_seen

log = logging.getLogger(__name__)

bp = Blueprint("kallglot", __name__, url_prefix="/kallglot")

#: Events recorded on the call log of the session's legs (besides session.ended, which also acts).
RECORDED_EVENTS = frozenset({
    "session.created", "session.started", "session.ended", "transcript.ready", "transcript.segment",
    "recording.ready", "recording.failed", "analysis.complete", "analysis.failed",
    "session.provider.connected", "session.provider.disconnected",
})
MAX_BODY_BYTES = 256 * 1024
#: Webhooks that make an after-call artifact available → the session-record field marking it.
ARTIFACT_EVENTS = {"transcript.ready": "transcript_ready", "recording.ready": "recordings_ready",
                   "recording.failed": "recordings_failed", "analysis.complete": "analysis_ready",
                   "analysis.failed": "analysis_failed"}


@bp.post("/webhooks")
def kallglot_webhook() -> ResponseReturnValue:
    """Verify, de-duplicate on the event ``id``, record, and act on ``session.ended``."""
    svc = services()
    # Enforced by Werkzeug while reading (413), for chunked bodies too: Content-Length alone is not trusted.
    request.max_content_length = min(MAX_BODY_BYTES, current_app.config.get("MAX_CONTENT_LENGTH") or MAX_BODY_BYTES)
    raw = request.get_data(cache=False)
    if len(raw) >= request.max_content_length:  # a chunked body is cut at the limit rather than refused
        abort(413, description="webhook body too large")
    if not verify(svc.settings.kallglot_webhook_secret, request.headers.get("Kallglot-Signature"), raw):
        log.warning("kallglot webhook refused: missing, stale or invalid Kallglot-Signature")
        abort(403, description="invalid Kallglot signature")
    try:
        event: Any = json.loads(raw)
    except ValueError:
        abort(400, description="body is not JSON")
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        abort(400, description="event needs a string id and type")
    data = event.get("data", {})
    wrong = _wrong_types(data)
    if wrong:
        abort(400, description=f"wrong JSON type: {wrong}")
    session_id = str(data.get("session_id") or (data.get("id") if data.get("object", "session") == "session" else ""))
    seen = svc.keys.seen("kallglot", event["id"])
    try:
        if not first_seen(svc.redis, seen):
            return jsonify(status="duplicate"), 200
        try:
            _handle(event["type"], session_id, data, event)
        except Exception:
            svc.redis.delete(seen)  # not handled: let Kallglot's retry try again
            raise
    except redis.RedisError as exc:
        log.error("kallglot webhook %s not handled, Kallglot will retry: %s", event["id"], exc)
        return jsonify(status="retry later"), 503
    return jsonify(status="ok"), 200


#: ``data`` fields we read: each a string (or a number, for ``duration``) or null when present.
SCALAR_DATA_FIELDS = ("session_id", "id", "object", "status", "duration", "reason", "channel")


def _wrong_types(data: Any) -> str:
    """Which part of ``data`` has the wrong JSON type ("" when none): a signed but malformed event changes nothing."""
    if not isinstance(data, dict):
        return "data must be an object"
    wrong = [name for name in SCALAR_DATA_FIELDS
             if name in data and (isinstance(data[name], bool) or not isinstance(data[name], (str, int, float, type(None))))]
    return ", ".join(f"data.{name}" for name in wrong)


def _handle(kind: str, session_id: str, data: dict[str, Any], event: dict[str, Any]) -> None:
    lifecycle = services().lifecycle
    if not session_id or not lifecycle.session_record(session_id):
        log.info("kallglot webhook %s for unknown session %r ignored", kind, session_id)
        return
    if kind in RECORDED_EVENTS:
        summary = {"event": kind, "event_id": event["id"],
                   **{k: str(data[k])[:200] for k in ("status", "duration", "reason", "channel") if k in data}}
        for (carrier, call_id) in lifecycle.session_legs(session_id):
            lifecycle.record_event(carrier, call_id, "kallglot", summary)
    svc = services()
    if kind in ARTIFACT_EVENTS:
        # Mark the transcript/recording available and drop any cached "not ready yet" answer.
        field = ARTIFACT_EVENTS[kind]
        svc.redis.hset(svc.keys.session(session_id), field, str(event.get("created_at") or "1"))
        svc.redis.delete(svc.keys.session_artifacts(session_id, field.split("_")[0]))
    if kind == "session.ended":
        # Kallglot bills session time; the end response may have recorded it already (same figure).
        if (billed := usage.parse_seconds(data.get("duration", data.get("duration_seconds")))) is not None:
            usage.record_billed_seconds(svc.redis, svc.keys, session_id, billed)
        event_log_for(current_app)[0].append(session_id, SESSION, {"state": "ended", "reason": "kallglot"})
        lifecycle.ended_by_kallglot(session_id, "webhook")
        hung_up = lifecycle.hang_up_live_legs(session_id, "kallglot_session_ended")
        log.info("session=%s ended by Kallglot (webhook); %d live legs hung up", session_id, hung_up)
