"""``python -m app.devtools.forward_cost [--callgrind]`` (long: workload, child runner and report run as one file):
what forwarding live transcripts costs the relay, in instructions (a figure load cannot move) or CPU time.

Issue 16 asks that forwarding Kallglot's transcript lines to the live console cost ≤ 5 % extra relay CPU. The load
benchmark (``python -m app.devtools.loadtest --transcripts all``) measures that on a real gunicorn worker, but on a
shared machine its run-to-run noise is larger than 5 %. This runs a fixed in-process workload instead: N calls × M
seconds through the production relay core — :class:`~app.relay.core.MediaRelay` (uplink and downlink, each call's
downlink in its own greenlet, ``gevent`` monkey-patched as under gunicorn), the Twilio codec,
:class:`~app.kallglot.stream.KallglotStream` with :func:`~app.kallglot.stream_protocol.parse_server_message`, and
for forwarded lines :func:`app.relay.bridge.transcript_forwarder` → :class:`~app.calls.events.EventForwarder`,
whose writer greenlet pipelines them into a real ``redis-server`` (started here, like the test suite's). Only the
two WebSocket connections are recorded instead of live: each call's carrier socket hands the relay the same Twilio
``media`` frames (50 a second) and its Kallglot socket the same messages (10 ``audio.output`` a second — the
emulator's echo of 100 ms chunks — plus, in two arms, a ``transcript.final`` with translation and the next
``transcript.partial`` each second, as the emulator says them). Three arms, same frames:

- ``forwarded``: transcript lines received, parsed and forwarded (``LIVE_TRANSCRIPTS=on``, the default);
- ``not-forwarded``: the same lines received and parsed, no hook (``LIVE_TRANSCRIPTS=off``);
- ``none``: Kallglot says no transcript lines.

Each arm runs in a fresh child (``PYTHONHASHSEED=0``) for ``--warm`` and for ``--warm`` + ``--seconds`` simulated
seconds; the difference is the steady cost without start-up, imports and first use. ``--callgrind`` counts the
child's instructions under ``valgrind --tool=callgrind`` (Ir, all its greenlets, not the Redis server); without
it the figure is CPU time (``time.process_time``), which load does move.

Left out: WebSocket framing and socket system calls of both connections and the gevent hub's waits on them (the
same in every arm, most of a real worker's CPU: README, Capacity). The percentages are of the relay *core* and
overstate the share of a whole worker; the per-line cost is the figure to carry over.
"""
from __future__ import annotations

if __name__ == "__main__":  # the workload runs as under gunicorn's gevent worker: patch before anything imports
    from gevent import monkey

    monkey.patch_all()

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simple_websocket import ConnectionClosed

ARMS = ("forwarded", "not-forwarded", "none")
#: Twilio sends one 20 ms media frame (160 μ-law bytes) at a time; the relay sends 100 ms chunks to Kallglot.
FRAMES_PER_SECOND, FRAME_BYTES, CHUNK_MS = 50, 160, 100
STREAM_SID = "MZ" + "0" * 32
#: The recorded audio: a fixed byte pattern (each frame a different slice of it), so every run sends the same bytes.
PATTERN = bytes(range(256)) * 8
#: No ping during the run (a timer would make the count depend on how long the run took).
NO_PING_SECONDS = 3600.0
#: Bound on every wait of the workload (a stuck run fails instead of hanging).
STEP_TIMEOUT_SECONDS = 600.0


class SecondClock:
    """Each call's two recorded sockets stop here at each simulated second's end; the driver lets the writer drain."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._cond = threading.Condition()
        self.second = 0

    def arrive(self, second: int) -> None:
        """A socket has handed over all of ``second``: wait until the driver starts the next one."""
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self.second > second, timeout=STEP_TIMEOUT_SECONDS):
                raise TimeoutError(f"second {second} never ended")

    def wait_all(self) -> None:
        """Driver: wait until every socket arrived at the end of the current second."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._arrived >= self._parties, timeout=STEP_TIMEOUT_SECONDS):
                raise TimeoutError(f"only {self._arrived} of {self._parties} sockets reached the second's end")
            self._arrived = 0

    def advance(self) -> None:
        """Driver: start the next second."""
        with self._cond:
            self.second += 1
            self._cond.notify_all()


