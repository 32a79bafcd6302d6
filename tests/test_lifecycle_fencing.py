"""The lifecycle when workers are slow, not dead: fenced stream ends, heartbeat races, revived legs, late
registrations after an orphan was ended, and creates whose answer never came (real Redis, emulator)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from app.calls.leg_spec import LegSpec
from app.calls.lifecycle import PENDING_CREATE_GRACE_SECONDS, EndOutcome, SessionLifecycle
from app.calls.recovery import create_may_have_succeeded
from app.extensions import services
from app.kallglot.client import (
    KallglotClient, KallglotConflict, KallglotSession, KallglotUnavailable, KallglotValidationError,
)
from tests.support.controls import EmulatorControl
from tests.support.legs import leg
from tests.support.twilio_requests import TO
from tests.support.virtual_time import VirtualClock


def another_worker(clock: Callable[[], float] = time.time, *, kallglot: Any = None,
                   hang_up: Callable[[str, str], None] | None = None) -> SessionLifecycle:
    """The lifecycle as another worker of the app builds it (its public constructor, the app's Redis and
    settings), with this test's clock, Kallglot client or carrier hang-up."""
    svc = services()
    return SessionLifecycle(svc.redis, svc.keys, kallglot or svc.kallglot,
                            heartbeat_timeout_seconds=svc.settings.heartbeat_timeout_seconds, hang_up=hang_up,
                            clock=clock)


class AttachesDuringTheReplay:
    """The real Kallglot client of a reaper's worker; while the reaper replays an orphan's create, the slow
    webhook worker registers its leg (``attach``): the interleaving the reaper must survive."""

    def __init__(self, real: KallglotClient, attach: Callable[[], None]) -> None:
        self._real, self._attach = real, attach

    def create_session(self, **kwargs: Any) -> KallglotSession:
        session = self._real.create_session(**kwargs)
        self._attach()
        return session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


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
        # A reaper found the heartbeat due as of `due`; the relay's worker beats (at a later time) before it acts.
        assert another_worker(VirtualClock(now=due + 10)).heartbeat("twilio", "CAb", "MZb")
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
        attached: list[bool] = []
        reaper = another_worker(kallglot=AttachesDuringTheReplay(services().kallglot, lambda: attached.append(
            lifecycle.register_leg(leg("CAslow"), session_id=session.id))))
        # A reaper read the intent before the attach, and replays the create while the slow worker attaches:
        # the live leg wins, and the intent is forgotten (a later pass takes nothing).
        later = time.time() + PENDING_CREATE_GRACE_SECONDS + 1
        assert reaper.end_orphaned_creates(now=later) == 1
        assert attached == [True]
        assert lifecycle.call_record("twilio", "CAslow")["state"] == "live"
        assert lifecycle.end_orphaned_creates(now=later + 3600) == 0
    assert emulator.session(session.id)["status"] != "ended"
    assert emulator.session(session.id)["end_calls"] == 0


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


def _agent_joins(session_id: str, call_id: str, stream_id: str) -> None:
    lifecycle = services().lifecycle
    agent = LegSpec(carrier="twilio", call_id=call_id, speaker="agent", from_number=TO, to_number="+14155557770",
                    mode="ai_agent", reconnect_window_seconds=60)
    assert lifecycle.register_leg(agent, session_id=session_id)
    assert lifecycle.stream_started("twilio", call_id, stream_id)


def _only_the_customer_misses_its_beats(lifecycle: SessionLifecycle, clock: VirtualClock, customer: str,
                                       agent: str) -> float:
    """The customer's relay stalls past its heartbeat while the agent's keeps beating: an hour passes on
    ``clock`` (``lifecycle``'s), a reaper gives up the customer's leg alone, and the agent's leg keeps the session
    active (not held)."""
    later = clock.now = time.time() + 3600
    assert lifecycle.heartbeat("twilio", agent, "MZagent")
    assert lifecycle.expire_lost_legs(now=later) == 1
    assert lifecycle.call_record("twilio", customer)["end_reason"] == "heartbeat_lost"
    assert lifecycle.call_record("twilio", agent)["state"] == "live"
    return later


def test_a_slow_relay_brings_its_leg_back_while_another_leg_keeps_the_session_active(
        app: Flask, emulator: EmulatorControl) -> None:
    """Its beat used to be refused because the session was not *held*: the customer's leg stayed "ended"
    while its relay went on relaying, so the call's end was missed when the customer hung up."""
    with app.app_context():
        clock = VirtualClock(now=time.time())
        lifecycle = another_worker(clock)
        session_id = _started("CAcust1", "MZcust", hangup_grace_seconds=0)
        _agent_joins(session_id, "CAagent1", "MZagent")
        _only_the_customer_misses_its_beats(lifecycle, clock, "CAcust1", "CAagent1")
        assert lifecycle.session_record(session_id)["status"] == "active"
        assert lifecycle.heartbeat("twilio", "CAcust1", "MZcust")  # the stalled worker wakes up
        assert lifecycle.call_record("twilio", "CAcust1")["state"] == "live"
        assert lifecycle.session_legs(session_id)[("twilio", "CAcust1")] == "live"
    assert emulator.session(session_id)["status"] != "ended"


def test_a_slow_relays_own_hang_up_after_its_leg_was_given_up_hangs_up_the_agent(
        app: Flask, emulator: EmulatorControl) -> None:
    """The customer hangs up before their stalled relay beat again: the relay's clean end (from the leg's
    current stream) replaces the "heartbeat lost" guess, so the agent is hung up and the session ends now —
    it used to change nothing, leaving the agent on the line."""
    hung_up: list[tuple[str, str]] = []
    with app.app_context():
        clock = VirtualClock(now=time.time())
        lifecycle = another_worker(clock, hang_up=lambda carrier, call_id: hung_up.append((carrier, call_id)))
        session_id = _started("CAcust2", "MZcust", hangup_grace_seconds=0)
        _agent_joins(session_id, "CAagent2", "MZagent")
        _only_the_customer_misses_its_beats(lifecycle, clock, "CAcust2", "CAagent2")
        # A late end from another stream still changes nothing (the fence holds).
        assert lifecycle.leg_ended("twilio", "CAcust2", "relay_carrier_stop", clean=True, stream_id="MZold") is None
        assert hung_up == []
        lifecycle.leg_ended("twilio", "CAcust2", "relay_carrier_stop", clean=True, stream_id="MZcust")
        assert hung_up == [("twilio", "CAagent2")]
        assert lifecycle.call_record("twilio", "CAcust2")["end_reason"] == "relay_carrier_stop"
        assert lifecycle.call_record("twilio", "CAagent2")["state"] == "ended"
        assert lifecycle.session_record(session_id)["status"] == "ended"
    assert emulator.session(session_id)["end_calls"] == 1
