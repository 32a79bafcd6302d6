"""The Kallglot REST client against the emulator: auth, idempotency, retries, typed errors."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from app.kallglot.client import (
    KallglotAuthenticationError, KallglotClient, KallglotError, KallglotInsufficientCredits, KallglotNotFound,
    KallglotPermissionDenied, KallglotRateLimited, KallglotUnavailable, KallglotValidationError,
)
from tests.support.controls import EmulatorControl
from tests.support.settings import EMULATOR_API_KEY
from tests.support.servers import free_port
from tests.support.virtual_time import TimedTransport, VirtualClock


def client(emulator: EmulatorControl, **kwargs) -> KallglotClient:
    return KallglotClient(emulator.api_url, EMULATOR_API_KEY, **kwargs)


def test_create_get_end(emulator: EmulatorControl) -> None:
    kallglot = client(emulator)
    session = kallglot.create_session(mode="bidirectional_translation", idempotency_key="k1",
                                      phone_number="+15005550006", source_language="en", metadata={"a": "b"})
    assert session.id.startswith("sess_") and session.status == "created"
    assert session.stream and session.stream.token.startswith("kst_")
    assert session.stream.expires_at is None or session.stream.expires_at > datetime.now(timezone.utc)
    assert "kst_" not in repr(session.stream)
    fetched = kallglot.get_session(session.id)
    assert fetched.id == session.id and fetched.stream is not None
    assert kallglot.end_session(session.id)["status"] == "ended"
    assert kallglot.end_session(session.id)["status"] == "ended"  # idempotent


def test_same_idempotency_key_replays_the_same_session(emulator: EmulatorControl) -> None:
    kallglot = client(emulator)
    first = kallglot.create_session(mode="ai_agent", idempotency_key="twilio-call-CA1")
    second = kallglot.create_session(mode="ai_agent", idempotency_key="twilio-call-CA1")
    assert first.id == second.id and len(emulator.sessions()) == 1


@pytest.mark.parametrize("status, code, error", [
    (402, "insufficient_api_credits", KallglotInsufficientCredits),
    (403, "organization_inactive", KallglotPermissionDenied),
    (422, "invalid_field_value", KallglotValidationError),
    (404, "not_found", KallglotNotFound),
])
def test_typed_errors_carry_the_api_code(emulator: EmulatorControl, status: int, code: str, error: type) -> None:
    emulator.fault(endpoint="create", status=status, code=code, times=1)
    with pytest.raises(error) as raised:
        client(emulator).create_session(mode="ai_agent", idempotency_key="k")
    assert raised.value.status == status and raised.value.code == code and code in str(raised.value)


def test_wrong_key_is_an_authentication_error(emulator: EmulatorControl) -> None:
    with pytest.raises(KallglotAuthenticationError) as raised:
        KallglotClient(emulator.api_url, "sk_test_wrong").create_session(mode="ai_agent", idempotency_key="k")
    assert raised.value.code == "invalid_api_key"
    assert "sk_test_wrong" not in str(raised.value)


def test_429_is_retried_after_retry_after(emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", status=429, code="rate_limit_exceeded", type="rate_limit_error",
                   retry_after=1, times=1)
    clock = VirtualClock()
    transport = TimedTransport(clock)
    session = client(emulator, session=transport, clock=clock, sleep=clock.sleep).create_session(
        mode="ai_agent", idempotency_key="k")
    assert session.id and [a["outcome"] for a in transport.attempts] == ["429", "201"]
    assert clock.slept == [1.0]  # waited what Retry-After said, once, before the retry


def test_429_beyond_the_budget_is_raised(emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", status=429, code="rate_limit_exceeded", retry_after=30, times=1)
    with pytest.raises(KallglotRateLimited):
        client(emulator).create_session(mode="ai_agent", idempotency_key="k")


def test_5xx_retries_are_bounded(emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", status=502, code="upstream_error", times=10)
    with pytest.raises(KallglotUnavailable):
        client(emulator, max_attempts=3).create_session(mode="ai_agent", idempotency_key="k")
    assert emulator.sessions() == []


def test_slow_kallglot_times_out_within_the_webhook_budget(emulator: EmulatorControl) -> None:
    emulator.fault(endpoint="create", delay_seconds=3, times=5)
    clock = VirtualClock()
    transport = TimedTransport(clock)
    started = clock.now
    # The first attempt times out; a retry may meet 409 idempotency_conflict (the first is still running).
    with pytest.raises(KallglotError):
        client(emulator, read_timeout=0.5, total_budget_seconds=2.0, session=transport, clock=clock,
               sleep=clock.sleep).create_session(mode="ai_agent", idempotency_key="k")
    attempts = transport.attempts
    assert attempts[0]["outcome"] == "timeout" and len(attempts) >= 2  # timed out, then retried
    # Every attempt was planned to end within the 2 s budget, backoffs included ...
    assert all(a["at"] - started + a["read_timeout"] <= 2.0 for a in attempts), attempts
    # ... and so the whole call gave up within it (timeouts and waits on the virtual clock).
    assert clock.now - started <= 2.0, (attempts, clock.slept)


def test_unreachable() -> None:
    with pytest.raises(KallglotUnavailable):
        KallglotClient(f"http://127.0.0.1:{free_port()}/v1", "k", total_budget_seconds=1).get_session("sess_x")
