"""The chaos run's carrier choice, per-carrier tally, dead-air rule and reaper-work count (the run itself is a
script: it takes minutes)."""
from __future__ import annotations

import logging
import time

import pytest
from flask import Flask

from app.calls.leg_spec import LegSpec
from app.devtools.chaos import Outcome
from app.devtools.chaos_report import (
    bridge_closed_lines, first_audio_lines, late_call_lines, left_in_silence, per_carrier_lines,
    reaper_work_by_instance, refused_then_reopened_lines, slowest,
)
from app.devtools.chaos_telnyx import MODES, HeardCall, parse_modes
from app.devtools.simulator.caller import StreamWait
from app.devtools.simulator.twilio_stream import CallResult
from app.extensions import services


def test_carriers_option_accepts_the_three_modes_and_refuses_others() -> None:
    assert parse_modes("twilio,texml,call-control") == MODES
    assert parse_modes(" texml , texml") == ("texml",)
    for bad in ("", "telnyx", "twilio,sip"):
        with pytest.raises(ValueError):
            parse_modes(bad)


def test_tally_counts_each_session_for_the_carrier_of_the_call_it_was_created_for() -> None:
    heard, silent, stranded = (HeardCall("v3:a", heard_audio=b"x"), HeardCall("v3:b"),
                               HeardCall("v3:c", said=["hi"], stranded=True))
    outcomes = [Outcome("normal", [heard], carrier="texml"), Outcome("normal", [silent], carrier="texml"),
                Outcome("agent", [stranded], carrier="call-control"), Outcome("normal", [], "Boom", "twilio")]
    sessions = [{"id": "s1", "status": "ended", "end_calls": 1, "metadata": {"telnyx_call_control_id": "v3:a"}},
                {"id": "s2", "status": "active", "end_calls": 0, "metadata": {"telnyx_call_control_id": "v3:b"}},
                {"id": "s3", "status": "ended", "end_calls": 2, "metadata": {"telnyx_call_control_id": "v3:c"}}]
    lines = per_carrier_lines(outcomes, sessions, MODES)
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
    #                     calls created ended leaked double dead-air errors
    assert rows["twilio"] == [1, 0, 0, 0, 0, 1, 1]
    assert rows["texml"] == [2, 2, 1, 1, 0, 1, 0]
    assert rows["call-control"] == [1, 1, 1, 0, 1, 1, 0]  # a stranded caller is dead air, though told something


# ----- the patient caller's dead-air rule (app/devtools/simulator/caller.py, chaos_report.left_in_silence) -----
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: the rule only compares times; the log test uses its date


def _wait(first_audio: float | None, ended: float, *, restored: bool = False, patience: float = 5.0) -> StreamWait:
    """A stream whose caller stopped talking at T0, heard its first audio ``first_audio`` s later (None: never)
    and whose stream ended ``ended`` s later."""
    return StreamWait(T0, patience, None if first_audio is None else T0 + first_audio, T0 + ended, restored=restored)


def test_a_call_first_heard_at_4_s_is_not_dead_air_but_is_late_by_the_old_criterion() -> None:
    wait = _wait(4.0, 5.0)
    call = HeardCall("v3:slow", heard_audio=b"x", waits=[wait])
    assert not left_in_silence([call])
    assert not wait.silent and wait.first_audio_seconds == 4.0
    assert wait.later_than(1.5) and wait.later_than(1.0)  # still counted beside the dead air


def test_a_call_silent_for_the_whole_patience_is_dead_air() -> None:
    # Heard nothing for 5 s, then listened 1 s more and hung up: the stream was up 6 s in silence.
    assert left_in_silence([HeardCall("v3:silent", waits=[_wait(None, 6.0)])])
    # Audio that came only after the patience ran out does not undo it (the caller had given up waiting).
    assert left_in_silence([HeardCall("v3:too-late", heard_audio=b"x", waits=[_wait(5.4, 6.0)])])
    # The same silence on a Twilio call's result, whose report reads the same attributes.
    result = CallResult(call_sid="CA1", heard_audio=b"", waits=[_wait(None, 6.0)])
    assert Outcome("normal", [result]).dead_air


def test_a_restored_stream_that_stays_silent_is_dead_air_even_after_audio_on_the_first() -> None:
    first, restored = _wait(0.4, 2.0), _wait(None, 6.0, restored=True)
    assert left_in_silence([HeardCall("v3:restored", heard_audio=b"x" * 800, waits=[first, restored])])
    assert not left_in_silence([HeardCall("v3:restored", heard_audio=b"x" * 800,
                                          waits=[first, _wait(0.9, 2.0, restored=True)])])


def test_a_stream_the_bridge_ends_before_the_patience_is_not_dead_air_when_the_caller_is_told_why() -> None:
    # Kallglot unavailable: the stream is closed after 0.3 s and the caller hears the fallback message.
    told = CallResult(call_sid="CA2", said=["The translator is unavailable."], waits=[_wait(None, 0.3)])
    assert not left_in_silence([told])
    # Closed with nothing said and nothing heard on any call: nothing ever reached the caller.
    assert left_in_silence([CallResult(call_sid="CA3", waits=[_wait(None, 0.3)])])


