"""Configuration: names, defaults and one clear message per problem."""
from __future__ import annotations

import pytest

from app import create_app
from app.config import ConfigError, Settings

GOOD = {
    "KALLGLOT_API_KEY": "sk_test_abc", "REDIS_URL": "redis://localhost:6379/0",
    "PUBLIC_URL": "https://bridge.example.com", "SECRET_KEY": "s" * 32, "TWILIO_AUTH_TOKEN": "tok",
}


def test_reads_the_documented_environment_names() -> None:
    settings = Settings.from_env({**GOOD, "DEFAULT_MODE": "ai_agent", "DEFAULT_SOURCE_LANGUAGE": "de",
                                  "RECONNECT_WINDOW_SECONDS": "120", "TELNYX_PUBLIC_KEY": "k"})
    assert settings.kallglot_api_url == "https://api.kallglot.com/v1"
    assert settings.default_mode == "ai_agent" and settings.default_source_language == "de"
    assert settings.reconnect_window_seconds == 120
    assert settings.problems() == []


def test_every_problem_is_reported_at_once() -> None:
    settings = Settings.from_env({"PUBLIC_URL": "ftp://x", "RECONNECT_WINDOW_SECONDS": "600",
                                  "DEFAULT_MODE": "karaoke", "UPLINK_CHUNK_MS": "30"})
    with pytest.raises(ConfigError) as raised:
        settings.validate()
    text = str(raised.value)
    for fragment in ("KALLGLOT_API_KEY", "REDIS_URL", "PUBLIC_URL must be an http(s) URL", "SECRET_KEY",
                     "DEFAULT_MODE", "RECONNECT_WINDOW_SECONDS", "UPLINK_CHUNK_MS", "TWILIO_AUTH_TOKEN"):
        assert fragment in text
    assert len(raised.value.problems) == 8


def test_non_numeric_values_are_named() -> None:
    with pytest.raises(ConfigError, match="RECONNECT_WINDOW_SECONDS must be a whole number"):
        Settings.from_env({**GOOD, "RECONNECT_WINDOW_SECONDS": "five"})


def test_create_app_refuses_a_broken_configuration() -> None:
    with pytest.raises(ConfigError):
        create_app({"PUBLIC_URL": "https://x"})


@pytest.mark.parametrize("public, expected", [
    ("https://bridge.example.com/", "wss://bridge.example.com/twilio/media"),
    ("http://127.0.0.1:5000", "ws://127.0.0.1:5000/twilio/media"),
])
def test_stream_urls_derive_from_public_url(public: str, expected: str) -> None:
    assert Settings(public_url=public).public_ws("/twilio/media") == expected


@pytest.mark.parametrize("password, refused", [("short-pass1", True), ("x" * 12, False), ("", False)])
def test_a_short_admin_password_is_refused_at_start_up(password: str, refused: bool) -> None:
    problems = Settings.from_env({**GOOD, "ADMIN_PASSWORD": password}).problems()
    assert any("ADMIN_PASSWORD must be at least 12 characters" in p for p in problems) is refused, problems


@pytest.mark.parametrize("hops, refused", [("0", False), ("1", False), ("5", False), ("-1", True), ("6", True)])
def test_trusted_proxy_hops_are_bounded(hops: str, refused: bool) -> None:
    settings = Settings.from_env({**GOOD, "TRUSTED_PROXY_HOPS": hops})
    assert settings.trusted_proxy_hops == int(hops)
    assert any("TRUSTED_PROXY_HOPS" in p for p in settings.problems()) is refused


def test_no_proxy_is_trusted_by_default() -> None:
    assert Settings.from_env(GOOD).trusted_proxy_hops == 0


@pytest.mark.parametrize("quiet_ms, refused", [("0", False), ("40", False), ("200", False), ("-1", True),
                                               ("201", True)])
def test_uplink_quiet_flush_is_off_or_at_most_200_ms(quiet_ms: str, refused: bool) -> None:
    settings = Settings.from_env({**GOOD, "UPLINK_QUIET_FLUSH_MS": quiet_ms})
    assert settings.uplink_quiet_flush_ms == int(quiet_ms)
    assert any("UPLINK_QUIET_FLUSH_MS must be between 0 (off) and 200" in p for p in settings.problems()) is refused


def test_uplink_quiet_flush_defaults_to_40_ms() -> None:
    assert Settings.from_env(GOOD).uplink_quiet_flush_ms == 40


def test_gunicorns_master_config_check_imports_neither_redis_nor_ssl() -> None:
    """gunicorn.conf.py validates Settings in the master, before the gevent worker monkey-patches: importing
    redis (and so ssl) there leaves ssl unpatched in the workers and prints a non-JSON MonkeyPatchWarning."""
    import subprocess
    import sys

    probe = "import sys, app.config; print(sorted({'redis', 'ssl'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
