"""Admin numbers page: create/edit/delete profiles, every validation rule, import/export, audit, CLI."""
from __future__ import annotations

import html
import io
import json
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.audit import AuditLog
from app.extensions import services
from app.profiles import NumberProfile
from tests.support.admin import admin_post
from tests.support.twilio_requests import answer, new_call_sid

NUMBER = "+15005550006"  # the number the Twilio webhook tests call


def profile_form(**overrides: Any) -> dict[str, Any]:
    """A complete, valid profile form as the browser posts it."""
    return {"number": NUMBER, "carrier": "twilio", "mode": "assistive_translation", "source_language": "de",
            "target_language": "fr", "greeting": "Willkommen", "greeting_language": "de-DE",
            "agent_number": "+14155550110", "agent_hangup_ends_call": "on", "fallback_message": "Sorry",
            "fallback_language": "en-US", "fallback_number": "+14155550111", "reconnect_window_seconds": "120",
            "hangup_grace_seconds": "5", "metadata_key": ["team", "", ""], "metadata_value": ["blue", "", ""],
            **overrides}


def stored(app: Flask) -> dict[str, NumberProfile]:
    with app.app_context():
        return services().profiles.all()


def field_error(page: str, name: str) -> str | None:
    """The error message shown next to field ``name``, if any."""
    match = re.search(rf'id="{name}-error" class="error">([^<]*)<', page)
    return html.unescape(match.group(1)) if match else None


def test_numbers_page_lists_profiles_and_the_default(admin_client: FlaskClient, admin_app: Flask) -> None:
    page = admin_client.get("/admin/numbers").get_data(as_text=True)
    assert "No number has its own profile yet." in page and "bidirectional_translation, en" in page
    with admin_app.app_context():
        services().profiles.set(NUMBER, NumberProfile(mode="ai_agent", metadata={"team": "blue"}))
    page = admin_client.get("/admin/numbers").get_data(as_text=True)
    assert NUMBER in page and "ai_agent" in page and "team=blue" in page


def test_creating_a_profile_stores_every_field_and_applies_to_the_next_call(
        admin_client: FlaskClient, admin_app: Flask, emulator: Any) -> None:
    response = admin_post(admin_client, "/admin/numbers/new", profile_form())
    assert response.status_code == 302 and response.location == "/admin/numbers"
    assert f"Saved {NUMBER}" in admin_client.get("/admin/numbers").get_data(as_text=True)
    assert stored(admin_app)[NUMBER] == NumberProfile(
        carrier="twilio", mode="assistive_translation", source_language="de", target_language="fr",
        greeting="Willkommen", greeting_language="de-DE", agent_number="+14155550110", agent_hangup_ends_call=True,
        fallback_message="Sorry", fallback_language="en-US", fallback_number="+14155550111",
        reconnect_window_seconds=120, hangup_grace_seconds=5, metadata={"team": "blue"}, own=True)
    # No restart: the very next call to the number gets the profile.
    answer(admin_app.test_client(), new_call_sid())
    (session,) = emulator.sessions()
    assert (session["mode"], session["source_language"], session["target_language"]) == \
        ("assistive_translation", "de", "fr")


def test_the_new_form_is_prefilled_from_the_query(admin_client: FlaskClient) -> None:
    page = admin_client.get("/admin/numbers/new?number=%2B14155550100&carrier=telnyx").get_data(as_text=True)
    assert 'value="+14155550100"' in page and '<option value="telnyx" selected>' in page
    for label in ("Carrier", "Kallglot mode", "Caller language", "Agent language", "Greeting text",
                  "Greeting language", "Agent number", "Fallback message", "Fallback number",
                  "Reconnect window", "Hang-up grace", "Key 1", "Value 1"):
        assert f">{label}" in page, label


