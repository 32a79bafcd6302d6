"""The chaos run's helpers: the ``--stress`` spin, load averages, the per-carrier tally, the Redis view and
failure timelines (:mod:`app.devtools.chaos`)."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from app.devtools.redis_topologies import RedisDeployment
from app.devtools.simulator.caller import StreamWait
from app.redis_keys import RedisKeys

#: The --stress spin never outlives this, even if the run is killed.
STRESS_MAX_SECONDS = 3600
#: First audio later than these (seconds after the caller stopped talking) is counted beside the dead air: 1.0 s
#: is when the run's old caller (talk 0.5 s, listen 1 s, hang up) had already hung up, 1.5 s the threshold the
#: lifecycle issue tracks.
LATE_FIRST_AUDIO_SECONDS = (1.0, 1.5)


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


def waits_of(results: Iterable[Any]) -> list[StreamWait]:
    """Every stream of a caller's calls, as the caller waited on it."""
    return [wait for result in results for wait in getattr(result, "waits", [])]


def left_in_silence(results: list[Any]) -> bool:
    """Dead air, for one chaos caller (all of its calls, e.g. a returning caller's two):

    - on some stream — the first, or one restored after a drop, where the caller said "hello?" — the caller
      waited their whole patience after talking and heard nothing (:attr:`StreamWait.silent`); or
    - a call was left up, silent, with nothing more coming from the bridge (``stranded``: Call Control); or
    - nothing at all ever reached the caller: no audio and no spoken message on any of their calls.

    A slow answer that comes within the patience is not dead air; its latency is reported on its own.
    """
    if any(getattr(result, "stranded", False) for result in results):
        return True
    if any(wait.silent for wait in waits_of(results)):
        return True
    return not any(result.heard_audio or result.said for result in results)


def _percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, math.ceil(share * len(values)) - 1))]


def first_audio_lines(outcomes: list[Any], carriers: Iterable[str]) -> list[str]:
    """First-audio latency per carrier and scenario: over every stream the caller waited on, seconds from the end
    of their talking to the first returned audio (p50/p95/p99/max), streams where none came, and how many calls
    had a stream answered later than each of :data:`LATE_FIRST_AUDIO_SECONDS` (or not at all while it was up)."""
    late_headers = "".join(f"  >{limit:.1f}s" for limit in LATE_FIRST_AUDIO_SECONDS)
    lines = [f"first audio after talking (s):  streams    p50    p95    p99    max  never   calls{late_headers}"]
    for carrier in carriers:
        mine = [o for o in outcomes if o.carrier == carrier]
        groups = [(carrier, mine)] + [(f"  {scenario}", [o for o in mine if o.scenario == scenario])
                                      for scenario in sorted({o.scenario for o in mine})]
        for label, group in groups:
            waits = waits_of(result for o in group for result in o.results)
            heard = sorted(w.first_audio_seconds for w in waits if w.first_audio_seconds is not None)
            stats = "".join(f" {_percentile(heard, q):>6.2f}" for q in (0.5, 0.95, 0.99)) + f" {heard[-1]:>6.2f}" \
                if heard else "      -      -      -      -"
            late = "".join(f" {sum(any(w.later_than(limit) for w in waits_of(o.results)) for o in group):>6}"
                           for limit in LATE_FIRST_AUDIO_SECONDS)
            lines.append(f"  {label:<28} {len(waits):>8}{stats} {len(waits) - len(heard):>6} {len(group):>7}{late}")
    return lines


def slowest(outcomes: list[Any], count: int = 5) -> list[Any]:
    """The ``count`` callers who waited longest in silence on one stream (never answered: the whole time the
    stream was up), slowest first."""
    waited = [(max(w.waited_seconds() for w in waits_of(o.results)), o) for o in outcomes if waits_of(o.results)]
    return [o for _, o in sorted(waited, key=lambda item: item[0], reverse=True)[:count]]


def wait_summary(results: Iterable[Any]) -> str:
    """One line: each stream's first-audio latency (or "none in N s") and whether it was dead air."""
    parts = []
    for wait in waits_of(results):
        first = wait.first_audio_seconds
        heard = f"first audio {first:.2f}s" if first is not None else f"no audio in {wait.open_seconds:.1f}s"
        parts.append(f"{'restored ' if wait.restored else ''}stream: {heard}{' (DEAD AIR)' if wait.silent else ''}")
    return "; ".join(parts) or "no stream"


#: Bridge log lines that explain a slow first answer, and how a late call's summary names them.
LATENCY_MARKERS = (("relay started", "relay started"), ("kallglot session.error", "kallglot refused"),
                   ("stream reopened", "reopened"), ("not reopened", "NOT reopened"),
                   ("could not reach the Kallglot stream", "kallglot unreachable"),
                   ("held for a reconnect", "held"), ("relay ended", "relay ended"))


