"""``app.devtools.loadtest.worker_cost``: the whole-worker instruction count reads callgrind's dump of the worker
and states issue 16's differences from the three arms' medians."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.devtools.loadtest.worker_cost import ArmRun, report, total_instructions


def test_the_worker_total_is_read_from_its_own_dump(tmp_path: Path) -> None:
    (tmp_path / "callgrind.4242.out").write_text("version: 1\ncreator: callgrind-3.19.0\npid: 4242\n"
                                                 "cmd:  python -m gunicorn\npart: 1\n\nevents: Ir\n\nsummary: 123456789\n")
    (tmp_path / "callgrind.4241.out").write_text("pid: 4241\nsummary: 5\n")  # the master's: not this one
    assert total_instructions(tmp_path, 4242) == 123_456_789
    (tmp_path / "callgrind.7.out").write_text("pid: 7\n")
    with pytest.raises(RuntimeError):
        total_instructions(tmp_path, 7)


def test_the_report_states_the_three_differences() -> None:
    def run(arm: str, per_call_second: float) -> ArmRun:
        return ArmRun(arm, int(per_call_second * 2 * 10), 10.0, 2, 1000, 0, 0.4, 30.0)

    runs = [run("forwarded", 10_300_000), run("not-forwarded", 10_000_000), run("none", 9_900_000),
            run("forwarded", 10_500_000)]
    text = "\n".join(report(runs, calls=2))
    assert "forwarding (forwarded − not-forwarded): +4.00 % of the whole worker" in text  # median 10.4 M
    assert "200,000 instructions per line" in text
    assert "live transcripts in all (forwarded − none): +5.05 %" in text
    assert "held 2/2 / 2/2" in text
