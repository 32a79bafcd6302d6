"""After-call side of the emulator: transcripts, recordings (real MP3), and the signed webhooks
``session.ended``, ``transcript.ready`` and ``recording.ready`` when a session ends.

The transcript is what the emulator said on the stream (its ``transcript.final`` messages, and any pushed through
the control API). The recording is one ``mixed`` channel: every speaker's received μ-law audio, decoded and summed,
encoded to MP3 with LAME (``lameenc``) as Kallglot serves it (``audio/mpeg``).
"""
from __future__ import annotations

import audioop
import hmac
import json
import logging
import threading
import time
from typing import Any

import requests
from flask import Flask, Response, jsonify, request

from .errors import ApiError
from .state import EmulatorState, Session, iso_utc, random_id

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 8000
MP3_BIT_RATE_KBPS = 32
WEBHOOK_TIMEOUT_SECONDS = 5.0


def mixed_pcm(session: Session) -> bytes:
    """Every speaker's audio as 16-bit PCM at 8 kHz, summed sample by sample (caller holds the lock)."""
    tracks = [audioop.ulaw2lin(bytes(audio), 2) for audio in session.audio.values() if audio]
    if not tracks:
        return b""
    length = max(len(t) for t in tracks)
    mixed = tracks[0].ljust(length, b"\0")
    for track in tracks[1:]:
        mixed = audioop.add(mixed, track.ljust(length, b"\0"), 2)
    return mixed


def encode_mp3(pcm: bytes) -> bytes:
    """16-bit mono 8 kHz PCM → MP3 bytes."""
    import lameenc  # the demo/test extra; imported here so the REST API runs without it

    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_BIT_RATE_KBPS)
    encoder.set_in_sample_rate(SAMPLE_RATE_HZ)
    encoder.set_channels(1)
    encoder.set_quality(7)
    return bytes(encoder.encode(pcm) + encoder.flush())


def record_turn(state: EmulatorState, session_id: str, message: dict[str, Any]) -> None:
    """Keep a ``transcript.final`` said on the stream as a turn of the session's transcript (the documented shape)."""
    with state.lock:
        session = state.sessions.get(session_id)
        if session is None:
            return
        turn: dict[str, Any] = {"sequence": len(session.turns) + 1, "speaker": str(message.get("speaker", "")),
                                "language": message.get("language"), "text": str(message.get("text", "")),
                                "timestamp": iso_utc(time.time())}
        if isinstance(message.get("translation"), dict):
            turn["translation"] = dict(message["translation"])
        session.turns.append(turn)


def recording_id(session: Session) -> str:
    """The one recording of a session (stable, so a page and its audio request agree)."""
    return "rec_" + session.id.removeprefix("sess_")


def recording_view(session: Session) -> dict[str, Any]:
    """``GET /v1/recordings/{id}`` (the list shows the same fields)."""
    seconds = max((len(a) for a in session.audio.values()), default=0) / SAMPLE_RATE_HZ
    return {"id": recording_id(session), "object": "recording", "session_id": session.id, "channel": "mixed",
            "duration": round(seconds, 1), "format": "mp3", "status": "ready",
            "download_url": f"/v1/recordings/{recording_id(session)}/audio", "created_at": iso_utc(session.ended_at)}


def transcript_view(session: Session) -> dict[str, Any]:
    """``GET /v1/sessions/{id}/transcript``."""
    languages = sorted({t["language"] for t in session.turns if t.get("language")}
                       | {t["translation"]["language"] for t in session.turns if t.get("translation")})
    return {"id": "trn_" + session.id, "object": "transcript", "session_id": session.id,
            "status": "completed" if session.status == "ended" else "in_progress", "turns": list(session.turns),
            "metadata": {"total_turns": len(session.turns), "duration_seconds": session.duration_seconds,
                         "languages_detected": languages}}


def send_webhooks(url: str, secret: str, session: dict[str, Any]) -> None:
    """POST ``session.ended``, ``transcript.ready`` and ``recording.ready`` for an ended session, signed."""
    from app.kallglot.signature import sign

    events = [("session.ended", {"id": session["id"], "object": "session", "status": "ended",
                                 "duration": session["duration"]}),
              ("transcript.ready", {"session_id": session["id"], "object": "transcript",
                                    "id": "trn_" + session["id"]}),
              ("recording.ready", {"session_id": session["id"], "object": "recording", "id": session["recording"],
                                   "channel": "mixed", "status": "ready"})]
    for kind, data in events:
        body = json.dumps({"id": random_id("evt_", 26), "type": kind, "api_version": "v1",
                           "created_at": iso_utc(time.time()), "data": data}).encode()
        try:
            requests.post(url, data=body, timeout=WEBHOOK_TIMEOUT_SECONDS, headers={
                "Content-Type": "application/json", "Kallglot-Signature": sign(secret, body, int(time.time())),
                "Kallglot-Retry-Count": "0"})
        except requests.RequestException as exc:  # the emulator does not retry; the log says so
            log.warning("emulator webhook %s to %s failed: %s", kind, url, exc)