INVALID = [
    ("number", {"number": "4155550100"}, "E.164"),
    ("number", {"number": "+1 415 555 0100"}, "E.164"),
    ("carrier", {"carrier": "vonage"}, "must be one of twilio, telnyx"),
    ("mode", {"mode": "translate_everything"}, "must be one of bidirectional_translation"),
    ("source_language", {"source_language": "English"}, "language code"),
    ("target_language", {"target_language": "e"}, "language code"),
    ("greeting", {"greeting": "x" * 501}, "at most 500 characters"),
    ("greeting_language", {"greeting_language": "german"}, "like en-US"),
    ("agent_number", {"agent_number": "555-0100"}, "E.164"),
    ("fallback_message", {"fallback_message": "x" * 501}, "at most 500 characters"),
    ("fallback_language", {"fallback_language": ""}, "like en-US"),
    ("fallback_number", {"fallback_number": "+0123"}, "E.164"),
    ("reconnect_window_seconds", {"reconnect_window_seconds": "301"}, "between 0 and 300"),
    ("reconnect_window_seconds", {"reconnect_window_seconds": "two minutes"}, "whole number"),
    ("hangup_grace_seconds", {"hangup_grace_seconds": "-1"}, "whole number"),
    ("hangup_grace_seconds", {"hangup_grace_seconds": "600"}, "between 0 and 300"),
    ("metadata", {"metadata_key": ["bad key!"], "metadata_value": ["x"]}, "keys must be letters"),
    ("metadata", {"metadata_key": ["", "team"], "metadata_value": ["orphan", "blue"]}, "has no key"),
    ("metadata", {"metadata_key": ["team", "team"], "metadata_value": ["a", "b"]}, "appears twice"),
    ("metadata", {"metadata_key": ["k"], "metadata_value": ["v" * 201]}, "values ≤ 200"),
    ("metadata", {"metadata_key": [f"k{i}" for i in range(21)], "metadata_value": ["v"] * 21}, "at most 20"),
]


@pytest.mark.parametrize(("name", "overrides", "message"), INVALID,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(INVALID)])
def test_invalid_input_round_trips_with_the_error_next_to_the_field(
        admin_client: FlaskClient, admin_app: Flask, name: str, overrides: dict[str, Any], message: str) -> None:
    response = admin_post(admin_client, "/admin/numbers/new", profile_form(**overrides))
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert message in (field_error(page, name) or ""), page
    assert 'id="error-summary"' in page and f'href="#{name}"' in page
    assert 'aria-invalid="true"' in page
    # Everything the user typed is still there.
    for key, value in {**profile_form(), **overrides}.items():
        for item in value if isinstance(value, list) else [value]:
            if item and key != "agent_hangup_ends_call":
                assert f'value="{html.escape(item)}"' in page or f">{html.escape(item)}</textarea>" in page \
                    or f'value="{item}" selected' in page, (key, item)
    assert stored(admin_app) == {}


def test_every_problem_is_reported_at_once(admin_client: FlaskClient) -> None:
    response = admin_post(admin_client, "/admin/numbers/new", profile_form(
        number="nope", mode="x", reconnect_window_seconds="x", agent_number="y"))
    page = response.get_data(as_text=True)
    assert all(field_error(page, n) for n in ("number", "mode", "reconnect_window_seconds", "agent_number"))
    assert "Please fix 4 problems" in page


def test_creating_an_existing_number_asks_to_edit_it(admin_client: FlaskClient, admin_app: Flask) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    response = admin_post(admin_client, "/admin/numbers/new", profile_form(mode="ai_agent"))
    assert response.status_code == 422
    assert "already has a profile" in field_error(response.get_data(as_text=True), "number")
    assert stored(admin_app)[NUMBER].mode == "assistive_translation"


def test_editing_updates_the_profile_and_unchecked_box_means_false(admin_client: FlaskClient,
                                                                    admin_app: Flask) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    page = admin_client.get(f"/admin/numbers/{NUMBER}").get_data(as_text=True)
    assert 'value="Willkommen"' not in page and ">Willkommen</textarea>" in page and 'value="team"' in page
    form = profile_form(mode="ai_agent", reconnect_window_seconds="", metadata_key=["team", "site"],
                        metadata_value=["red", "berlin"])
    del form["agent_hangup_ends_call"]
    response = admin_post(admin_client, f"/admin/numbers/{NUMBER}", form)
    assert response.status_code == 302
    profile = stored(admin_app)[NUMBER]
    assert profile.mode == "ai_agent" and profile.reconnect_window_seconds is None
    assert profile.agent_hangup_ends_call is False and profile.metadata == {"team": "red", "site": "berlin"}


def test_editing_a_number_without_a_profile_is_404(admin_client: FlaskClient) -> None:
    assert admin_client.get("/admin/numbers/+14155550199").status_code == 404


def test_invalid_edit_keeps_the_stored_profile(admin_client: FlaskClient, admin_app: Flask) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    response = admin_post(admin_client, f"/admin/numbers/{NUMBER}", profile_form(hangup_grace_seconds="999"))
    assert response.status_code == 422 and field_error(response.get_data(as_text=True), "hangup_grace_seconds")
    assert stored(admin_app)[NUMBER].hangup_grace_seconds == 5