def _log_time(line: str) -> float | None:
    match = re.search(r'"ts":\s*"([0-9T:.\-]+)Z"', line)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def marked_lines_by_call(logs: list[str]) -> dict[str, list[tuple[float, str]]]:
    """The log lines that name a :data:`LATENCY_MARKERS` event, by the call they name (``call=<id>``), stamped
    and in time order: one pass over the logs, not one per call."""
    by_call: dict[str, list[tuple[float, str]]] = {}
    for line in logs:
        if not any(marker in line for marker, _ in LATENCY_MARKERS):
            continue
        match, when = re.search(r"call=([^\s\"]+)", line), _log_time(line)
        if match and when is not None:
            by_call.setdefault(match.group(1), []).append((when, line))
    for lines in by_call.values():
        lines.sort()
    return by_call


def late_call_lines(outcomes: list[Any], logs: list[str], limit: float = 1.5) -> list[str]:
    """One line per stream answered later than ``limit`` seconds after the caller stopped talking (or not at all
    while it was up): when, relative to that moment, the bridge's log says its relay started, Kallglot refused
    the stream, the stream was reopened — the evidence that tells load from a fault from a bug."""
    lines = []
    by_call = marked_lines_by_call(logs)
    for outcome in outcomes:
        for result in outcome.results:
            mine = by_call.get(result.call_sid, [])
            for number, wait in enumerate(getattr(result, "waits", []), start=1):
                if not wait.later_than(limit):
                    continue
                first = wait.first_audio_seconds
                marks = [f"{name} {when - wait.talk_ended_at:+.2f}s" for when, line in mine
                         for marker, name in LATENCY_MARKERS if marker in line]
                lines.append(f"  - {outcome.carrier} {outcome.scenario} {result.call_sid} stream {number}"
                             f"{' (restored)' if wait.restored else ''}: "
                             f"{f'first audio +{first:.2f}s' if first is not None else 'no audio'}; "
                             f"{', '.join(marks) or 'no relay log line'}")
    return lines


def bridge_closed_lines(outcomes: list[Any]) -> list[str]:
    """Telnyx media sockets the bridge closed with 1008 (no ``start`` within its limit, or a refused token), split by
    whether the simulator had sent ``connected``/``start`` before the close: before it, the simulator was late;
    after it, the bridge did not read a ``start`` that was sent."""
    before, after = 0, []
    for outcome in outcomes:
        for result in outcome.results:
            for _, event in result.timeline:
                if "(code 1008, before our start)" in event:
                    before += 1
                elif match := re.search(r"\(code 1008, ([\d.]+)s after our start\)", event):
                    after.append(float(match.group(1)))
    return [f"telnyx media sockets the bridge closed with 1008: {before} before the simulator sent start, "
            f"{len(after)} after it ({', '.join(f'{s:.2f}s' for s in sorted(after))} after)"]


def refused_then_reopened_lines(outcomes: list[Any], logs: list[str]) -> list[str]:
    """Streams whose Kallglot stream was refused (``session.error``) and then reopened by the relay: did the caller
    hear anything after the reopen, and how long after it came the first audio? (The audio written before the
    refusal is sent again on the reopened stream, so its echo is what the caller hears first.)"""
    gaps: list[float] = []
    silent: list[str] = []
    by_call = marked_lines_by_call(logs)
    for outcome in outcomes:
        for result in outcome.results:
            mine = by_call.get(result.call_sid, [])
            refused = [when for when, line in mine if "kallglot session.error" in line]
            for wait in getattr(result, "waits", []):
                end = wait.ended_at if wait.ended_at is not None else float("inf")
                reopened = [when for when, line in mine if "stream reopened" in line
                            and any(r <= when for r in refused) and wait.talk_ended_at - 5 <= when <= end]
                if not reopened:
                    continue
                after = wait.first_audio_at is not None and wait.first_audio_at >= reopened[0]
                if after:
                    gaps.append(wait.first_audio_at - reopened[0])  # type: ignore[operator]
                elif wait.first_audio_at is None:
                    silent.append(f"{outcome.carrier} {outcome.scenario} {result.call_sid}")
    gaps.sort()
    spread = f"reopen to first audio p50 {_percentile(gaps, 0.5):.2f}s, max {gaps[-1]:.2f}s" if gaps else ""
    return [f"refused, then reopened: {len(gaps) + len(silent)} streams; caller heard audio after the reopen on "
            f"{len(gaps)}, nothing at all on {len(silent)} {silent[:5]}; {spread}"]


def call_timeline(results: Iterable[Any], logs: list[str]) -> list[str]:
    """One failed call: the simulator's timeline, then every bridge log line naming its call or session."""
    lines = []
    for result in results:
        session_id = result.custom_parameters.get("session_id", "")
        lines.append(f"    call {result.call_sid} session={session_id or '?'} streams={result.streams} "
                     f"sent={len(result.sent_audio)} heard={len(result.heard_audio)} said={result.said}; "
                     f"{wait_summary([result])}")
        # Stamped like the bridge's log lines (UTC), so one can tell e.g. whether the caller's stop went out
        # before the relay even started; a timeline without a wall-clock start keeps its t+ offsets.
        started_at = getattr(result, "started_at", 0.0)
        lines += [f"      sim  {_utc_stamp(started_at + t) if started_at else f't+{t:.3f}s'}  {event[:200]}"
                  for t, event in result.timeline]
        lines += [f"      log  {line[:300]}" for line in logs
                  if result.call_sid in line or (session_id and session_id in line)]
    return lines


