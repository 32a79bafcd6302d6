"""Structured logs: one JSON object per line, the call's fields on its lines, and never a secret."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator

import pytest
import requests

from app.carriers.telnyx.blueprint import log_fields as telnyx_log_fields
from app.carriers.twilio.blueprint import log_fields as twilio_log_fields
from app.logging_setup import (
    JsonFormatter, TextFormatter, bind_log_context, log_context, redact, request_log_fields, reset_log_context,
)
from app.devtools.simulator.twilio import TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.server_log import closed_media_sockets
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import EMULATOR_API_KEY, SECRET_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config
from tests.support.waiting import wait_until

STREAM_TOKEN = re.compile(r"kst_test_[0-9a-f]{24}")  # the emulator's stream-token shape


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom with token=abc123")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("app.test", logging.INFO, __file__, 1, message, args, exc_info)


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    reset_log_context()
    yield
    reset_log_context()


def test_json_lines_carry_the_call_context() -> None:
    bind_log_context(carrier="twilio", call_id="CA1", number="+1555")
    bind_log_context(session_id="ses_1", request_id="")  # empty values are not bound
    line = JsonFormatter().format(record("relay %s", "started"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "relay started" and entry["level"] == "INFO" and entry["logger"] == "app.test"
    assert {k: entry[k] for k in ("carrier", "call_id", "session_id", "number")} == \
        {"carrier": "twilio", "call_id": "CA1", "session_id": "ses_1", "number": "+1555"}
    assert "request_id" not in entry and entry["ts"].endswith("Z")
    reset_log_context(request_id="r1")
    assert log_context() == {"request_id": "r1"}


def test_tracebacks_stay_on_one_line_and_are_redacted() -> None:
    entry = json.loads(JsonFormatter().format(record("failed", exc=True)))
    assert "RuntimeError" in entry["exc"] and "abc123" not in entry["exc"]


def test_extra_fields_are_written_and_scrubbed_too() -> None:
    entry_record = record("stream connecting")
    entry_record.url = "wss://k.example/v1/sessions/s/connect?token=kst_live_abcdef"
    entry_record.attempt = 2
    entry = json.loads(JsonFormatter().format(entry_record))
    assert entry["attempt"] == 2 and entry["url"].endswith("token=***") and "kst_live_abcdef" not in str(entry)
    assert list(entry)[:5] == ["ts", "level", "logger", "message", "pid"]


@pytest.mark.parametrize("text, secret", [
    ("connecting to wss://k.example/v1/sessions/s/connect?token=kst_live_abcdef", "kst_live_abcdef"),
    ("Authorization: Bearer sk_live_0123456789", "0123456789"),
    ("key sk_test_emulator leaked", "sk_test_emulator"),
    ('{"relay_token": "v1.AbC-dEf_ghi"}', "AbC-dEf_ghi"),
])
def test_redact_removes_credential_shapes(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert secret not in TextFormatter().format(record(text.replace("%", "%%")))


def test_request_fields_from_twilio_forms_and_telnyx_json() -> None:
    assert request_log_fields({"X-Request-ID": "abc-1<script>"}) == {"request_id": "abc-1script"}
    assert len(request_log_fields({})["request_id"]) == 16
    fields = twilio_log_fields({"X-Request-ID": "abc-1<script>", "I-Twilio-Idempotency-Token": "t"},
                               {"CallSid": "CA9", "To": "+1"})
    assert fields == {"request_id": "abc-1script", "carrier": "twilio", "call_id": "CA9", "number": "+1"}
    assert twilio_log_fields({"I-Twilio-Idempotency-Token": "tok-1"}, {})["request_id"] == "tok-1"
    assert "request_id" not in twilio_log_fields({}, {})  # the request's own ID stays
    telnyx = telnyx_log_fields({}, {"data": {"payload": {"call_control_id": "v3:x", "to": "+2"}}})
    assert telnyx == {"carrier": "telnyx", "call_id": "v3:x", "number": "+2"}


@pytest.fixture(scope="module")
def logging_bridge(redis_url: str, emulator_server: RunningServer) -> Iterator[RunningServer]:
    """A bridge of this module's own, so its log holds only the calls placed here."""
    port = free_port()
    env = bridge_config(redis_url, emulator_server.url + "/v1", "logs-test", f"http://127.0.0.1:{port}")
    with run_gunicorn("app:create_app()", {**env, "LOG_LEVEL": "DEBUG"}, workers=2, port=port) as server:
        yield server


def test_a_whole_call_logs_json_with_its_fields_and_no_secret(logging_bridge: RunningServer,
                                                               emulator: EmulatorControl) -> None:
    simulator = TwilioCallSimulator(logging_bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    numbers = new_numbers()
    result = simulator.place_call(*numbers, os.urandom(30 * 160), pace=False, listen_seconds=1.0)
    assert result.errors == []
    requests.get(logging_bridge.url + "/twilio/voice", timeout=5)  # an unsigned request: logged refusal
    # The relay logs its end after the caller's side has closed: read the log once the socket's last line is in.
    assert wait_until(lambda: closed_media_sockets(logging_bridge, call_id=result.call_sid), timeout=10)
    relay_token = result.custom_parameters["relay_token"]
    session_id = result.custom_parameters["session_id"]
    lines = [line for line in logging_bridge.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    call_lines = [e for e in entries if e.get("call_id") == result.call_sid]
    messages = " | ".join(e["message"] for e in call_lines)
    assert "answered" in messages and "relay started" in messages and "relay ended" in messages
    for entry in call_lines:
        assert entry["carrier"] == "twilio" and entry.get("request_id"), entry
    relay_lines = [e for e in call_lines if e["logger"].startswith("app.relay")]
    assert relay_lines and all(e["session_id"] == session_id for e in relay_lines)
    assert all(e.get("number") == numbers.to for e in call_lines if e["logger"] == "app.carriers.twilio.webhooks")
    log_text = logging_bridge.log()
    for secret in (TWILIO_AUTH_TOKEN, EMULATOR_API_KEY, SECRET_KEY, relay_token):
        assert secret not in log_text
    assert not STREAM_TOKEN.search(log_text)
