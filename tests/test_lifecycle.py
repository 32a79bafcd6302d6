"""Lifecycle rules that need no call: orphaned creates, holds, deadlines and heartbeats (real Redis, emulator)."""
from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask

from app.calls.leg_spec import LegSpec
from app.calls.lifecycle import PENDING_CREATE_GRACE_SECONDS, EndOutcome
from app.extensions import services
from app.kallglot.client import KallglotClient
from tests.support.controls import EmulatorControl
from tests.support.legs import leg
from tests.support.twilio_requests import FROM, TO


def test_a_session_created_but_never_registered_is_ended_by_the_reaper(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAorphan", idempotency_key="twilio-call-CAorphan",
                                           mode="ai_agent")
        # The worker died here: no register_leg. Nothing is due before the grace period…
        assert lifecycle.end_orphaned_creates(now=time.time()) == 0
        assert lifecycle.end_orphaned_creates(now=time.time() + PENDING_CREATE_GRACE_SECONDS + 1) == 1
    ended = emulator.session(session.id)
    assert ended["status"] == "ended" and ended["end_calls"] == 1
    assert len(emulator.sessions()) == 1  # the replayed create found the same session


def test_an_orphaned_create_outlives_a_kallglot_outage_at_its_replay(app: Flask, emulator: EmulatorControl) -> None:
    # Issue 11's property-test failure: the create reached Kallglot but the webhook never registered its leg (its
    # answer timed out, or the worker died); the caller hung up. When the reaper replays the create Kallglot is
    # down: a 503 to the replay says nothing about the first create, so the intent must stay until a replay lands.
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAtimedout",
                                           idempotency_key="twilio-call-CAtimedout", mode="ai_agent")
        assert lifecycle.leg_ended("twilio", "CAtimedout", "call_completed") is None  # never registered
        now = time.time()
        emulator.fault(endpoint="create", status=503, code="service_unavailable", times=50, outage=True)
        assert lifecycle.end_orphaned_creates(now=now + PENDING_CREATE_GRACE_SECONDS + 1) == 1
        assert emulator.session(session.id)["status"] != "ended"
        emulator.clear_faults()
        assert lifecycle.end_orphaned_creates(now=now + 3600) == 1  # Kallglot is back: replayed and ended
        assert lifecycle.end_orphaned_creates(now=now + 7200) == 0  # nothing left pending
    ended = emulator.session(session.id)
    assert ended["status"] == "ended" and ended["end_calls"] == 1
    # The replays were answered with the same session: none other carries this call's key. (Counted by key, not
    # as "one session in all": the emulator is shared, and CI once saw another test's session in it.)
    assert [s["id"] for s in emulator.sessions() if s.get("idempotency_key") == "twilio-call-CAtimedout"] == \
        [session.id]


