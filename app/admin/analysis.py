"""After the call: Kallglot's analysis of a session (summary, sentiment, keywords…), on the transcript page.

An analysis costs a Kallglot credit, so it is never requested by just opening a page: the admin asks for it with a
button (``POST /v1/sessions/{id}/analysis``, keyed per session so a double click pays once); its id is kept in Redis
beside the session's other after-call artifacts, and the page shows ``GET /v1/analyses/{id}`` — processing, then
the result — cached briefly like the transcript.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from flask import flash, redirect, url_for
from flask.typing import ResponseReturnValue

from app.admin.auth import admin_name
from app.admin.blueprint import bp
from app.admin.live import session_record_or_404
from app.extensions import services
from app.kallglot.client import KallglotError
from app.redis_keys import RECORD_TTL_SECONDS, as_text

log = logging.getLogger(__name__)

#: A completed analysis does not change; one still processing is asked again after this long.
PROCESSING_CACHE_SECONDS = 5
DONE_CACHE_SECONDS = 300


def session_analysis(session_id: str) -> tuple[dict[str, Any] | None, str]:
    """The session's analysis (None when none was requested) and an error text ('' if none)."""
    svc = services()
    analysis_id = as_text(svc.redis.get(svc.keys.session_artifacts(session_id, "analysis-id")))
    if not analysis_id:
        return None, ""
    cache = svc.keys.session_artifacts(session_id, "analysis")
    if (hit := svc.redis.get(cache)) is not None:
        return json.loads(hit), ""
    try:
        analysis = svc.kallglot.get_analysis(analysis_id)
    except KallglotError as exc:
        return None, f"Kallglot did not answer: {exc}"
    done = analysis.get("status") in ("completed", "failed")
    svc.redis.set(cache, json.dumps(analysis), ex=DONE_CACHE_SECONDS if done else PROCESSING_CACHE_SECONDS)
    return analysis, ""


@bp.post("/sessions/<session_id>/analysis")
def request_analysis(session_id: str) -> ResponseReturnValue:
    """Ask Kallglot to analyse an ended session (one credit); the transcript page then shows the result."""
    svc = services()
    record = session_record_or_404(svc, session_id)
    if record.get("status") != "ended":
        flash("Kallglot analyses a session after it has ended.", "error")
    else:
        try:
            analysis = svc.kallglot.request_analysis(session_id)
            svc.redis.set(svc.keys.session_artifacts(session_id, "analysis-id"), str(analysis.get("id", "")),
                          ex=RECORD_TTL_SECONDS)
            svc.redis.delete(svc.keys.session_artifacts(session_id, "analysis"))
            log.info("session=%s analysis %s requested by %s", session_id, analysis.get("id"), admin_name())
            flash("Analysis requested; Kallglot is working on it.", "ok")
        except KallglotError as exc:
            flash(f"Kallglot did not take the analysis request: {exc}", "error")
    return redirect(url_for("admin.session_transcript", session_id=session_id)), 303
