"""The settings every bridge under test runs with: credentials of the fakes, URLs, short windows."""
from __future__ import annotations

from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator

TWILIO_AUTH_TOKEN = "test-twilio-auth-token"
TWILIO_ACCOUNT_SID = "AC" + "1" * 32
EMULATOR_API_KEY = "sk_test_emulator"
SECRET_KEY = "test-secret-key-0123456789abcdef"
PUBLIC_URL = "https://bridge.example.com"
ADMIN_PASSWORD = "test-admin-password"
TELNYX_API_KEY = "KEY_test_telnyx"
TELNYX_TEST_API_KEY = "KEY-test-telnyx-call-control"
TELNYX_CONNECTION_ID = "1494404757140276705"
#: Short windows so holds, heartbeat losses and their ends happen within a test.
E2E_RECONNECT_WINDOW_SECONDS = 2
E2E_HEARTBEAT_TIMEOUT_SECONDS = 3
#: The relay's Kallglot reopen backoff in tests (production: 200,500,1000,2000,4000 ms, about 7.7 s in all).
E2E_RECONNECT_BACKOFF_MS = "50,100,150,200,250"
#: gunicorn's graceful timeout for servers under test: a server stopped with calls open waits this long.
E2E_GRACEFUL_TIMEOUT_SECONDS = 1


def bridge_config(redis_url: str, kallglot_api_url: str, namespace: str, public_url: str) -> dict[str, str]:
    """Settings for a bridge under test, as environment-variable names."""
    return {
        "KALLGLOT_API_URL": kallglot_api_url,
        "KALLGLOT_API_KEY": EMULATOR_API_KEY,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": namespace,
        "PUBLIC_URL": public_url,
        "SECRET_KEY": SECRET_KEY,
        "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
        "DEFAULT_MODE": "bidirectional_translation",
        "DEFAULT_SOURCE_LANGUAGE": "en",
        "DEFAULT_TARGET_LANGUAGE": "es",
        # ``sip`` numbers dial the emulator's own SIP endpoint (app/devtools/emulator/sip.py), as in the demo.
        "KALLGLOT_SIP_DOMAIN": urlsplit(kallglot_api_url).netloc,
    }


def telnyx_config(base: dict[str, str], public_key: str, api_url: str) -> dict[str, str]:
    """``base`` (see :func:`bridge_config`) plus the Telnyx settings."""
    return {**base, "TELNYX_PUBLIC_KEY": public_key, "TELNYX_API_KEY": TELNYX_TEST_API_KEY, "TELNYX_API_URL": api_url}


def twilio_signature(url: str, params: dict[str, str], token: str = TWILIO_AUTH_TOKEN) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for a POST of ``params`` to ``url``."""
    return RequestValidator(token).compute_signature(url, params)


def e2e_bridge_env(redis_url: str, kallglot_api_url: str, namespace: str, public_url: str) -> dict[str, str]:
    """:func:`bridge_config` plus the short windows and backoff of an end-to-end bridge."""
    return {**bridge_config(redis_url, kallglot_api_url, namespace, public_url),
            "RECONNECT_WINDOW_SECONDS": str(E2E_RECONNECT_WINDOW_SECONDS),
            "HEARTBEAT_TIMEOUT_SECONDS": str(E2E_HEARTBEAT_TIMEOUT_SECONDS),
            "KALLGLOT_RECONNECT_BACKOFF_MS": E2E_RECONNECT_BACKOFF_MS}