def test_a_registered_create_is_left_alone(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAok", idempotency_key="k-ok", mode="ai_agent")
        assert lifecycle.register_leg(leg("CAok"), session_id=session.id)
        assert lifecycle.end_orphaned_creates(now=time.time() + 3600) == 0
    assert emulator.session(session.id)["status"] != "ended"


def test_lost_leg_is_held_then_ended_at_its_deadline(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAheld", idempotency_key="k-held", mode="ai_agent")
        lifecycle.register_leg(leg("CAheld"), session_id=session.id)
        assert lifecycle.leg_ended("twilio", "CAheld", "relay_carrier_lost", clean=False) is EndOutcome.HELD
        assert lifecycle.held_session_for(TO, FROM) == session.id
        assert lifecycle.leg_ended("twilio", "CAheld", "call_completed") is None  # a repeat does nothing
        assert lifecycle.end_due_sessions(now=time.time() + 30) == 0
        assert lifecycle.end_due_sessions(now=time.time() + 61) == 1
        assert lifecycle.session_record(session.id)["status"] == "ended"
    assert emulator.session(session.id)["end_calls"] == 1


def test_reattach_cancels_the_hold(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAa", idempotency_key="k-a", mode="ai_agent")
        lifecycle.register_leg(leg("CAa"), session_id=session.id)
        lifecycle.leg_ended("twilio", "CAa", "relay_carrier_lost", clean=False)
        assert lifecycle.register_leg(leg("CAb"), session_id=session.id, reattach_from=(TO, FROM))
        assert lifecycle.held_session_for(TO, FROM) is None
        assert lifecycle.end_due_sessions(now=time.time() + 3600) == 0
        assert lifecycle.session_record(session.id)["status"] == "active"
    assert emulator.session(session.id)["status"] != "ended"


def test_a_silent_relay_is_a_lost_leg(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAhb", idempotency_key="k-hb", mode="ai_agent")
        lifecycle.register_leg(leg("CAhb", hangup_grace_seconds=0), session_id=session.id)
        assert lifecycle.stream_started("twilio", "CAhb", "MZ1")
        assert lifecycle.expire_lost_legs(now=time.time() + 1) == 0
        assert lifecycle.expire_lost_legs(now=time.time() + 3600) == 1
        assert lifecycle.session_record(session.id)["status"] == "held"
        assert lifecycle.end_due_sessions(now=time.time() + 3600) == 1
    assert emulator.session(session.id)["status"] == "ended"


def test_a_leg_ended_by_kallglot_is_never_ended_again(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session = lifecycle.create_session(carrier="twilio", call_id="CAk", idempotency_key="k-k", mode="ai_agent")
        lifecycle.register_leg(leg("CAk"), session_id=session.id)
        assert lifecycle.ended_by_kallglot(session.id, "explicit_end")
        assert lifecycle.leg_ended("twilio", "CAk", "call_completed") is EndOutcome.ALREADY
        assert lifecycle.end_session(session.id, "admin") is EndOutcome.ALREADY
    assert emulator.session(session.id)["end_calls"] == 0


class WorkerDied(BaseException):
    """Stands for the worker being killed at that instant (nothing in the product catches it)."""


class WorkerKilled(BaseException):
    """The worker's process dies here (SIGKILL): nothing after this point runs, no handler catches it."""


class DyingKallglot:
    """The worker's Kallglot client: its ``end`` kills the worker — before the request goes out, or just after
    Kallglot processed it (``reaches_kallglot``)."""

    def __init__(self, real: KallglotClient, *, reaches_kallglot: bool) -> None:
        self.real, self.reaches_kallglot = real, reaches_kallglot

    def end_session(self, session_id: str) -> dict:
        if self.reaches_kallglot:
            self.real.end_session(session_id)
        raise WorkerKilled

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@pytest.mark.parametrize("reaches_kallglot", [False, True], ids=["died-before-kallglot", "died-after-kallglot"])
def test_a_worker_dying_mid_end_leaves_a_deadline_that_finishes_it_once(app: Flask, emulator: EmulatorControl,
                                                                        reaches_kallglot: bool) -> None:
    from app.calls.lifecycle import END_CLAIM_LEASE_SECONDS, SessionLifecycle

    with app.app_context():
        svc = services()
        lifecycle = svc.lifecycle  # the surviving workers' (their reaper)
        session = lifecycle.create_session(carrier="twilio", call_id="CAd", idempotency_key="k-d", mode="ai_agent")
        lifecycle.register_leg(leg("CAd"), session_id=session.id)
        # The worker that hears the last leg end takes the end claim and dies inside its Kallglot end.
        now = time.time()
        dying = SessionLifecycle(svc.redis, svc.keys, DyingKallglot(svc.kallglot, reaches_kallglot=reaches_kallglot),
                                 clock=lambda: now)
        with pytest.raises(WorkerKilled):
            dying.leg_ended("twilio", "CAd", "call_completed")
        # Within the lease nobody else may end it (the holder may only be slow)…
        assert lifecycle.end_session(session.id, "admin", now=now + 1) is EndOutcome.ALREADY
        assert emulator.session(session.id)["end_calls"] == (1 if reaches_kallglot else 0)
        # …after it, a reaper takes the claim over, asks Kallglot whether the end landed, and finishes it once.
        assert lifecycle.end_due_sessions(now=now + END_CLAIM_LEASE_SECONDS + 2) == 1
        assert lifecycle.session_record(session.id)["status"] == "ended"
        assert lifecycle.end_due_sessions(now=now + 3600) == 0  # nothing left due
    assert emulator.session(session.id)["end_calls"] == 1


def test_a_create_registered_under_another_call_id_is_not_an_orphan(app: Flask, emulator: EmulatorControl) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        # The outbound API creates under its request key, then registers the dialled call's own ID.
        session = lifecycle.create_session(carrier="twilio", call_id="api-k1", idempotency_key="api-call-k1",
                                           mode="ai_agent")
        assert lifecycle.register_leg(leg("CAdialled"), session_id=session.id)
        # (the worker died before confirming the create)
        assert lifecycle.end_orphaned_creates(now=time.time() + PENDING_CREATE_GRACE_SECONDS + 1) == 1
    assert emulator.session(session.id)["status"] != "ended"
