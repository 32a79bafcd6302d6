"""``app.devtools.forward_cost``: its fixed workload runs the production relay core end to end (every recorded
frame relayed, every forwarded line in the real Redis), so the instruction counts it reports mean something."""
from __future__ import annotations

import pytest

from app.devtools.forward_cost import ARMS, CHUNK_MS, FRAMES_PER_SECOND, report, run_workload, ArmFigure


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_relays_every_recorded_frame_and_forwards_only_when_asked(redis_url: str, arm: str) -> None:
    calls, seconds = 3, 2
    done = run_workload(arm, calls, seconds, redis_url)
    assert done.frames_to_carrier == calls * seconds * (1000 // CHUNK_MS)  # every audio.output reached the caller
    # 50 frames of 20 ms a second, sent as 100 ms chunks: every byte the caller said reached Kallglot.
    assert done.chunks_to_kallglot == calls * seconds * FRAMES_PER_SECOND * 20 // CHUNK_MS
    lines = 0 if arm == "none" else 2 * calls * seconds
    assert done.lines_received == lines
    forwarded = lines if arm == "forwarded" else 0
    assert (done.written, done.dropped, done.in_redis) == (forwarded, 0, forwarded)


def test_the_report_states_both_differences() -> None:
    from app.devtools.forward_cost import Workload

    def figure(arm: str, cost: float) -> ArmFigure:
        return ArmFigure(arm, cost, 100, Workload(0.0, 100, 100, 100, 0, 3, 100, 0, 0))

    text = "\n".join(report([figure("forwarded", 1_060_000), figure("not-forwarded", 1_000_000),
                             figure("none", 980_000)], calls=10, seconds=10, callgrind=True))
    assert "forwarding (forwarded − not-forwarded): +6.00 %" in text
    assert "600 instructions per line" in text
    assert "live transcripts in all (forwarded − none): +8.16 %" in text
