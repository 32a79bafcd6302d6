"""The silence a caller hears when the relay carrying their stream dies, per carrier (issue 12).

``python -m app.devtools.restore_gap --kills 5`` starts the chaos run's private stack (:func:`app.devtools.chaos.stack`:
redis-server, the Kallglot emulator, the fake Twilio REST API, the fake Telnyx and one bridge instance under
gunicorn + gevent; here 1 instance x 2 workers) and, for each carrier (Twilio ``<Connect action>``, TeXML
``<Redirect>``, Call Control ``start_streaming`` again), places ``--kills`` calls one after another. Each caller
talks without pause; once their relay has been up for ``--kill-after`` seconds (Kallglot's echo is flowing back),
the worker carrying it gets SIGKILL. The caller keeps talking on the restored stream. Per call it records, from
the caller's side (wall-clock times of every returned media message and of each media socket opened):

- **silence**: the last audio heard before the restored stream opened (so at or just after the kill: what the
  dying relay had already sent) -> the first audio heard on the restored stream;
- **to restore**: the kill -> the restored media stream's socket opened.

It prints p50 and max of both per carrier, the calls that were not restored, and the load average at start and
end (the machine is shared; every figure means little without it). Loopback only, bounded, stops by itself.
"""
from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import requests

from app.devtools.chaos import ACCOUNT_SID, AUTH_TOKEN, NUMBER, stack
from app.devtools.chaos_report import load_average, pid_of_relay
from app.devtools.chaos_telnyx import CALL_CONTROL, MODES, TEXML, TWILIO, parse_modes
from app.devtools.localstack import RunningServer
from app.devtools.simulator.telnyx import TelnyxSigner, TexmlCallSimulator, new_call_control_id
from app.devtools.simulator.twilio import TwilioCallSimulator
from app.devtools.simulator.twilio_stream import new_sid

#: μ-law bytes per second (8 kHz).
BYTES_PER_SECOND = 8000
#: How long to wait for a call's relay to start, and for a call to finish, before counting it as failed.
RELAY_START_TIMEOUT_SECONDS, CALL_TIMEOUT_SECONDS = 20.0, 60.0
#: After a kill, how long gunicorn may take to boot the replacement worker before the next call.
RESPAWN_TIMEOUT_SECONDS = 60.0


@dataclass
class Gap:
    """One call whose relay's worker was killed, as its caller experienced it (wall-clock seconds)."""

    carrier: str
    call_id: str
    killed_at: float = 0.0
    heard_at: list[float] = field(default_factory=list)
    streams_opened_at: list[float] = field(default_factory=list)
    error: str = ""
    #: The simulator's own timeline of the call (Twilio), for ``--timeline``.
    notes: list[str] = field(default_factory=list)

    @property
    def silence(self) -> float | None:
        """Last audio heard before the restored stream opened -> first audio heard on it (None: not restored, or
        nothing heard on it). Audio the dying relay had already sent still arrives just after the kill: that is
        not the end of the silence."""
        restored = [t for t in self.streams_opened_at if t > self.killed_at]
        if not restored:
            return None
        before = [t for t in self.heard_at if t < min(restored)]
        after = [t for t in self.heard_at if t >= min(restored)]
        return min(after) - max(before) if before and after else None

    @property
    def to_restore(self) -> float | None:
        """The kill -> the restored stream's socket opened (None: no stream opened after the kill)."""
        after = [t for t in self.streams_opened_at if t > self.killed_at]
        return min(after) - self.killed_at if after else None


def _caller_audio(rng: random.Random, seconds: float) -> bytes:
    # Not silence (0xFF): the emulator echoes whatever it gets, and a run of one byte value is easy to miss.
    return bytes(rng.randrange(0, 0x7F) for _ in range(int(seconds * BYTES_PER_SECOND)))