class RecordedSocket:
    """One side of a call: hands the relay a fixed script of frames, one simulated second at a time.

    Serves as the carrier socket (``receive``/``send``/``close``) and, wrapped in a real
    :class:`~app.kallglot.stream.KallglotStream`, as the Kallglot stream socket (``send_text``/``close_gracefully``).
    What the relay sends is counted, not kept.
    """

    def __init__(self, seconds: list[list[str]], clock: SecondClock, last: str | None = None) -> None:
        self._seconds = seconds
        self._clock = clock
        self._last = last  # the carrier's "stop" after the last second; the Kallglot side has none
        self._second = 0
        self._next = 0
        self.connected = True
        self.sent = 0
        self._closed = threading.Event()

    def receive(self, timeout: float | None = None) -> str | None:
        """The next recorded frame; at a second's end, wait for the next second (not ``timeout``)."""
        while self._second < len(self._seconds):
            frames = self._seconds[self._second]
            if self._next < len(frames):
                self._next += 1
                return frames[self._next - 1]
            self._clock.arrive(self._second)
            self._second, self._next = self._second + 1, 0
        if self._last is not None:
            last, self._last = self._last, None
            return last
        # Script done: block until the relay closes us, then report the close as a real socket would. (Not a
        # timed poll: its count of wake-ups would follow the machine's load, and so would the instructions.)
        if not self._closed.wait(STEP_TIMEOUT_SECONDS):
            raise TimeoutError("the relay never closed the socket")
        raise ConnectionClosed(1000, "closed by the relay")

    def send(self, data: str | bytes) -> None:
        """Carrier side: the relay's ``media`` frame (counted)."""
        self.sent += 1

    send_text = send  # Kallglot side: the relay's ``audio.input`` (counted)

    def close(self, reason: int | None = None, message: str | None = None, **_: Any) -> None:
        """Closed by the relay (the carrier side's ``close``, the Kallglot side's ``close_gracefully``)."""
        self.connected = False
        self._closed.set()

    close_gracefully = close