def notify_ended(app: Flask, state: EmulatorState, session_id: str) -> None:
    """When webhooks are configured, send the after-call webhooks in the background."""
    url, secret = app.config.get("KALLGLOT_EMULATOR_WEBHOOK_URL"), app.config.get("KALLGLOT_EMULATOR_WEBHOOK_SECRET")
    if not url or not secret:
        return
    with state.lock:
        session = state.sessions.get(session_id)
        if session is None or session.status != "ended" or session.webhooks_sent:
            return  # repeated ``end`` calls answer the same summary; the webhooks go once
        session.webhooks_sent = True
        summary = {"id": session.id, "duration": session.duration_seconds, "recording": recording_id(session)}
    threading.Thread(target=send_webhooks, args=(url, secret, summary), daemon=True).start()


def register_artifact_routes(app: Flask, state: EmulatorState) -> None:
    """Attach the transcript and recording endpoints (Bearer / X-API-Key auth)."""
    def session_or_404(session_id: str) -> Session:
        bearer = request.headers.get("Authorization", "")
        key = bearer[7:] if bearer.startswith("Bearer ") else request.headers.get("X-API-Key", "")
        if not key or not hmac.compare_digest(key.encode(), state.api_key.encode()):
            raise ApiError(401, "authentication_error", "invalid_api_key", "Invalid or missing API key.")
        session = state.get_session(session_id)
        if session is None:
            raise ApiError(404, "invalid_request_error", "not_found", f"No session {session_id}.")
        return session

    def by_recording(rec_id: str) -> Session:
        return session_or_404("sess_" + rec_id.removeprefix("rec_"))

    @app.get("/v1/sessions/<session_id>/transcript")
    def transcript(session_id: str) -> Response:
        session = session_or_404(session_id)
        with state.lock:
            return jsonify(transcript_view(session))

    @app.get("/v1/sessions/<session_id>/recordings")
    def recordings(session_id: str) -> Response:
        session = session_or_404(session_id)
        with state.lock:  # available after the session ends
            data = [recording_view(session)] if session.status == "ended" and session.audio else []
            return jsonify({"object": "list", "data": data})

    @app.get("/v1/recordings/<rec_id>")
    def recording(rec_id: str) -> Response:
        session = by_recording(rec_id)
        with state.lock:
            if session.status != "ended":
                raise ApiError(404, "invalid_request_error", "not_found", f"No recording {rec_id}.")
            return jsonify(recording_view(session))

    @app.get("/v1/recordings/<rec_id>/audio")
    def recording_audio(rec_id: str) -> Response:
        session = by_recording(rec_id)
        with state.lock:
            if session.status != "ended":
                raise ApiError(404, "invalid_request_error", "not_found", f"No recording {rec_id}.")
            pcm = mixed_pcm(session)
        return Response(encode_mp3(pcm), mimetype="audio/mpeg", headers={"Accept-Ranges": "none"})


#: Analysis types Kallglot's analysis page shows.
ANALYSIS_TYPES = ("default", "summary", "sentiment", "compliance", "keywords", "performance")


def analysis_view(state: EmulatorState, analysis: dict[str, Any]) -> dict[str, Any]:
    """An analysis object: ``processing`` while its session runs, then ``completed`` with a ``result`` made from
    the session's transcript turns (a summary, a sentiment label and keywords: the emulator's own shape, the
    docs show none)."""
    with state.lock:
        session = state.sessions.get(analysis["session_id"])
        ended = session is not None and session.status == "ended"
        turns = list(session.turns) if session else []
    view: dict[str, Any] = {"id": analysis["id"], "object": "analysis", "session_id": analysis["session_id"],
                            "type": analysis["type"], "status": "completed" if ended else "processing",
                            "created_at": iso_utc(analysis["created_at"])}
    if ended:
        speakers = sorted({str(t.get("speaker", "")) for t in turns})
        words: dict[str, int] = {}
        for turn in turns:
            for word in str(turn.get("text", "")).lower().split():
                word = word.strip("().,…")
                if len(word) > 3:
                    words[word] = words.get(word, 0) + 1
        view["result"] = {
            "summary": f"{len(turns)} turns between {' and '.join(speakers) or 'nobody'} (emulated analysis).",
            "sentiment": "neutral",
            "keywords": [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:5]],
        }
        view["completed_at"] = iso_utc(time.time())
    return view