def test_first_audio_table_counts_late_calls_and_streams_never_answered() -> None:
    outcomes = [Outcome("normal", [HeardCall("v3:a", heard_audio=b"x", waits=[_wait(0.2, 2.0)])], carrier="texml"),
                Outcome("normal", [HeardCall("v3:b", heard_audio=b"x", waits=[_wait(1.2, 3.0)])], carrier="texml"),
                Outcome("worker-kill", [HeardCall("v3:c", heard_audio=b"x",
                                                  waits=[_wait(0.3, 1.0), _wait(None, 6.0, restored=True)])],
                        carrier="texml")]
    lines = first_audio_lines(outcomes, ["texml"])
    total = lines[1].split()
    # label, streams, p50, p95, p99, max, never, calls, >1.0s, >1.5s
    assert total == ["texml", "4", "0.30", "1.20", "1.20", "1.20", "1", "3", "2", "1"]
    assert [o.results[0].call_sid for o in slowest(outcomes, 2)] == ["v3:c", "v3:b"]


def test_late_calls_are_listed_with_the_bridge_log_lines_that_explain_them() -> None:
    late = HeardCall("v3:late", heard_audio=b"x", waits=[_wait(2.5, 4.0)])
    quick = HeardCall("v3:quick", heard_audio=b"x", waits=[_wait(0.3, 2.0)])
    logs = ['{"ts":"2027-01-15T08:00:01.000Z","message":"telnyx call=v3:late session=s relay started (stream x)"}',
            '{"ts":"2027-01-15T08:00:01.500Z","message":"telnyx call=v3:late kallglot session.error boom"}',
            '{"ts":"2027-01-15T08:00:00.200Z","message":"telnyx call=v3:quick relay started (stream y)"}']
    lines = late_call_lines([Outcome("normal", [late, quick], carrier="texml")], logs)
    assert len(lines) == 1 and "v3:late stream 1: first audio +2.50s" in lines[0]
    assert "relay started +1.00s" in lines[0] and "kallglot refused +1.50s" in lines[0]


def test_refused_then_reopened_streams_are_counted_with_what_their_callers_heard_after_the_reopen() -> None:
    heard = HeardCall("v3:heard", heard_audio=b"x", waits=[_wait(1.3, 3.0)])
    silent = HeardCall("v3:silent", waits=[_wait(None, 6.0)])
    logs = [f'{{"ts":"2027-01-15T08:00:0{s}Z","message":"telnyx call={call} session=s {what}"}}'
            for call in ("v3:heard", "v3:silent")
            for s, what in (("0.500", "kallglot session.error service_unavailable: x"),
                            ("1.000", "kallglot stream reopened (0 chunks dropped meanwhile)"))]
    [line] = refused_then_reopened_lines([Outcome("connect-fault", [heard, silent], carrier="texml")], logs)
    assert "2 streams; caller heard audio after the reopen on 1, nothing at all on 1" in line
    assert "p50 0.30s, max 0.30s" in line


def test_bridge_closes_for_no_start_are_split_by_whether_the_simulator_had_sent_start() -> None:
    closed = "server closed the media socket (code 1008"
    late_sim = HeardCall("v3:a", timeline=[(0.0, f"stream: {closed}, before our start)")])
    missed = HeardCall("v3:b", timeline=[(0.0, "stream 1: -> connected, start"),
                                         (2.1, f"stream 1: {closed}, 2.05s after our start)")])
    [line] = bridge_closed_lines([Outcome("normal", [late_sim], carrier="call-control"),
                                  Outcome("normal", [missed], carrier="texml")])
    assert line.endswith("1 before the simulator sent start, 1 after it (2.05s after)")


def test_reaper_work_is_counted_from_the_lines_the_reapers_really_log(
        app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    """The run's "reaper work per instance" counts log lines (README Scaling shows it spread over instances):
    each marker must be what the reaper passes log, or a reworded message silently reads as 0 everywhere."""
    leg = LegSpec(carrier="twilio", call_id="CAreap", speaker="customer", from_number="+15551230000",
                  to_number="+15551230001", mode="ai_agent", reconnect_window_seconds=30)
    with app.app_context(), caplog.at_level(logging.INFO):
        lifecycle, now = services().lifecycle, time.time()
        held = lifecycle.create_session(carrier="twilio", call_id="CAreap", idempotency_key="reap-1",
                                        mode="ai_agent")
        assert lifecycle.register_leg(leg, session_id=held.id)
        assert lifecycle.stream_started("twilio", "CAreap", "MZreap") and lifecycle.heartbeat("twilio", "CAreap",
                                                                                               "MZreap")
        assert lifecycle.expire_lost_legs(now=now + 3600) == 1  # its relay stopped beating: lost, then held
        assert lifecycle.end_due_sessions(now=now + 7200) == 1  # nobody came back: the hold runs out
        lifecycle.create_session(carrier="twilio", call_id="CAorphan", idempotency_key="reap-2", mode="ai_agent")
        assert lifecycle.end_orphaned_creates(now=now + 3600) == 1  # created, never registered
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert reaper_work_by_instance([log, ""]) == [{"legs_lost": 1, "holds_ended": 1, "orphans_ended": 1},
                                                  {"legs_lost": 0, "holds_ended": 0, "orphans_ended": 0}]
