"""The after-call analysis view: requested with a button (it costs a Kallglot credit), then shown from Kallglot's
analysis object; never requested by just opening the page, and refused for a session still running."""
from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from app.extensions import services
from tests.support.admin import admin_post
from tests.support.controls import EmulatorControl
from tests.support.twilio_requests import answer, new_call_sid


def _session_of_a_call(admin_app: Flask, emulator: EmulatorControl) -> str:
    answer(admin_app.test_client(), new_call_sid())
    (session,) = emulator.sessions()
    emulator.send(session["id"], {"type": "transcript.final", "id": "t1", "speaker": "customer", "language": "en",
                                  "text": "My invoice is wrong", "translation": {"language": "es", "text": "…"}})
    return str(session["id"])


def test_an_ended_call_is_analysed_on_request_and_the_result_shown(admin_app: Flask, admin_client: FlaskClient,
                                                                    emulator: EmulatorControl) -> None:
    session_id = _session_of_a_call(admin_app, emulator)
    page = admin_client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    assert "after it has ended" in page  # still running: no button
    with admin_app.app_context():
        services().lifecycle.end_session(session_id, "test")
    page = admin_client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    assert "Ask Kallglot to analyse this call" in page and 'id="analysis"' not in page  # opening it costs nothing
    response = admin_post(admin_client, f"/admin/sessions/{session_id}/analysis")
    assert response.status_code == 303
    admin_post(admin_client, f"/admin/sessions/{session_id}/analysis")  # a second click: the same analysis
    page = admin_client.get(f"/admin/sessions/{session_id}/transcript").get_data(as_text=True)
    assert 'id="analysis"' in page and "completed" in page and "1 turns between customer" in page
    assert "invoice" in page  # a keyword of the call


def test_a_running_call_is_not_analysed(admin_app: Flask, admin_client: FlaskClient,
                                        emulator: EmulatorControl) -> None:
    session_id = _session_of_a_call(admin_app, emulator)
    response = admin_post(admin_client, f"/admin/sessions/{session_id}/analysis", follow_redirects=True)
    assert "after it has ended" in response.get_data(as_text=True)
    with admin_app.app_context():
        svc = services()
        assert svc.redis.get(svc.keys.session_artifacts(session_id, "analysis-id")) is None
