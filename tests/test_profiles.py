"""Number profiles: storage, defaults, validation and the `flask numbers` CLI."""
from __future__ import annotations

import pytest
from flask import Flask

from app.extensions import services
from app.profiles import NumberProfile, ProfileError


def test_default_applies_to_numbers_without_a_profile(app: Flask) -> None:
    with app.app_context():
        profile = services().profiles.for_number("+14155550100")
    assert not profile.own and profile.source_language == "en" and profile.target_language == "es"


def test_set_get_delete_round_trip(app: Flask) -> None:
    with app.app_context():
        store = services().profiles
        profile = NumberProfile(mode="ai_agent", greeting="Hola", agent_number="+14155550199",
                                reconnect_window_seconds=60, metadata={"team": "billing"})
        store.set("+14155550100", profile)
        loaded = store.for_number("+14155550100")
        assert loaded.own and loaded.to_dict() == profile.to_dict()
        assert list(store.all()) == ["+14155550100"]
        assert store.delete("+14155550100") and not store.for_number("+14155550100").own


def test_invalid_profile_names_each_field(app: Flask) -> None:
    bad = NumberProfile(mode="karaoke", source_language="english", agent_number="555",
                        reconnect_window_seconds=900, greeting_language="English")
    with app.app_context(), pytest.raises(ProfileError) as raised:
        services().profiles.set("4155550100", bad)
    assert set(raised.value.problems) == {"number", "mode", "source_language", "agent_number",
                                          "reconnect_window_seconds", "greeting_language"}


def test_cli_set_list_show_delete(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["numbers", "set", "+14155550100", "--mode", "assistive_translation",
                                 "--source", "de", "--target", "fr"])
    assert result.exit_code == 0, result.output
    assert "mode=assistive_translation source=de target=fr" in result.output
    assert "+14155550100: mode=assistive_translation" in runner.invoke(args=["numbers", "list"]).output
    assert "(default)" in runner.invoke(args=["numbers", "show", "+14155550111"]).output
    bad = runner.invoke(args=["numbers", "set", "+14155550100", "--source", "english"])
    assert bad.exit_code != 0 and "source_language" in bad.output
    browser = runner.invoke(args=["numbers", "set", "+14155550100", "--browser-agents", "--browser-agent-wait", "45"])
    assert browser.exit_code == 0 and "source=de target=fr browser-agents=45s" in browser.output
    too_long = runner.invoke(args=["numbers", "set", "+14155550100", "--browser-agent-wait", "900"])
    assert too_long.exit_code != 0 and "browser_agent_wait_seconds" in too_long.output
    assert "deleted" in runner.invoke(args=["numbers", "delete", "+14155550100"]).output
