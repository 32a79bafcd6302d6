"""The supervisor console in-process: SSE access, resume, bounds; after-call views, usage and CSV."""
from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis as redis_lib
import requests
from flask import Flask
from flask.testing import FlaskClient

from app.admin.live import PAGE_EVENTS, RECONCILE_SECONDS
from app.calls.events import LEG, RELAY_HEALTH, TRANSCRIPT, EventForwarder, SessionEventLog, leg_event, transcript_event
from app.calls.usage import record_billed_seconds
from app.kallglot.signature import sign
from app.redis_keys import RedisKeys
from tests.support.admin import admin_sign_in
from tests.support.controls import EmulatorControl
from tests.support.settings import EMULATOR_API_KEY
from tests.support.twilio_requests import hang_up, start_call

WEBHOOK_SECRET = "whsec_test_console"


class SseReader:
    """Reads Server-Sent Events from a streaming test-client response, one at a time, as they come."""

    def __init__(self, client: FlaskClient, url: str, headers: dict[str, str] | None = None) -> None:
        self.response = client.get(url, headers=headers or {}, buffered=False)
        assert self.response.status_code == 200, self.response.get_data(as_text=True)
        assert self.response.mimetype == "text/event-stream"
        self._chunks: Iterator[bytes] = iter(self.response.response)
        self._buffer = ""

    def next(self, timeout: float = 10.0) -> tuple[str, str, dict[str, Any]]:
        """The next event (id, event, data); keep-alive comments and ``retry:`` are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while "\n\n" in self._buffer:
                block, self._buffer = self._buffer.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines()
                              if ": " in line and not line.startswith(":"))
                if "data" in fields:
                    return fields.get("id", ""), fields.get("event", "message"), json.loads(fields["data"])
            assert time.monotonic() < deadline, "no event in time"
            chunk = next(self._chunks)
            self._buffer += chunk.decode() if isinstance(chunk, bytes) else chunk

    def close(self) -> None:
        self.response.close()


def sse_events(client: FlaskClient, url: str, count: int, *, headers: dict[str, str] | None = None,
               timeout: float = 10.0) -> list[tuple[str, str, dict[str, Any]]]:
    """The first ``count`` events (id, event, data) of an SSE stream."""
    reader = SseReader(client, url, headers)
    try:
        return [reader.next(timeout) for _ in range(count)]
    finally:
        reader.close()


def event_log(app: Flask) -> SessionEventLog:
    svc = app.extensions["kallglot_bridge"]
    return SessionEventLog(svc.redis, svc.keys)


def test_no_console_page_or_stream_without_an_admin_session(admin_app: Flask) -> None:
    anonymous = admin_app.test_client()
    for path in ("/admin/live/events", "/admin/live/events?session=sess_x", "/admin/live/sess_x", "/admin/usage",
                 "/admin/usage.csv", "/admin/calls.csv", "/admin/sessions/sess_x/transcript",
                 "/admin/sessions/sess_x/recordings/rec_x/audio"):
        response = anonymous.get(path, headers={"Accept": "text/event-stream"})
        assert response.status_code == 302 and "/admin/sign-in" in response.headers["Location"], path
        assert b"data:" not in response.data


def test_session_stream_resumes_after_last_event_id(admin_app: Flask, admin_client: FlaskClient) -> None:
    log = event_log(admin_app)
    for n in range(3):
        log.append("sess_resume", TRANSCRIPT, transcript_event(speaker="customer", text=f"hello {n}", final=True,
                                                               language="en", translation=f"hola {n}",
                                                               translation_language="es"))
    first = sse_events(admin_client, "/admin/live/events?session=sess_resume", 3)
    assert [(kind, data["text"], data["translation"]) for _, kind, data in first] == \
        [("transcript", f"hello {n}", f"hola {n}") for n in range(3)]
    # The browser reconnects with the last id it saw: only what came after is sent.
    log.append("sess_resume", LEG, leg_event(carrier="twilio", call_id="CA1", speaker="customer", state="ended"))
    resumed = sse_events(admin_client, "/admin/live/events?session=sess_resume", 2,
                         headers={"Last-Event-ID": first[0][0]})
    assert [d.get("text", d.get("state")) for _, _, d in resumed] == ["hello 1", "hello 2"]
    after_all = sse_events(admin_client, "/admin/live/events?session=sess_resume", 1,
                           headers={"Last-Event-ID": first[2][0]})
    assert after_all[0][1] == "leg" and after_all[0][2]["state"] == "ended"


def test_bad_resume_points_and_session_ids_are_4xx(admin_client: FlaskClient) -> None:
    assert admin_client.get("/admin/live/events?session=sess_x",
                            headers={"Last-Event-ID": "1-2 event: x"}).status_code == 400
    assert admin_client.get("/admin/live/events?after=nope").status_code == 400
    assert admin_client.get("/admin/live/events?session=../../etc").status_code == 404
    assert admin_client.get("/admin/live/sess_unknown").status_code == 404
    assert admin_client.get("/admin/sessions/bad%20id/transcript").status_code == 404
    assert admin_client.get("/admin/usage?number=12345").status_code == 422


def test_a_session_with_10000_transcript_events_stays_bounded_in_the_page(
        admin_app: Flask, admin_client: FlaskClient, emulator: EmulatorControl) -> None:
    call_sid, session_id = start_call(admin_client, emulator)
    forwarder = EventForwarder(event_log(admin_app))
    for n in range(10_000):
        forwarder.publish(session_id, TRANSCRIPT, transcript_event(speaker="customer", text=f"line {n}", final=True,
                                                                    translation=f"línea {n}"))
    forwarder.publish(session_id, TRANSCRIPT, transcript_event(speaker="agent", text="typing…", final=False))
    assert forwarder.flush(timeout=30)
    page = admin_client.get(f"/admin/live/{session_id}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    rows = html.count('<tr class="final"') + html.count('<tr class="partial"')
    assert rows == PAGE_EVENTS  # the newest lines only, however long the call
    assert "line 9999" in html and "línea 9999" in html and "typing…" in html and ">line 9000<" not in html
    assert f'data-max-lines="{PAGE_EVENTS}"' in html  # the JavaScript keeps the same bound
    assert 'src="/admin/static/live.js"' in html and "<script>" not in html  # no inline script (CSP)
    policy = page.headers["Content-Security-Policy"]
    assert all(d in policy for d in ("script-src 'self'", "connect-src 'self'", "media-src 'self'"))
    assert "unsafe-inline" not in policy
    hang_up(admin_client, call_sid)


def test_the_live_page_shows_each_legs_latest_playback_lag(admin_app: Flask, admin_client: FlaskClient,
                                                           emulator: EmulatorControl) -> None:
    """The relay publishes playback lag per leg as marks echo (app/relay/core.py); the page shows the latest."""
    call_sid, session_id = start_call(admin_client, emulator)
    forwarder = EventForwarder(event_log(admin_app))
    for lag in (240, 180):
        forwarder.publish(session_id, RELAY_HEALTH, {"call_id": call_sid, "speaker": "customer",
                                                     "playback_lag_ms": lag, "kallglot_reconnects": 0})
    assert forwarder.flush(timeout=10)
    html = admin_client.get(f"/admin/live/{session_id}").get_data(as_text=True)
    assert "customer: playback lag 180 ms, 0 Kallglot reconnects" in html and "240 ms" not in html
    streamed = sse_events(admin_client, f"/admin/live/events?session={session_id}", 2)
    assert [(kind, data["playback_lag_ms"]) for _, kind, data in streamed if kind == RELAY_HEALTH] == \
        [(RELAY_HEALTH, 240), (RELAY_HEALTH, 180)]
    hang_up(admin_client, call_sid)


def test_live_list_stream_snapshot_then_gone_when_the_call_ends(admin_client: FlaskClient,
                                                                emulator: EmulatorControl) -> None:
    call_sid, session_id = start_call(admin_client, emulator)
    reader = SseReader(admin_client, "/admin/live/events")
    try:
        snapshot = reader.next()
        assert snapshot[1] == "snapshot" and [s["id"] for s in snapshot[2]] == [session_id]
        assert snapshot[2][0]["legs"][0]["state"] == "live" and snapshot[2][0]["to"]
        hang_up(admin_client, call_sid)  # no relay ran here: the periodic re-read of the live set notices
        # The next event, whenever the re-read comes (a liveness bound, several re-read periods long), says so.
        gone = reader.next(timeout=6 * RECONCILE_SECONDS)
        assert gone[1:] == ("gone", {"id": session_id}), gone
    finally:
        reader.close()
    # Reconnecting (Last-Event-ID) starts with a fresh snapshot: the ended call is not in it.
    (again,) = sse_events(admin_client, "/admin/live/events", 1, headers={"Last-Event-ID": snapshot[0]})
    assert again[1] == "snapshot" and again[2] == []


def test_after_call_transcript_recording_and_billed_minutes(admin_app: Flask, admin_client: FlaskClient,
                                                            emulator: EmulatorControl) -> None:
    call_sid, session_id = start_call(admin_client, emulator)
    emulator.send(session_id, {"type": "transcript.final", "speaker": "customer", "language": "en",
                               "text": "Where is my parcel?", "translation": {"language": "es",
                                                                              "text": "¿Dónde está mi paquete?"}})
    hang_up(admin_client, call_sid)
    page = admin_client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    assert "Where is my parcel?" in page and "¿Dónde está mi paquete?" in page
    assert 'id="billed-minutes">not known yet' not in page  # from the end response's duration_seconds
    calls = admin_client.get("/admin/calls").get_data(as_text=True)
    assert f"/admin/sessions/{session_id}/transcript" in calls


def speak_to_emulator(emulator: EmulatorControl, session_id: str, seconds: int = 1) -> None:
    """Send ``seconds`` of μ-law audio on the session's stream, as a relay would (the emulator records it)."""
    from simple_websocket import Client

    from app.kallglot.stream_protocol import audio_input

    session = requests.get(f"{emulator.api_url}/sessions/{session_id}", timeout=5,
                           headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}).json()
    ws = Client.connect(f"{session['stream']['url']}?token={session['stream']['token']}")
    try:
        for n in range(seconds * 10):
            ws.send(audio_input(base64.b64encode(bytes([0x10 + n % 64]) * 800).decode(), sequence=n + 1,
                                timestamp_ms=n * 100, speaker="customer"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the emulator's transcript.final for the full second
            if "transcript.final" in str(ws.receive(timeout=1) or ""):
                break
    finally:
        ws.close()


def test_recording_audio_is_streamed_through_the_admin_without_the_key(admin_client: FlaskClient,
                                                                       emulator: EmulatorControl) -> None:
    call_sid, session_id = start_call(admin_client, emulator)
    speak_to_emulator(emulator, session_id)
    hang_up(admin_client, call_sid)
    page = admin_client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    recording_id = "rec_" + session_id.removeprefix("sess_")
    audio_url = f"/admin/sessions/{session_id}/recordings/{recording_id}/audio"
    assert audio_url in page and "(emulated utterance 1)" in page and "(traducción 1)" in page
    assert EMULATOR_API_KEY not in page
    audio = admin_client.get(audio_url)
    assert audio.status_code == 200 and audio.mimetype == "audio/mpeg"
    assert audio.data[:3] == b"ID3" or audio.data[0] == 0xFF  # an MP3 stream (frame sync or ID3 tag)
    assert len(audio.data) > 1000
    assert admin_client.get(f"/admin/sessions/{session_id}/recordings/rec_other/audio").status_code == 404


def test_usage_page_and_csv_exports(admin_app: Flask, admin_client: FlaskClient, redis_client: redis_lib.Redis,
                                    namespace: str) -> None:
    keys = RedisKeys(namespace)
    redis_client.hset(keys.session("sess_u1"), mapping={"to": "+14155550100", "status": "ended"})
    redis_client.hset(keys.session("sess_u2"), mapping={"to": "=HYPERLINK(1)", "status": "ended"})
    record_billed_seconds(redis_client, keys, "sess_u1", 245.3, ended_at=time.time())
    record_billed_seconds(redis_client, keys, "sess_u2", 60.0, ended_at=time.time())
    page = admin_client.get("/admin/usage").get_data(as_text=True)
    assert "+14155550100" in page and "4.09" in page and "4:06" in page and "5:06 (5.09 min)" in page
    csv_text = admin_client.get("/admin/usage.csv").get_data(as_text=True)
    assert csv_text.splitlines()[0] == "day_utc,number,sessions,billed_seconds,billed_minutes"
    assert ",+14155550100,1,245.3,4.09" in csv_text
    assert ",'=HYPERLINK(1),1,60.0,1.00" in csv_text  # a formula is neutralised; E.164 kept as is
    filtered = admin_client.get("/admin/usage.csv?number=%2B14155550100").get_data(as_text=True)
    assert "HYPERLINK" not in filtered
    calls_csv = admin_client.get("/admin/calls.csv")
    assert calls_csv.status_code == 200 and calls_csv.mimetype == "text/csv"
    assert calls_csv.get_data(as_text=True).startswith("started_utc,carrier,call_id")


def test_kallglot_webhooks_record_billed_time_and_mark_artifacts_ready(
        make_admin_app: Callable[..., Flask], emulator: EmulatorControl, redis_client: redis_lib.Redis,
        namespace: str) -> None:
    app = make_admin_app(KALLGLOT_WEBHOOK_SECRET=WEBHOOK_SECRET)
    client = app.test_client()
    assert admin_sign_in(client).status_code == 302
    call_sid, session_id = start_call(client, emulator)

    def deliver(kind: str, data: dict[str, Any]) -> int:
        body = json.dumps({"id": f"evt_{kind}_{session_id}", "type": kind, "api_version": "v1",
                           "created_at": "2026-03-26T11:04:20Z", "data": data}).encode()
        return client.post("/kallglot/webhooks", data=body, content_type="application/json",
                           headers={"Kallglot-Signature": sign(WEBHOOK_SECRET, body, int(time.time()))}).status_code

    hang_up(client, call_sid)  # the end response recorded the emulator's figure; the webhook's replaces it
    assert deliver("session.ended", {"id": session_id, "object": "session", "status": "ended",
                                     "duration": 245.3}) == 200
    assert deliver("transcript.ready", {"session_id": session_id, "object": "transcript"}) == 200
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(RedisKeys(namespace).session(session_id)).items()}
    assert record["billed_seconds"] == "245.3" and record["transcript_ready"] and record["status"] == "ended"
    events = event_log(app).latest(session_id, 5)
    assert [(e.kind, e.data.get("state")) for e in events] == [("session", "ended")]
    page = client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    assert "4:06 (4.09 min)" in page
    # analysis.complete drops a cached "processing" answer, so the page asks Kallglot again at once.
    cache = RedisKeys(namespace).session_artifacts(session_id, "analysis")
    redis_client.set(cache, json.dumps({"status": "processing"}), ex=60)
    assert deliver("analysis.complete", {"session_id": session_id, "object": "analysis", "id": "anl_1"}) == 200
    assert redis_client.get(cache) is None
    assert redis_client.hget(RedisKeys(namespace).session(session_id), "analysis_ready")
