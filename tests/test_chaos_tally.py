"""The chaos run's carrier choice and per-carrier tally (the run itself is a script: it takes minutes)."""
from __future__ import annotations

import pytest

from app.devtools.chaos import Outcome
from app.devtools.chaos_report import per_carrier_lines
from app.devtools.chaos_telnyx import MODES, HeardCall, parse_modes


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