class RestoreGapRun:
    """Places calls on the running stack and kills each one's relay worker mid-talk."""

    def __init__(self, bridge: RunningServer, fake_telnyx: RunningServer, signer: TelnyxSigner, *,
                 kill_after: float, talk_seconds: float, seed: int) -> None:
        self.bridge, self.fake_telnyx, self.signer = bridge, fake_telnyx, signer
        self.kill_after, self.talk_seconds = kill_after, talk_seconds
        self.rng = random.Random(seed)

    def kill_relay(self, gap: Gap) -> None:
        """Once ``gap``'s relay has run ``kill_after`` seconds, SIGKILL its worker and note when."""
        deadline = time.monotonic() + RELAY_START_TIMEOUT_SECONDS
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = pid_of_relay(self.bridge.log(), gap.call_id)
            if pid is None:
                time.sleep(0.05)
        if pid is None:
            gap.error = "the relay never started"
            return
        time.sleep(self.kill_after)
        gap.killed_at = time.time()
        os.kill(pid, signal.SIGKILL)

    def _with_kill(self, gap: Gap, place: Callable[[], None]) -> Gap:
        boots = self.bridge.log().count("Booting worker")
        caller = threading.Thread(target=place, name=f"caller-{gap.call_id}", daemon=True)
        caller.start()
        self.kill_relay(gap)
        caller.join(CALL_TIMEOUT_SECONDS)
        if caller.is_alive():
            gap.error = gap.error or f"the call was still up after {CALL_TIMEOUT_SECONDS:.0f}s"
        if gap.killed_at:  # the next call needs both workers again (this one carries the restored stream)
            self._wait_for_replacement(boots)
        return gap

    def all_workers_serving(self, workers: int = 2) -> None:
        """Until each of the instance's workers has served a request (the stack counts as ready when one does)."""
        deadline = time.monotonic() + RESPAWN_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            log = self.bridge.log().splitlines()
            pids = [line.rsplit("pid:", 1)[-1].strip().split('"')[0].strip()
                    for line in log if "Booting worker with pid" in line][-workers:]
            if len(pids) == workers and all(any(f'"pid":{pid}' in line and "gunicorn.access" in line for line in log)
                                            for pid in pids):
                return
            try:
                requests.get(self.bridge.url + "/healthz", timeout=5)
            except requests.RequestException:
                pass
            time.sleep(0.1)

    def _wait_for_replacement(self, boots: int) -> None:
        """Until the worker gunicorn forked after the kill serves requests: "Booting worker" is logged at the fork,
        before the app is imported (seconds on a busy machine), and a call whose restore lands on the one worker
        left while that is killed next would time out — the harness's fault, not the product's."""
        deadline = time.monotonic() + RESPAWN_TIMEOUT_SECONDS
        new_pid = ""
        while not new_pid and time.monotonic() < deadline:
            booted = [line for line in self.bridge.log().splitlines() if "Booting worker with pid" in line]
            if len(booted) > boots:
                new_pid = booted[-1].rsplit("pid:", 1)[-1].strip().split('"')[0].strip()
            else:
                time.sleep(0.2)
        while new_pid and time.monotonic() < deadline:
            if any(f'"pid":{new_pid}' in line and "Booting worker" not in line
                   for line in self.bridge.log().splitlines()):
                return
            try:  # an access-log line of the new worker's (its pid) says it is serving
                requests.get(self.bridge.url + "/healthz", timeout=5)
            except requests.RequestException:
                pass
            time.sleep(0.1)

    def twilio(self) -> Gap:
        """A Twilio caller: ``<Connect action>`` answers a new ``<Connect><Stream>`` to the same session."""
        gap = Gap(TWILIO, new_sid("CA"))
        sim = TwilioCallSimulator(self.bridge.url, AUTH_TOKEN, public_url=self.bridge.url, account_sid=ACCOUNT_SID,
                                  timeout=15)
        talk, more = _caller_audio(self.rng, self.talk_seconds), _caller_audio(self.rng, 2.0)

        def place() -> None:
            try:
                result = sim.place_call(NUMBER, self._caller(), talk, pace=True, call_sid=gap.call_id,
                                        listen_seconds=1.0, restore_audio=more,
                                        fallback_url=self.bridge.url + "/twilio/fallback")
                gap.heard_at, gap.streams_opened_at = list(result.heard_at), list(result.stream_opened_at)
                gap.notes = [f"t+{t:.3f} ({result.started_at + t:.3f}) {event}" for t, event in result.timeline]
            except Exception as exc:  # reported with the figures, never hidden
                gap.error = f"{type(exc).__name__}: {exc}"
        return self._with_kill(gap, place)

    def texml(self) -> Gap:
        """A TeXML caller: the ``<Redirect>`` after ``<Connect>`` restores the stream."""
        gap = Gap(TEXML, new_call_control_id())
        sim = TexmlCallSimulator(self.bridge.url, self.signer, public_url=self.bridge.url, timeout=15)
        talk, more = _caller_audio(self.rng, self.talk_seconds), _caller_audio(self.rng, 2.0)

        def place() -> None:
            try:
                result = sim.place_call(NUMBER, self._caller(), talk, call_sid=gap.call_id, pace=True,
                                        listen_seconds=1.0, restore_audio=more,
                                        fallback_url=self.bridge.url + "/telnyx/texml/fallback")
                gap.heard_at = [t for leg in result.legs for t in leg.heard_at]
                gap.streams_opened_at = [leg.opened_at for leg in result.legs]
            except Exception as exc:  # reported with the figures, never hidden
                gap.error = f"{type(exc).__name__}: {exc}"
        return self._with_kill(gap, place)

    def call_control(self) -> Gap:
        """A Call Control caller: ``streaming.stopped`` -> ``start_streaming`` again into the same session."""
        talk, more = _caller_audio(self.rng, self.talk_seconds), _caller_audio(self.rng, 2.0)
        body = {"to": NUMBER, "from": self._caller(), "payload": base64.b64encode(talk).decode(),
                "restore_payload": base64.b64encode(more).decode(), "pace": True, "listen_seconds": 1.0,
                "webhook_url": self.bridge.url + "/telnyx/call-control"}
        call_id = str(requests.post(self.fake_telnyx.url + "/_fake/calls", json=body, timeout=15)
                      .json()["call_control_id"])
        gap = Gap(CALL_CONTROL, call_id)

        def wait_for_the_end() -> None:
            deadline = time.monotonic() + CALL_TIMEOUT_SECONDS
            view: dict[str, Any] = {}
            while time.monotonic() < deadline:
                view = requests.get(f"{self.fake_telnyx.url}/_fake/calls/{call_id}", timeout=15).json()
                if view.get("hung_up"):
                    break
                time.sleep(0.2)
            else:
                gap.error = f"still up after {CALL_TIMEOUT_SECONDS:.0f}s (commands: " \
                            f"{[c['action'] for c in view.get('commands', [])]})"
            gap.heard_at = list(view.get("heard_at", []))
            gap.streams_opened_at = list(view.get("stream_opened_at", []))
        return self._with_kill(gap, wait_for_the_end)

    def _caller(self) -> str:
        return f"+1555{self.rng.randrange(10**6, 10**7)}"


