"""After the call: a session's transcript and recordings (fetched from Kallglot on demand, cached briefly),
recording audio streamed through the admin (the API key never reaches a browser), billed minutes per number
and per day, and CSV exports of the call log and of usage.
"""
from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, abort, render_template, request, stream_with_context
from flask.typing import ResponseReturnValue

from app.admin import presenters
from app.admin.analysis import session_analysis
from app.admin.blueprint import bp
from app.admin.live import session_record_or_404, valid_session_id
from app.calls.usage import clock, minutes, usage
from app.extensions import services
from app.kallglot.client import KallglotError, KallglotNotFound
from app.profiles.store import E164

#: How long a fetched transcript / recording list is reused (a page reload, the audio request after it).
ARTIFACT_CACHE_SECONDS = 30
#: Usage and CSV cover the call log's retention.
USAGE_DAYS = 7
AUDIO_CHUNK_BYTES = 32 * 1024


def _cached(session_id: str, kind: str, fetch: Callable[[], Any]) -> tuple[Any, str]:
    """``fetch()``'s result (cached in Redis for :data:`ARTIFACT_CACHE_SECONDS`) and an error text ('' if none)."""
    svc = services()
    key = svc.keys.session_artifacts(session_id, kind)
    if (hit := svc.redis.get(key)) is not None:
        return json.loads(hit), ""
    try:
        value = fetch()
    except KallglotNotFound:
        return None, "Kallglot has no such session (or it has not made this available yet)."
    except KallglotError as exc:
        return None, f"Kallglot did not answer: {exc}"
    svc.redis.set(key, json.dumps(value), ex=ARTIFACT_CACHE_SECONDS)
    return value, ""


def _recordings(session_id: str) -> tuple[list[dict[str, Any]], str]:
    kallglot = services().kallglot
    value, error = _cached(session_id, "recordings", lambda: kallglot.list_recordings(session_id))
    return (value or []), error


@bp.get("/sessions/<session_id>/transcript")
def session_transcript(session_id: str) -> ResponseReturnValue:
    """The session's transcript turn by turn with translations, its recordings, and its billed minutes."""
    svc = services()
    record = session_record_or_404(svc, session_id)
    kallglot = svc.kallglot
    transcript, transcript_error = _cached(session_id, "transcript", lambda: kallglot.get_transcript(session_id))
    recordings, recordings_error = _recordings(session_id)
    turns = [t for t in (transcript or {}).get("turns", []) if isinstance(t, dict)]
    analysis, analysis_error = session_analysis(session_id)
    return render_template("admin/transcript.html", session_id=session_id, record=record, transcript=transcript,
                           analysis=analysis, analysis_error=analysis_error,
                           turns=turns, transcript_error=transcript_error, recordings=recordings,
                           recordings_error=recordings_error,
                           billed=(f"{clock(record['billed_seconds'])} ({minutes(record['billed_seconds'])} min)"
                                   if record.get("billed_seconds") else ""))


@bp.get("/sessions/<session_id>/recordings/<recording_id>/audio")
def recording_audio(session_id: str, recording_id: str) -> ResponseReturnValue:
    """A recording's MP3, streamed from Kallglot with our key; only recordings of this session."""
    recordings, _ = _recordings(valid_session_id(session_id))
    if recording_id not in {str(r.get("id")) for r in recordings}:
        abort(404, description="no such recording for this session")
    try:
        upstream = services().kallglot.open_recording_audio(recording_id, range_header=request.headers.get("Range"))
    except KallglotError as exc:
        abort(502 if exc.status is None or exc.status >= 500 else 404, description="recording not available")

    def body() -> Iterator[bytes]:
        try:
            yield from upstream.iter_content(AUDIO_CHUNK_BYTES)
        finally:
            upstream.close()

    headers = {name: upstream.headers[name] for name in ("Content-Length", "Content-Range", "Accept-Ranges")
               if name in upstream.headers}
    headers["Cache-Control"] = "private, max-age=300"
    return Response(stream_with_context(body()), status=upstream.status_code, headers=headers,
                    mimetype=upstream.headers.get("Content-Type", "audio/mpeg").split(";")[0])


def _csv_cell(value: Any) -> str:
    # Spreadsheets run cells starting with = + - @ as formulas; E.164 numbers are left as they are.
    text = str(value if value is not None else "")
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not E164.match(text) else text


def _csv(filename: str, header: list[str], rows: list[list[Any]]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([[_csv_cell(v) for v in row] for row in rows])
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _number_filter() -> str:
    number = request.args.get("number", "").strip()
    if number and not E164.match(number):
        abort(422, description="number must be in E.164 form like +14155551234")
    return number


@bp.get("/usage")
def usage_page() -> ResponseReturnValue:
    """Billed Kallglot minutes per number and per day (UTC), last seven days."""
    svc = services()
    number = _number_filter()
    rows = [r for r in usage(svc.redis, svc.keys, since=time.time() - USAGE_DAYS * 86400)
            if not number or r.number == number]
    per_day: dict[str, float] = {}
    for row in rows:
        per_day[row.day] = per_day.get(row.day, 0.0) + row.seconds
    return render_template("admin/usage.html", rows=rows, number=number,
                           per_day=[(day, clock(s), f"{s / 60:.2f}") for day, s in sorted(per_day.items(), reverse=True)],
                           total=f"{clock(sum(r.seconds for r in rows)) or '0:00'} ({sum(r.seconds for r in rows) / 60:.2f} min)")


@bp.get("/usage.csv")
def usage_csv() -> ResponseReturnValue:
    """Usage as CSV: day, number, sessions, billed seconds and minutes."""
    svc = services()
    number = _number_filter()
    rows = [r for r in usage(svc.redis, svc.keys, since=time.time() - USAGE_DAYS * 86400)
            if not number or r.number == number]
    return _csv("kallglot-usage.csv", ["day_utc", "number", "sessions", "billed_seconds", "billed_minutes"],
                [[r.day, r.number, r.sessions, f"{r.seconds:.1f}", r.minutes] for r in rows])


@bp.get("/calls.csv")
def calls_csv() -> ResponseReturnValue:
    """The call log (last seven days, optionally one number) as CSV, with each session's billed minutes."""
    rows = presenters.call_log(services().lifecycle, number=_number_filter() or None, since=None, until=None,
                               limit=10_000)
    return _csv("call-log.csv",
                ["started_utc", "carrier", "call_id", "speaker", "from", "to", "outcome", "end_reason", "duration",
                 "session_id", "session_status", "billed_minutes"],
                [[row.started, row.record.get("carrier", ""), row.call_id, row.record.get("speaker", ""),
                  row.record.get("from", ""), row.record.get("to", ""), row.outcome,
                  row.record.get("end_reason") or row.session.get("end_reason", ""), row.duration,
                  row.record.get("session_id", ""), row.session.get("status", ""),
                  minutes(row.session.get("billed_seconds"))] for row in rows])