def test_delete_falls_back_to_the_default(admin_client: FlaskClient, admin_app: Flask) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    response = admin_post(admin_client, f"/admin/numbers/{NUMBER}/delete")
    assert response.status_code == 302 and stored(admin_app) == {}


def test_changes_are_audited_with_who_when_and_what(admin_client: FlaskClient) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    admin_post(admin_client, f"/admin/numbers/{NUMBER}", profile_form(mode="ai_agent"))
    admin_post(admin_client, f"/admin/numbers/{NUMBER}/delete")
    page = admin_client.get("/admin/audit").get_data(as_text=True)
    rows = re.findall(r"<tr>\s*<td>([^<]+ UTC)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", page)
    assert [(who, what, target) for _, who, what, target in rows] == [
        ("Ada", "delete profile", NUMBER), ("Ada", "update profile", NUMBER), ("Ada", "create profile", NUMBER)]
    assert "<code>mode</code>: assistive_translation → ai_agent" in page


def test_export_then_import_round_trips(admin_client: FlaskClient, admin_app: Flask) -> None:
    admin_post(admin_client, "/admin/numbers/new", profile_form())
    response = admin_client.get("/admin/numbers/export")
    assert response.mimetype == "application/json" and "attachment" in response.headers["Content-Disposition"]
    document = response.get_json()
    assert document["format"] == "kallglot-bridge/number-profiles"
    assert document["profiles"][NUMBER]["metadata"] == {"team": "blue"}
    document["profiles"]["+15005550099"] = {**document["profiles"][NUMBER], "mode": "help_chat_voice"}
    upload = (io.BytesIO(json.dumps(document).encode()), "profiles.json")
    response = admin_post(admin_client, "/admin/numbers/import", {"file": upload},
                          content_type="multipart/form-data")
    assert response.status_code == 302
    profiles = stored(admin_app)
    assert profiles["+15005550099"].mode == "help_chat_voice" and profiles[NUMBER].greeting == "Willkommen"
    assert "Imported 2 profile(s)." in admin_client.get("/admin/numbers").get_data(as_text=True)
    assert admin_client.get("/admin/audit").get_data(as_text=True).count("import profile") == 2


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not valid JSON"),
    ('{"numbers": []}', "profiles missing"),
    ('{"profiles": {"+15005550099": {"mode": "nope"}, "555": {}}}', "+15005550099: mode must be one of"),
    ('{"profiles": {"555": {}}}', "555: number must be in E.164 form"),
    ('{"profiles": {"+15005550099": {"hangup_grace_seconds": 1.5}}}', "hangup grace seconds must be a whole"),
])
def test_an_invalid_import_writes_nothing_and_keeps_the_text(admin_client: FlaskClient, admin_app: Flask,
                                                              text: str, message: str) -> None:
    response = admin_post(admin_client, "/admin/numbers/import", {"json": text})
    assert response.status_code == 422
    page = html.unescape(response.get_data(as_text=True))
    assert "Nothing was imported." in page and message in page and text in page
    assert stored(admin_app) == {}


def test_cli_export_and_import(admin_app: Flask, tmp_path: Any) -> None:
    runner = admin_app.test_cli_runner()
    with admin_app.app_context():
        services().profiles.set(NUMBER, NumberProfile(mode="ai_agent", metadata={"a": "b"}))
    exported = runner.invoke(args=["numbers", "export"])
    assert exported.exit_code == 0, exported.output
    document = json.loads(exported.stdout)
    assert document["profiles"][NUMBER]["mode"] == "ai_agent"
    document["profiles"]["+15005550099"] = {"mode": "help_chat_voice", "source_language": "en"}
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(document))
    imported = runner.invoke(args=["numbers", "import", str(path)])
    assert imported.exit_code == 0 and "imported 2 profile(s)" in imported.output
    assert stored(admin_app)["+15005550099"].mode == "help_chat_voice"
    path.write_text(json.dumps({"profiles": {"+15005550077": {"mode": "x"}}}))
    refused = runner.invoke(args=["numbers", "import", str(path)])
    assert refused.exit_code == 1 and "+15005550077: mode must be one of" in refused.output
    assert "+15005550077" not in stored(admin_app)
    with admin_app.app_context():
        svc = services()
        assert {(e.who, e.action) for e in AuditLog(svc.redis, svc.keys).entries()} == {("cli", "import profile")}