def summary(gaps: list[Gap]) -> list[str]:
    """Per carrier: p50 and max of the silence and of the time to the restore, and the calls not restored."""
    lines = []
    for carrier in dict.fromkeys(g.carrier for g in gaps):
        mine = [g for g in gaps if g.carrier == carrier]
        silences = [s for g in mine if (s := g.silence) is not None]
        restores = [r for g in mine if (r := g.to_restore) is not None]
        failed = [g for g in mine if g.error or g.silence is None]
        lines.append(f"{carrier:13s} kills {len(mine)}, restored and heard again {len(silences)}: "
                     f"silence p50 {_fmt(silences, statistics.median)} max {_fmt(silences, max)}; "
                     f"kill -> restored stream p50 {_fmt(restores, statistics.median)} max {_fmt(restores, max)}")
        lines += [f"    not heard again: {g.call_id} {g.error or 'no audio after the kill'}" for g in failed]
    return lines


def _fmt(values: list[float], how: Callable[[list[float]], float]) -> str:
    return f"{how(values):.2f} s" if values else "n/a"


def main(argv: list[str] | None = None) -> int:
    """Measure the silence after a killed relay, per carrier, and print it."""
    parser = argparse.ArgumentParser(description="The caller's silence after their relay's worker is killed.")
    parser.add_argument("--kills", type=int, default=5, help="calls (and worker kills) per carrier")
    parser.add_argument("--carriers", type=parse_modes, default=MODES,
                        help=f"comma-separated (default: {','.join(MODES)})")
    parser.add_argument("--kill-after", type=float, default=1.0,
                        help="seconds after the relay started (the caller talking, the echo flowing)")
    parser.add_argument("--talk", type=float, default=4.0, help="seconds the caller talks on the first stream")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--timeline", action="store_true", help="print the bridge's log lines naming each call")
    args = parser.parse_args(argv)
    started, load_at_start = time.monotonic(), load_average()
    rng = random.Random(args.seed)
    signer = TelnyxSigner(nacl.signing.SigningKey(bytes(rng.randrange(256) for _ in range(32))))
    gaps: list[Gap] = []
    with stack(2, signer, instances=1) as (bridges, _emulator, _redis, fake_telnyx):
        run = RestoreGapRun(bridges[0], fake_telnyx, signer, kill_after=args.kill_after, talk_seconds=args.talk,
                            seed=args.seed)
        place = {TWILIO: run.twilio, TEXML: run.texml, CALL_CONTROL: run.call_control}
        run.all_workers_serving()
        for _ in range(args.kills):
            for carrier in args.carriers:
                gap = place[carrier]()
                gaps.append(gap)
                print(f"  {carrier} {gap.call_id}: silence "
                      f"{'n/a' if gap.silence is None else f'{gap.silence:.2f} s'}, to restore "
                      f"{'n/a' if gap.to_restore is None else f'{gap.to_restore:.2f} s'} {gap.error}", flush=True)
                if args.timeline:
                    print(f"    killed at {gap.killed_at:.3f}; streams opened at "
                          f"{[round(t, 3) for t in gap.streams_opened_at]}")
                    print("\n".join(f"    {line[:300]}" for line in bridges[0].log().splitlines()
                                    if gap.call_id in line or "Worker (pid" in line or "Booting worker" in line))
                    for note in gap.notes:
                        print(f"    sim: {note[:200]}")
    print(f"restore gap: {args.kills} kills per carrier, 1 instance x 2 workers, kill {args.kill_after:.1f} s after "
          f"the relay started, seed {args.seed}, {time.monotonic() - started:.0f}s in all")
    print(f"load average (1/5/15 min): {load_at_start} at start, {load_average()} at end")
    print("\n".join(summary(gaps)))
    return 0 if all(g.silence is not None and not g.error for g in gaps) else 1


if __name__ == "__main__":
    sys.exit(main())