def _utc_stamp(when: float) -> str:
    """``2026-11-29T03:26:22.275Z``, the bridge's JSON log ``ts`` format."""
    return datetime.fromtimestamp(when, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def session_timeline(session: dict[str, object], logs: list[str]) -> list[str]:
    """Every bridge log line naming a session or the call it was created for."""
    call_sid = call_of(session)
    session_id = str(session["id"])
    return [f"      log  {line[:300]}" for line in logs if session_id in line or (call_sid and call_sid in line)]


#: Log lines that only a reaper pass writes (app/calls/recovery.py and the end it triggers).
REAPER_LINES = {"legs_lost": "relay heartbeat lost", "holds_ended": "ended at Kallglot (hold_expired)",
                "orphans_ended": "was created but never registered"}


def reaper_work_by_instance(instance_logs: list[str]) -> list[dict[str, int]]:
    """What each bridge instance's reapers did, counted from its log: any instance may take any due deadline or
    lost heartbeat, so with several instances the work spreads over them."""
    return [{name: log.count(marker) for name, marker in REAPER_LINES.items()} for log in instance_logs]


def call_of(session: dict[str, Any]) -> str:
    """The call a session was created for (Twilio CallSid or Telnyx call_control_id), from its metadata."""
    metadata = session.get("metadata") or {}
    return str(metadata.get("twilio_call_sid") or metadata.get("telnyx_call_control_id") or "")


def pid_of_relay(log: str, call_id: str) -> int | None:
    """The worker whose relay carries ``call_id``, from its "relay started" log line."""
    for line in log.splitlines():
        if call_id in line and "relay started" in line:
            match = re.search(r'"pid":\s*(\d+)', line) or re.search(r"\[pid (\d+)\]", line)
            if match:
                return int(match.group(1))
    return None


def per_carrier_lines(outcomes: list[Any], sessions: list[dict[str, Any]], carriers: Iterable[str]) -> list[str]:
    """The tally per carrier: calls, sessions created/ended/leaked/double-ended, dead air, simulator errors.

    A session belongs to the carrier of the call it was created for (a returning caller's second call and an
    agent leg join their customer's session and count there).
    """
    mode_of_call = {result.call_sid: outcome.carrier for outcome in outcomes for result in outcome.results}
    lines = ["per carrier:      calls  created  ended  leaked  double-ended  dead-air  errors"]
    for carrier in carriers:
        mine = [o for o in outcomes if o.carrier == carrier]
        owned = [s for s in sessions if mode_of_call.get(call_of(s)) == carrier]
        lines.append(f"  {carrier:<14} {len(mine):>6} {len(owned):>8} "
                     f"{sum(s['status'] == 'ended' for s in owned):>6} "
                     f"{sum(s['status'] != 'ended' for s in owned):>7} {sum(s['end_calls'] > 1 for s in owned):>13} "
                     f"{sum(o.dead_air for o in mine):>9} {sum(bool(o.error) for o in mine):>7}")
    unowned = [s for s in sessions if call_of(s) not in mode_of_call]
    if unowned:
        lines.append(f"  (sessions of no placed call: {len(unowned)})")
    return lines


def agent_leg_lines(outcomes: list[Any], sessions: list[dict[str, Any]], carriers: Iterable[str]) -> list[str]:
    """Per carrier: of the ``agent`` calls, how many sessions got a second stream (the agent's leg) and agent audio.

    The run's agent numbers must be ones the bridge dials: a refused number leaves these at 0.
    """
    session_of_call = {call_of(s): s for s in sessions}
    lines = ["agent calls:      calls  2nd stream  agent audio"]
    for carrier in carriers:
        mine = [result for o in outcomes if o.carrier == carrier and o.scenario == "agent" for result in o.results]
        seen = [session_of_call[r.call_sid] for r in mine if r.call_sid in session_of_call]
        lines.append(f"  {carrier:<14} {len(mine):>6} {sum(s['connections_total'] >= 2 for s in seen):>11} "
                     f"{sum('agent' in s.get('audio_input_messages', {}) for s in seen):>12}")
    return lines


def redis_view(redis: RedisDeployment, session_ids: list[str]) -> dict[str, object]:
    """What the bridge's Redis says about some sessions (for --verbose)."""
    keys = RedisKeys("chaos")
    client = redis.client(decode_responses=True)
    view: dict[str, object] = {}
    for session_id in session_ids:
        record = client.hgetall(keys.session(session_id))
        shard = keys.shard_of(session_id)
        legs = {name: client.hgetall(keys.leg(session_id, *name[4:].split(":", 1))) for name in record
                if name.startswith("leg:")}
        view[session_id] = {"session": record, "legs": legs, "deadline": client.zscore(keys.deadlines(shard), session_id),
                            "heartbeats": {n: client.zscore(keys.heartbeats(shard), n[4:]) for n in legs},
                            "now": time.time()}
    return view