def carrier_script(call: int, seconds: int) -> list[list[str]]:
    """Twilio ``media`` frames of one call: 50 a second, 160 μ-law bytes each (a fixed pattern per call).

    Every second is the same 50 frame strings (the codec reads neither ``sequenceNumber`` nor ``timestamp``):
    building the script then costs the same however many seconds it has, so it cancels out of long − short.
    """
    frames = []
    for n in range(FRAMES_PER_SECOND):
        start = (call + n) % 256
        payload = base64.b64encode(PATTERN[start:start + FRAME_BYTES]).decode()
        frames.append(json.dumps({"event": "media", "sequenceNumber": str(n + 2), "streamSid": STREAM_SID,
                                  "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                                            "payload": payload}}))
    return [frames] * seconds


def kallglot_script(call: int, seconds: int, transcripts: bool, speaker: str = "customer") -> list[list[str]]:
    """Kallglot's messages to one call: the emulator's echo of each 100 ms chunk as ``audio.output`` (the same
    ten strings every second, as in :func:`carrier_script`), and (when ``transcripts``) the emulator's
    ``transcript.final`` with translation and next ``transcript.partial`` each second (its own text each second)."""
    audio = []
    for n in range(1000 // CHUNK_MS):
        start = (call + n) % 256
        payload = base64.b64encode(PATTERN[start:start + FRAME_BYTES * 5]).decode()
        audio.append(json.dumps({"type": "audio.output", "sequence": n + 1, "audio": {
            "encoding": "mulaw", "sample_rate_hz": 8000, "payload": payload}}))
    if not transcripts:
        return [audio] * seconds
    final = ('{"type":"transcript.final","id":"utt_%s_%d","speaker":"%s","language":"en",'
             '"text":"(emulated utterance %d)","translation":{"language":"es","text":"(traducci\\u00f3n %d)"}}')
    partial = ('{"type":"transcript.partial","id":"utt_%s_%d","speaker":"%s","language":"en",'
               '"text":"(emulated utter\\u2026 %d"}')
    return [audio + [final % (speaker, s, speaker, s, s), partial % (speaker, s + 1, speaker, s + 1)]
            for s in range(seconds)]


@dataclass(frozen=True)
class Workload:
    """What one child run did: CPU seconds of the workload, lines forwarded, what the writer did."""

    cpu_seconds: float
    lines_received: int
    forwarded: int
    written: int
    dropped: int
    batches: int
    in_redis: int
    frames_to_carrier: int
    chunks_to_kallglot: int


def run_workload(arm: str, calls: int, seconds: int, redis_url: str) -> Workload:
    """Relay ``calls`` recorded calls for ``seconds`` simulated seconds through the production relay core."""
    import redis

    from app.calls.events import EventForwarder, SessionEventLog
    from app.carriers.twilio.codec import TwilioMediaCodec
    from app.kallglot.stream import KallglotStream
    from app.redis_keys import RedisKeys
    from app.relay.bridge import transcript_forwarder
    from app.relay.core import MediaRelay, RelayEnd

    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys(f"forward-cost-{uuid.uuid4().hex[:12]}")  # this run's streams only (the Redis is shared)
    forwarder = EventForwarder(SessionEventLog(client, keys))
    clock = SecondClock(parties=2 * calls)
    relays, carriers, streams = [], [], []
    for call in range(calls):
        codec = TwilioMediaCodec()
        codec.parse(json.dumps({"event": "start", "streamSid": STREAM_SID,
                                "start": {"callSid": f"CA{call:032d}", "streamSid": STREAM_SID}}))
        carrier = RecordedSocket(carrier_script(call, seconds), clock, last=json.dumps(
            {"event": "stop", "streamSid": STREAM_SID, "stop": {"callSid": f"CA{call:032d}"}}))
        kallglot = RecordedSocket(kallglot_script(call, seconds, transcripts=arm != "none"), clock)
        hook = transcript_forwarder(forwarder, f"sess_{call}", "customer") if arm == "forwarded" else None
        relays.append(MediaRelay(carrier, codec, KallglotStream(kallglot),  # type: ignore[arg-type]
                                 speaker="customer", chunk_ms=CHUNK_MS, context=f"forward-cost call={call}",
                                 ping_interval_seconds=NO_PING_SECONDS, on_transcript=hook))
        carriers.append(carrier)
        streams.append(kallglot)
    ends: list[RelayEnd] = []
    started = time.process_time()
    threads = [threading.Thread(target=lambda r=relay: ends.append(r.run()), name=f"relay-{n}", daemon=True)
               for n, relay in enumerate(relays)]
    for thread in threads:
        thread.start()
    for _ in range(seconds):
        clock.wait_all()
        if not forwarder.flush(timeout=STEP_TIMEOUT_SECONDS):  # the writer drains this second's lines
            raise TimeoutError("the forwarder's writer did not drain")
        clock.advance()
    for thread in threads:
        thread.join(STEP_TIMEOUT_SECONDS)
    cpu = time.process_time() - started
    if len(ends) != calls or any(end is not RelayEnd.CARRIER_STOP for end in ends):
        raise RuntimeError(f"the relays did not all end with the carrier's stop: {ends}")
    lines = (2 * calls * seconds) if arm != "none" else 0
    in_redis = sum(int(client.xlen(keys.session_live_events(f"sess_{call}"))) for call in range(calls))
    return Workload(cpu_seconds=cpu, lines_received=lines, forwarded=lines if arm == "forwarded" else 0,
                    written=forwarder.written, dropped=forwarder.dropped, batches=forwarder.batches,
                    in_redis=in_redis, frames_to_carrier=sum(c.sent for c in carriers),
                    chunks_to_kallglot=sum(s.sent for s in streams))


@dataclass(frozen=True)
class ArmRun:
    """One child run: its workload figures and (under callgrind) the instructions the whole process executed."""

    workload: Workload
    instructions: int | None


def run_child(arm: str, calls: int, seconds: int, redis_url: str, callgrind: bool, workdir: Path) -> ArmRun:
    """Run one arm's workload in a fresh process (under callgrind when asked) and read its figures."""
    out = workdir / f"callgrind.{arm}.{seconds}.out"
    command = [sys.executable, "-m", "app.devtools.forward_cost", "--child", arm, "--calls", str(calls),
               "--seconds", str(seconds), "--redis-url", redis_url]
    if callgrind:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
                   "--compress-strings=no", *command]
    env = {**os.environ, "PYTHONHASHSEED": "0", "LOG_LEVEL": "WARNING"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3 * STEP_TIMEOUT_SECONDS)
    found = re.search(r"^WORKLOAD (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{arm} ({seconds} s) failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    instructions = None
    if callgrind:
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.MULTILINE)
        instructions = int(summary.group(1)) if summary else None
    return ArmRun(Workload(**json.loads(found.group(1))), instructions)


@dataclass(frozen=True)
class ArmFigure:
    """An arm's steady cost: the long run minus the short one."""

    arm: str
    cost: float  # instructions, or CPU seconds
    lines: int
    long: Workload


def measure(calls: int, seconds: int, warm: int, callgrind: bool, rounds: int,
            arms: tuple[str, ...] = ARMS) -> Iterator[list[ArmFigure]]:
    """Each round: every arm, short and long, in fresh processes; yields the round's figures."""
    from app.devtools.localstack import run_redis

    with run_redis() as redis_url, tempfile.TemporaryDirectory(prefix="forward-cost-") as tmp:
        for round_no in range(rounds):
            figures = []
            shift = round_no % len(arms)
            for arm in arms[shift:] + arms[:shift]:  # the order rotates: a neighbour's burst hits each arm
                short = run_child(arm, calls, warm, redis_url, callgrind, Path(tmp))
                long = run_child(arm, calls, warm + seconds, redis_url, callgrind, Path(tmp))
                if callgrind:
                    if short.instructions is None or long.instructions is None:
                        raise RuntimeError("callgrind wrote no instruction count")
                    cost: float = long.instructions - short.instructions
                else:
                    cost = long.workload.cpu_seconds - short.workload.cpu_seconds
                if long.workload.dropped or long.workload.written != long.workload.forwarded \
                        or long.workload.in_redis != long.workload.forwarded:
                    raise RuntimeError(f"{arm}: not every forwarded line reached Redis: {long.workload}")
                figures.append(ArmFigure(arm, cost, long.workload.lines_received - short.workload.lines_received,
                                         long.workload))
            yield sorted(figures, key=lambda f: ARMS.index(f.arm))


def report(figures: list[ArmFigure], calls: int, seconds: int, callgrind: bool) -> list[str]:
    """The round's lines: each arm's cost per call-second, and the differences the issue asks about."""
    by = {f.arm: f for f in figures}
    unit = "instructions" if callgrind else "CPU µs"
    scale = 1.0 if callgrind else 1e6
    call_seconds = calls * seconds
    lines = [f"  {f.arm:>13}: {f.cost * scale / call_seconds:12,.0f} {unit} per call-second "
             f"(writer: {f.long.batches} pipelines for {f.long.written} lines)" for f in figures]
    if set(by) != set(ARMS):
        return lines
    fwd, parsed, none = by["forwarded"], by["not-forwarded"], by["none"]
    lines_per_s = fwd.lines
    lines.append(f"  forwarding (forwarded − not-forwarded): {(fwd.cost / parsed.cost - 1) * 100:+.2f} % of the relay "
                 f"core; {(fwd.cost - parsed.cost) * scale / lines_per_s:,.0f} {unit} per line")
    lines.append(f"  receiving + parsing the lines (not-forwarded − none): {(parsed.cost / none.cost - 1) * 100:+.2f} %; "
                 f"{(parsed.cost - none.cost) * scale / lines_per_s:,.0f} {unit} per line")
    lines.append(f"  live transcripts in all (forwarded − none): {(fwd.cost / none.cost - 1) * 100:+.2f} %")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; as the parent, run every arm and print the figures; as a child, run one workload."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.forward_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="concurrent recorded calls")
    parser.add_argument("--seconds", type=int, default=10, help="simulated seconds measured (after --warm)")
    parser.add_argument("--warm", type=int, default=2, help="simulated seconds of the short run subtracted")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three arms (order rotated)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind's callgrind")
    parser.add_argument("--arms", default=",".join(ARMS), help="arms to run (comma-separated; all three: differences)")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        workload = run_workload(args.child, args.calls, args.seconds, args.redis_url)
        print("WORKLOAD " + json.dumps(workload.__dict__), flush=True)
        return 0
    if args.callgrind and not shutil.which("valgrind"):
        print("--callgrind needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{args.calls} calls × {args.seconds} s (minus a {args.warm} s run), per call-second: "
          f"{FRAMES_PER_SECOND} Twilio frames in, {1000 // CHUNK_MS} audio.input out, {1000 // CHUNK_MS} audio.output "
          f"in, 2 transcript lines (final + partial) in the arms with lines; "
          f"{'instructions (callgrind)' if args.callgrind else 'CPU time'}; load average {load} at the start",
          flush=True)
    arms = tuple(arm for arm in ARMS if arm in args.arms.split(","))
    for n, figures in enumerate(measure(args.calls, args.seconds, args.warm, args.callgrind, args.rounds, arms), 1):
        print(f"round {n} (load average {Path('/proc/loadavg').read_text().split()[0]}):", flush=True)
        for line in report(figures, args.calls, args.seconds, args.callgrind):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
