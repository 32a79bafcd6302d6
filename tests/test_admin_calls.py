"""Admin live-calls and call-log pages, fed by real (in-process, signed) Twilio webhooks."""
from __future__ import annotations

import html
import re
from urllib.parse import quote
from datetime import UTC, datetime, timedelta

import pytest
from flask.testing import FlaskClient

from app.admin.presenters import duration, outcome, relay_health
from tests.support.admin import admin_post
from tests.support.controls import EmulatorControl
from tests.support.twilio_requests import FROM, TO, answer, call_params, hang_up, new_call_sid, post_signed, start_call


def test_live_page_shows_calls_in_progress(admin_client: FlaskClient, emulator: EmulatorControl) -> None:
    assert "No calls in progress." in admin_client.get("/admin/live").get_data(as_text=True)
    call_sid, session_id = start_call(admin_client, emulator)
    page = html.unescape(admin_client.get("/admin/live").get_data(as_text=True))
    assert session_id in page and call_sid in page
    assert f"{FROM} → {TO}" in page and "twilio" in page and "bidirectional_translation" in page
    assert re.search(r"<td>0:0\d</td>", page)  # duration
    assert "<strong>live</strong>, stream starting" in page  # no media socket in this test: no beat yet
    assert f'aria-label="End session {session_id}"' in page
    assert '<meta http-equiv="refresh"' in page


def test_end_button_ends_the_session(admin_client: FlaskClient, emulator: EmulatorControl) -> None:
    _, session_id = start_call(admin_client, emulator)
    response = admin_post(admin_client, f"/admin/live/{session_id}/end")
    assert response.status_code == 302 and response.location == "/admin/live"
    assert emulator.session(session_id)["status"] == "ended"
    page = admin_client.get("/admin/live").get_data(as_text=True)
    assert f"Ended session {session_id}." in page and "No calls in progress." in page
    audit = admin_client.get("/admin/audit").get_data(as_text=True)
    assert "end session" in audit and session_id in audit
    # Ending again is harmless and says so.
    admin_post(admin_client, f"/admin/live/{session_id}/end")
    assert "already ended" in admin_client.get("/admin/live").get_data(as_text=True)


def test_call_log_shows_ended_calls_with_outcome_reason_and_events(admin_client: FlaskClient,
                                                                   emulator: EmulatorControl) -> None:
    call_sid, session_id = start_call(admin_client, emulator)
    hang_up(admin_client, call_sid)
    page = html.unescape(admin_client.get("/admin/calls").get_data(as_text=True))
    row = page[page.index(call_sid) - 400:page.index("</tr>", page.index(call_sid))]
    assert f"{FROM} → {TO}" in row and session_id in page
    assert '<strong class="outcome">ended cleanly</strong>' in page
    assert "call_completed" in page  # end reason
    assert "call-status" in page and "event" in page  # the status callback, recorded


def test_call_log_filters_by_number_and_date(admin_client: FlaskClient, emulator: EmulatorControl) -> None:
    call_sid, _ = start_call(admin_client, emulator)
    today = datetime.now(UTC).date()
    tomorrow, yesterday = today + timedelta(days=1), today - timedelta(days=1)
    shown = {f"number={quote(TO)}": True, f"number={quote(FROM)}": True, "number=%2B19995550000": False,
             f"from={today}": True, f"from={tomorrow}": False, f"to={yesterday}": False,
             f"from={yesterday}&to={today}": True}
    for query, expected in shown.items():
        response = admin_client.get(f"/admin/calls?{query}")
        assert response.status_code == 200
        assert (call_sid in response.get_data(as_text=True)) is expected, query


@pytest.mark.parametrize(("query", "field", "message"), [
    ("number=415", "number", "E.164"),
    ("from=31%2F01%2F2025", "from", "a date like"),
    ("to=2025-02-30", "to", "a date like"),
    ("from=2025-02-02&to=2025-02-01", "to", "not be before"),
])
def test_call_log_filter_errors_round_trip(admin_client: FlaskClient, query: str, field: str, message: str) -> None:
    response = admin_client.get(f"/admin/calls?{query}")
    assert response.status_code == 422
    page = html.unescape(response.get_data(as_text=True))
    assert re.search(rf'id="{field}-error" class="error">[^<]*{message}', page)
    for part in query.split("&"):
        name, value = part.split("=")
        assert f'name="{name}" type="{"text" if name == "number" else "date"}" value="{value.replace("%2F", "/")}"' in page


def test_outcomes_and_durations() -> None:
    assert outcome({"state": "live"}, {}, []) == "in progress"
    assert outcome({"state": "ended"}, {"status": "end_failed"}, []) == "error"
    assert outcome({"state": "ended", "end_reason": "fallback_twiml"}, {}, []) == "fallback used"
    assert outcome({"state": "ended"}, {}, [{"source": "fallback"}]) == "fallback used"
    assert outcome({"state": "ended", "stream_restarts": "1"}, {}, []) == "reconnected"
    assert outcome({"state": "ended", "stream_restarts": "0"}, {}, []) == "ended cleanly"
    assert outcome({"state": "ended", "clean": "0"}, {}, []) == "ended abnormally"
    assert outcome({"state": "ended", "clean": "1"}, {}, []) == "ended cleanly"
    assert duration("100", "165") == "1:05" and duration("0", "3725") == "1:02:05" and duration(None) == ""


def test_relay_health_from_the_heartbeat_deadline() -> None:
    assert relay_health(None, 15, 1000) == "no relay"
    assert relay_health(999, 15, 1000) == "relay silent"
    assert relay_health(1050, 15, 1000) == "stream starting"
    assert relay_health(1012, 15, 1000) == "relay ok (beat 3s ago)"
