"""The lifecycle when workers are slow, not dead: fenced stream ends, heartbeat races, revived legs, late
registrations after an orphan was ended, and creates whose answer never came (real Redis, emulator)."""
from __future__ import annotations

import time

from flask import Flask

from app.calls.lifecycle import PENDING_CREATE_GRACE_SECONDS, EndOutcome
from app.calls.recovery import create_may_have_succeeded
from app.extensions import services
from app.kallglot.client import KallglotConflict, KallglotUnavailable, KallglotValidationError
from tests.support.controls import EmulatorControl
from tests.support.legs import leg


def _started(call_id: str, stream_id: str, **extra: object) -> str:
    lifecycle = services().lifecycle
    session = lifecycle.create_session(carrier="twilio", call_id=call_id, idempotency_key=f"k-{call_id}",
                                       mode="ai_agent")
    assert lifecycle.register_leg(leg(call_id, **extra), session_id=session.id)
    assert lifecycle.stream_started("twilio", call_id, stream_id)
    return session.id


def test_a_late_end_from_a_replaced_stream_does_not_end_the_restored_leg(app: Flask,
                                                                         emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = _started("CAr", "MZold", hangup_grace_seconds=0)
        # The media socket dropped; <Connect action> restored the stream before the old relay's end landed.
        assert lifecycle.reattach_leg("twilio", "CAr") == session_id
        assert lifecycle.stream_started("twilio", "CAr", "MZnew")
        assert lifecycle.leg_ended("twilio", "CAr", "relay_carrier_stop", clean=True, stream_id="MZold") is None
        assert lifecycle.call_record("twilio", "CAr")["state"] == "live"
        assert not lifecycle.heartbeat("twilio", "CAr", "MZold")  # the old relay is told it was replaced
        assert lifecycle.heartbeat("twilio", "CAr", "MZnew")
        assert lifecycle.leg_ended("twilio", "CAr", "relay_carrier_stop", clean=True,
                                   stream_id="MZnew") is EndOutcome.ENDED
    assert emulator.session(session_id)["end_calls"] == 1


def test_a_beat_that_lands_before_the_expiry_script_wins(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = _started("CAb", "MZb")
        due = time.time() + lifecycle.heartbeat_timeout_seconds + 1
        # A reaper found the heartbeat due as of `due`; the relay beats (at a later time) before it acts.
        lifecycle._clock = lambda: due + 10
        assert lifecycle.heartbeat("twilio", "CAb", "MZb")
        assert lifecycle.expire_lost_legs(now=due) == 0
        assert lifecycle.call_record("twilio", "CAb")["state"] == "live"
    assert emulator.session(session_id)["status"] != "ended"


def test_a_slow_relay_brings_its_given_up_leg_back_while_the_session_is_held(app: Flask,
                                                                             emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = _started("CAs", "MZs")
        assert lifecycle.expire_lost_legs(now=time.time() + 3600) == 1  # the worker stalled past its heartbeat
        assert lifecycle.session_record(session_id)["status"] == "held"
        assert lifecycle.heartbeat("twilio", "CAs", "MZs")  # …and wakes up: the leg is live again
        assert lifecycle.session_record(session_id)["status"] == "active"
        assert lifecycle.call_record("twilio", "CAs")["state"] == "live"
        assert lifecycle.end_due_sessions(now=time.time() + 3600) == 0
    assert emulator.session(session_id)["status"] != "ended"


def test_a_hung_up_leg_is_not_brought_back_by_its_relays_last_beat(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = _started("CAh", "MZh", hangup_grace_seconds=30)
        assert lifecycle.leg_ended("twilio", "CAh", "call_completed", clean=True) is EndOutcome.HELD
        assert not lifecycle.heartbeat("twilio", "CAh", "MZh")
        assert lifecycle.call_record("twilio", "CAh")["state"] == "ended"
        assert lifecycle.end_due_sessions(now=time.time() + 3600) == 1
    assert emulator.session(session_id)["end_calls"] == 1


def test_a_webhook_that_registers_after_its_orphan_was_ended_is_refused(app: Flask,
                                                                        emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAlate", idempotency_key="k-late",
                                           mode="ai_agent")
        # The webhook's worker stalled past the grace; a reaper ended the session it presumed orphaned.
        assert lifecycle.end_orphaned_creates(now=time.time() + PENDING_CREATE_GRACE_SECONDS + 1) == 1
        assert not lifecycle.register_leg(leg("CAlate"), session_id=session.id)  # the caller gets the fallback
        assert session.id not in [s["id"] for s in lifecycle.live_sessions()]
    assert emulator.session(session.id)["end_calls"] == 1


def test_an_orphan_attached_by_a_slow_worker_meanwhile_is_left_alone(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAslow", idempotency_key="k-slow",
                                           mode="ai_agent")
        assert lifecycle.register_leg(leg("CAslow"), session_id=session.id)
        # A reaper that read the intent before the attach replays and tries to end it: the live leg wins.
        lifecycle._end_orphan("twilio:CAslow", "twilio", "CAslow", session, {}, time.time())
        assert lifecycle.call_record("twilio", "CAslow")["state"] == "live"
    assert emulator.session(session.id)["status"] != "ended"


def test_a_create_is_recoverable_whenever_kallglot_may_have_processed_it() -> None:
    timed_out = KallglotUnavailable("ReadTimeout", code="unreachable")
    retried_into_503 = KallglotUnavailable("busy", status=503, code="service_unavailable")
    retried_into_503.maybe_processed = True  # an earlier attempt got no answer
    assert create_may_have_succeeded(timed_out)
    assert create_may_have_succeeded(retried_into_503)
    assert create_may_have_succeeded(KallglotConflict("still processing", status=409, code="idempotency_conflict"))
    assert not create_may_have_succeeded(KallglotUnavailable("busy", status=503, code="service_unavailable"))
    assert not create_may_have_succeeded(KallglotValidationError("bad", status=422, code="invalid"))


def test_a_retried_registration_keeps_the_live_streams_fence(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = _started("CAretry", "MZlive")
        assert lifecycle.register_leg(leg("CAretry"), session_id=session_id)  # the webhook was retried
        assert lifecycle.heartbeat("twilio", "CAretry", "MZlive")  # the running relay still owns the leg
    assert emulator.session(session_id)["status"] != "ended"
