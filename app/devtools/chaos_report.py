"""The chaos run's helpers: the ``--stress`` spin, load averages and failure timelines
(:mod:`app.devtools.chaos`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from app.devtools.simulator.twilio import CallResult

#: The --stress spin never outlives this, even if the run is killed.
STRESS_MAX_SECONDS = 3600


@contextmanager
def stress(enabled: bool) -> Iterator[None]:
    """Keep one extra process spinning on the CPU while the block runs (``--stress``): on a 2-core machine it
    takes the core the stack would otherwise have to itself, so workers become slow, not dead. Pinned to the
    last core when ``taskset`` exists; bounded by :data:`STRESS_MAX_SECONDS` even if this process dies."""
    if not enabled:
        yield
        return
    spin = [sys.executable, "-c", f"import time\nend = time.monotonic() + {STRESS_MAX_SECONDS}\n"
            "while time.monotonic() < end:\n    pass"]
    cores = os.cpu_count() or 1
    if cores > 1 and shutil.which("taskset"):
        spin = ["taskset", "-c", str(cores - 1), *spin]
    proc = subprocess.Popen(spin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


def load_average() -> str:
    """The 1/5/15-minute load averages, as printed next to every figure."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def call_timeline(results: list[CallResult], logs: list[str]) -> list[str]:
    """One failed call: the simulator's timeline, then every bridge log line naming its call or session."""
    lines = []
    for result in results:
        session_id = result.custom_parameters.get("session_id", "")
        lines.append(f"    call {result.call_sid} session={session_id or '?'} streams={result.streams} "
                     f"sent={len(result.sent_audio)} heard={len(result.heard_audio)} said={result.said}")
        lines += [f"      sim  {event[:200]}" for _, event in result.timeline]
        lines += [f"      log  {line[:300]}" for line in logs
                  if result.call_sid in line or (session_id and session_id in line)]
    return lines


def session_timeline(session: dict[str, object], logs: list[str]) -> list[str]:
    """Every bridge log line naming a session or the call it was created for."""
    call_sid = str((session.get("metadata") or {}).get("twilio_call_sid") or "")  # type: ignore[union-attr]
    session_id = str(session["id"])
    return [f"      log  {line[:300]}" for line in logs if session_id in line or (call_sid and call_sid in line)]


#: Log lines that only a reaper pass writes (app/calls/recovery.py and the end it triggers).
REAPER_LINES = {"legs_lost": "relay heartbeat lost", "holds_ended": "ended at Kallglot (hold_expired)",
                "orphans_ended": "was created but never registered"}


def reaper_work_by_instance(instance_logs: list[str]) -> list[dict[str, int]]:
    """What each bridge instance's reapers did, counted from its log: any instance may take any due deadline or
    lost heartbeat, so with several instances the work spreads over them."""
    return [{name: log.count(marker) for name, marker in REAPER_LINES.items()} for log in instance_logs]
