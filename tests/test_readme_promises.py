"""README promises that need no whole call: hang-up grace, agent hang-ups both ways, an agent answering after
the session ended, abnormal Telnyx hang-up causes holding the session, ``/readyz`` without Redis, and every
metric the README names (real Redis, the Kallglot emulator, the fake Telnyx)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.calls.leg_spec import LegSpec
from app.calls.lifecycle import EndOutcome
from app.devtools.simulator.telnyx import TelnyxSigner, new_call_control_id
from app.extensions import services
from tests.support.controls import EmulatorControl, FakeCallControl
from tests.support.numbers import CallNumbers
from tests.support.settings import PUBLIC_URL, bridge_config
from tests.support.telnyx_requests import cc, event

README = Path(__file__).resolve().parents[1] / "README.md"


def register(lifecycle, session_id: str, call_id: str, numbers: CallNumbers, *, speaker: str = "customer",
             **options: object) -> bool:
    return lifecycle.register_leg(LegSpec(carrier="twilio", call_id=call_id, speaker=speaker,
                                          from_number=numbers.from_, to_number=numbers.to,
                                          mode="bidirectional_translation", reconnect_window_seconds=60, **options),
                                  session_id=session_id)


def new_session(lifecycle, call_id: str) -> str:
    return lifecycle.create_session(carrier="twilio", call_id=call_id, idempotency_key=f"k-{call_id}",
                                    mode="bidirectional_translation").id


def test_a_hangup_grace_holds_a_cleanly_ended_session_until_it_runs_out(app: Flask, emulator: EmulatorControl,
                                                                        numbers: CallNumbers) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = new_session(lifecycle, "CA77777777777777777777777777777777")
        assert register(lifecycle, session_id, "CA77777777777777777777777777777777", numbers, hangup_grace_seconds=30)
        assert lifecycle.leg_ended("twilio", "CA77777777777777777777777777777777", "call_completed", clean=True) is EndOutcome.HELD
        assert lifecycle.session_record(session_id)["status"] == "held"
        assert lifecycle.end_due_sessions(now=time.time() + 29) == 0  # the grace has not run out
        assert emulator.session(session_id)["status"] != "ended"
        assert lifecycle.end_due_sessions(now=time.time() + 31) == 1
        assert lifecycle.session_record(session_id)["status"] == "ended"
    assert emulator.session(session_id)["end_calls"] == 1


@pytest.mark.parametrize("agent_hangup_ends_call", [True, False])
def test_an_agent_hanging_up_ends_the_customers_call_only_when_the_profile_says_so(
        app: Flask, emulator: EmulatorControl, numbers: CallNumbers, agent_hangup_ends_call: bool) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = new_session(lifecycle, "CA11111111111111111111111111111111")
        assert register(lifecycle, session_id, "CA11111111111111111111111111111111", numbers, agent_hangup_ends_call=agent_hangup_ends_call)
        assert register(lifecycle, session_id, "CA44444444444444444444444444444444", numbers, speaker="agent")
        lifecycle.leg_ended("twilio", "CA44444444444444444444444444444444", "call_completed", clean=True)
        customer = lifecycle.call_record("twilio", "CA11111111111111111111111111111111")
        session = lifecycle.session_record(session_id)
    if agent_hangup_ends_call:
        assert customer["state"] == "ended" and customer["end_reason"] == "agent_hung_up"
        assert session["status"] == "ended" and emulator.session(session_id)["end_calls"] == 1
    else:
        assert customer["state"] == "live"  # the customer stays on with Kallglot
        assert session["status"] == "active" and emulator.session(session_id)["end_calls"] == 0


def test_a_customer_hanging_up_ends_the_agents_call(app: Flask, emulator: EmulatorControl,
                                                    numbers: CallNumbers) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = new_session(lifecycle, "CA55555555555555555555555555555555")
        assert register(lifecycle, session_id, "CA55555555555555555555555555555555", numbers, agent_hangup_ends_call=False)
        assert register(lifecycle, session_id, "CA33333333333333333333333333333333", numbers, speaker="agent")
        lifecycle.leg_ended("twilio", "CA55555555555555555555555555555555", "call_completed", clean=True)
        assert lifecycle.call_record("twilio", "CA33333333333333333333333333333333")["end_reason"] == "customer_hung_up"
        assert lifecycle.session_record(session_id)["status"] == "ended"
    assert emulator.session(session_id)["end_calls"] == 1


def test_an_agent_answering_after_the_session_ended_is_not_attached(app: Flask, emulator: EmulatorControl,
                                                                    numbers: CallNumbers) -> None:
    with app.app_context():
        lifecycle = services().lifecycle
        session_id = new_session(lifecycle, "CA66666666666666666666666666666666")
        assert register(lifecycle, session_id, "CA66666666666666666666666666666666", numbers)
        lifecycle.leg_ended("twilio", "CA66666666666666666666666666666666", "call_completed", clean=True)
        assert lifecycle.session_record(session_id)["status"] == "ended"
        # The agent's leg answers late: it is refused, and nothing ends (or re-opens) the session again.
        assert register(lifecycle, session_id, "CA22222222222222222222222222222222", numbers, speaker="agent") is False
        assert lifecycle.session_legs(session_id).get(("twilio", "CA22222222222222222222222222222222")) != "live"
        assert lifecycle.session_record(session_id)["status"] == "ended"
    assert emulator.session(session_id)["end_calls"] == 1


@pytest.mark.parametrize("cause, held", [("normal_clearing", False), ("originator_cancel", False),
                                         ("timeout", True), ("unspecified", True), ("destination_out_of_order", True)])
def test_an_abnormal_telnyx_hangup_cause_holds_the_session_for_a_reconnect(
        telnyx_app: Flask, telnyx_signer: TelnyxSigner, emulator: EmulatorControl,
        fake_call_control: FakeCallControl, cause: str, held: bool) -> None:
    client = telnyx_app.test_client()
    call_id = new_call_control_id()
    assert cc(client, telnyx_signer, event("call.initiated", call_id, direction="incoming")).status_code == 200
    (session,) = emulator.sessions()
    assert cc(client, telnyx_signer, event("call.hangup", call_id, hangup_cause=cause)).status_code == 200
    with telnyx_app.app_context():
        record = services().lifecycle.session_record(session["id"])
    if held:
        assert record["status"] == "held" and record["hold_reason"] == f"hangup_{cause}"
        assert emulator.session(session["id"])["status"] != "ended"
    else:
        assert record["status"] == "ended" and emulator.session(session["id"])["end_calls"] == 1


def test_readyz_is_503_when_redis_is_down_and_healthz_still_answers(emulator: EmulatorControl,
                                                                      namespace: str) -> None:
    from tests.support.servers import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client: FlaskClient = create_app(bridge_config(down, emulator.api_url, namespace, PUBLIC_URL)).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert client.get("/healthz").status_code == 200


def test_every_metric_the_readme_names_is_defined_with_its_labels_and_exported(client: FlaskClient) -> None:
    """Each metric in the README's table exists in the product with exactly the labels the README lists, and
    every sample ``/metrics`` exports for it carries those labels (multiprocess mode exports a metric once it has
    a sample, so a fresh process shows only some)."""
    import prometheus_client.metrics as prometheus_metrics

    from app import metrics

    defined = {m._name: m for m in vars(metrics).values() if isinstance(m, prometheus_metrics.MetricWrapperBase)}
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `kallglot_bridge_")]
    assert len(rows) >= 15, "the README's metrics table moved"
    exposition = client.get("/metrics").get_data(as_text=True)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        labels = set(re.findall(r"`(\w+)`", cells[1]))
        for name in re.findall(r"`(kallglot_bridge_\w+)`", cells[0]):
            family = name.removesuffix("_total")
            if family in defined:
                assert set(defined[family]._labelnames) == labels, (name, defined[family]._labelnames, labels)
            else:  # computed at scrape time (a collector), e.g. the fleet-wide live sessions
                assert re.search(rf"^# TYPE {family} (counter|gauge|histogram)$", exposition, re.M), name
            for label_text in re.findall(rf"^{name}(?:_bucket|_count|_sum)?(?:{{([^}}]*)}})? ", exposition, re.M):
                found = {pair.split("=")[0] for pair in label_text.split(",") if pair} - {"le"}
                assert found == labels, (name, found, labels)
