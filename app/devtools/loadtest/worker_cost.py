"""``python -m app.devtools.loadtest.worker_cost``: what forwarding live transcripts costs a WHOLE bridge worker, in
instructions (issue 16: "≤ 5 % extra relay CPU").

:mod:`app.devtools.forward_cost` counts the relay *core* only (its two sockets are recorded), which leaves out
WebSocket framing, socket system calls, the gevent hub, the heartbeat and gunicorn's own loop: its percentage is of
a smaller total than a worker's. This counts the real thing: the load benchmark's stack (a private Redis, the
Kallglot emulator, the Node generator placing signed Twilio calls with 50 media frames a second each) against a
bridge started as in production (gunicorn, ONE gevent worker) under ``valgrind --tool=callgrind``, with few calls
(``--calls``, default 3) so that the instrumented worker keeps real time (its CPU share under valgrind is printed:
well under 100 % of a core means it kept up, and every frame sent is echoed).

Per arm, two fresh bridges, a short and a long one, each: start-up, a warm-up step (``--warm`` seconds, calls
placed and hung up: imports, pools, the Lua script, the writer greenlet), the measured step (``--short`` seconds,
or ``--short`` + ``--steady``), shut down; callgrind writes the worker's total when it exits. The long run minus
the short one is ``--steady`` seconds of N live calls, without start-up, warm-up, ramp and hang-up. (Zeroing the
counters at the window's edges instead would be simpler, but ``callgrind_control`` cannot reach a forked
gunicorn worker.) The bridge is polled with ONE long request while it starts: repeated polls that time out queue
up and are all answered at start-up, a number that follows the machine's load, and so would the count.
Arms as in ``forward_cost`` and the load benchmark:

- ``forwarded``: the emulator says a ``transcript.final`` (with translation) and the next ``transcript.partial``
  each second per call, and the bridge forwards them to the live console's Redis Stream (``LIVE_TRANSCRIPTS=on``);
- ``not-forwarded``: the same lines, received and parsed, not forwarded (``LIVE_TRANSCRIPTS=off``);
- ``none``: the emulator says no lines.

The window is small against what it is subtracted from: each bridge runs ≈ 12 G instructions (start-up, warm-up),
so a start-up 0.3 % different between the short and the long bridge moves an arm by ≈ 1 M per call-second at
2 calls × 15 s — about what forwarding costs. Hence the default ``--steady 60`` and, for a figure, ``--rounds 3``
(README, Capacity, "Issue 16"). The count is not bit-exact like ``forward_cost``'s (real sockets: how many frames one wake-up reads, timers that
fire per wall-clock second), so ``--rounds`` repeats the arms (order rotated) and the spread is printed. At few
calls the writer's batches are small (about one line each), so the per-line cost here is an upper bound of what it
is at 200 calls (≈ 16 lines per batch). Needs valgrind (Debian: ``apt-get install valgrind``), node and Linux /proc.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from app.devtools.loadtest.__main__ import (EMULATOR_API_KEY, HERE, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, children,
                                            ensure_node_modules, sample)
from app.devtools.loadtest.arms import ARMS
from app.devtools.localstack import REPO_ROOT, RunningServer, free_port, run_gunicorn, run_redis

#: Transcript lines the emulator says per call-second (a final and the next partial).
LINES_PER_CALL_SECOND = 2
#: Bound on a step beyond its own seconds, and on a valgrinded bridge's start-up.
STEP_SLACK_SECONDS, START_TIMEOUT_SECONDS = 120.0, 900.0
#: How long the worker may take to stop under valgrind: killed (gunicorn's graceful timeout), it writes no count.
STOP_TIMEOUT_SECONDS = 180.0


@dataclass(frozen=True)
class ArmRun:
    """One measured step: instructions of the worker in the window, and what the generator saw."""

    arm: str
    instructions: int
    window_seconds: float
    calls_held: int
    frames_sent: int
    frames_lost: int
    cpu_share: float  # of one core, the instrumented worker, over the long run's measured step
    echo_p99_ms: float | None  # the generator's end-to-end echo time: it grows when the worker falls behind

    def per_call_second(self, calls: int) -> float:
        """Instructions per call-second of the window."""
        return self.instructions / (calls * self.window_seconds)


def callgrind_python(folder: Path) -> Path:
    """An executable that runs this interpreter under callgrind (gunicorn's master and its forked worker)."""
    wrapper = folder / "python-under-callgrind"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --dump-line=no --compress-strings=no "
                       f"--callgrind-out-file={folder}/callgrind.%p.out {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def total_instructions(folder: Path, pid: int) -> int:
    """The instructions callgrind counted for ``pid`` over its whole life (its dump at exit)."""
    text = (folder / f"callgrind.{pid}.out").read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no instruction count in callgrind's dump of pid {pid}")
    return int(found.group(1))


@contextlib.contextmanager
def bridge_under_callgrind(env: dict[str, str], port: int, folder: Path) -> Iterator[tuple[RunningServer, int]]:
    """gunicorn (one gevent worker) under callgrind; yields the server and its worker's pid, then stops it with
    SIGTERM and waits for the worker to exit (callgrind writes its count then; a worker killed after gunicorn's
    graceful timeout would write none, hence a long one)."""
    log_path = folder / f"bridge-{port}.log"
    command = [str(callgrind_python(folder)), "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}",
               "--timeout", "0", "--graceful-timeout", str(int(STOP_TIMEOUT_SECONDS)), "app:create_app()"]
    with open(log_path, "wb") as log_file:
        master = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                  stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(url=f"http://127.0.0.1:{port}", port=port, process=master, log_path=log_path)
    worker = 0
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not worker:
            if master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bridge did not start: {server.log()[-3000:]}")
            time.sleep(0.5)
            found = children(master.pid)
            worker = found[0] if found else 0
        # One request, waiting as long as start-up takes (see the module's docstring).
        requests.get(server.url + "/healthz", timeout=START_TIMEOUT_SECONDS).raise_for_status()
        yield server, worker
    finally:
        master.terminate()
        try:
            master.wait(timeout=2 * STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(timeout=10)


def generator_step(bridge: RunningServer, emulator: RunningServer, calls: int, settle: float, steady: float,
                   on_line: dict[str, object]) -> dict[str, object]:
    """Place ``calls`` calls with the load benchmark's generator; call ``on_line[marker]()`` at its markers."""
    config = {"baseUrl": bridge.url, "authToken": TWILIO_AUTH_TOKEN, "accountSid": TWILIO_ACCOUNT_SID,
              "to": "+15005550006", "calls": calls, "rate": 10, "settleSeconds": settle, "steadySeconds": steady,
              "emulatorUrl": emulator.url, "emulatorApiKey": EMULATOR_API_KEY, "probes": 0, "chunkMs": 100}
    generator = subprocess.Popen(["node", str(HERE / "generator.mjs"), json.dumps(config)], stdout=subprocess.PIPE,
                                 text=True, cwd=HERE)
    result: dict[str, object] = {}
    assert generator.stdout is not None
    try:
        for line in generator.stdout:
            line = line.strip()
            if line in on_line:
                on_line[line]()  # type: ignore[operator]
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        generator.wait(timeout=STEP_SLACK_SECONDS)
    finally:
        if generator.poll() is None:
            generator.kill()
    if "error" in result or "held" not in result:
        raise RuntimeError(f"generator failed: {result}")
    return result


def run_bridge(arm: str, args: argparse.Namespace, redis_url: str, emulator: RunningServer, folder: Path,
               measured_seconds: float) -> tuple[int, dict[str, object]]:
    """One bridge's life for ``arm``: start, warm-up step, measured step; its worker's instructions and the
    generator's figures of the measured step."""
    _, forwards = ARMS[arm]
    port = free_port()
    env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": EMULATOR_API_KEY, "REDIS_URL": redis_url,
           "REDIS_NAMESPACE": f"worker-cost-{os.getpid()}-{arm}-{port}", "PUBLIC_URL": f"http://127.0.0.1:{port}",
           "SECRET_KEY": "worker-cost-secret-key-0123456789", "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID,
           "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN, "LOG_LEVEL": "WARNING", "PYTHONHASHSEED": "0",
           "WEBSOCKET_LAYER": args.layer, "LIVE_TRANSCRIPTS": "on" if forwards else "off"}
    with bridge_under_callgrind(env, port, folder) as (bridge, worker):
        generator_step(bridge, emulator, args.calls, 2.0, args.warm, {})
        time.sleep(3)  # the warm-up's sessions end
        cpu: dict[str, float] = {}
        result = generator_step(bridge, emulator, args.calls, args.settle, measured_seconds, {
            "STEADY_START": lambda: cpu.setdefault("start", sample(worker).cpu_seconds),
            "STEADY_END": lambda: cpu.setdefault("end", sample(worker).cpu_seconds)})
        time.sleep(3)  # the calls end before the bridge stops
    result["cpu_share"] = (cpu["end"] - cpu["start"]) / float(result["steadySeconds"])  # type: ignore[arg-type]
    return total_instructions(folder, worker), result


def run_arm(arm: str, args: argparse.Namespace, redis_url: str, emulator: RunningServer, folder: Path) -> ArmRun:
    """The short and the long bridge of ``arm``; the difference is ``--steady`` seconds of ``--calls`` calls."""
    says, _ = ARMS[arm]
    requests.post(emulator.url + "/_emulator/behaviour", timeout=10,
                  json={"behaviour": "echo" if says else "echo_no_transcripts"}).raise_for_status()
    short, _ = run_bridge(arm, args, redis_url, emulator, folder, args.short)
    long, result = run_bridge(arm, args, redis_url, emulator, folder, args.short + args.steady)
    return ArmRun(arm, long - short, args.steady, int(result["held"]),  # type: ignore[call-overload]
                  int(result["framesSentInSteady"]), int(result["framesLost"]),  # type: ignore[call-overload]
                  float(result["cpu_share"]), (result.get("e2eMs") or {}).get("p99"))  # type: ignore[arg-type, union-attr]


def report(runs: list[ArmRun], calls: int) -> list[str]:
    """Per arm: each round's instructions per call-second; then the differences issue 16 asks about (medians)."""
    lines = []
    by: dict[str, list[float]] = {}
    for run in runs:
        by.setdefault(run.arm, []).append(run.per_call_second(calls))
    for arm in ARMS:
        if arm in by:
            rounds = [r for r in runs if r.arm == arm]
            lines.append(f"  {arm:>13}: {statistics.median(by[arm]):12,.0f} instructions per call-second (median of "
                         + " / ".join(f"{v:,.0f}" for v in by[arm]) + "); worker CPU under valgrind "
                         + " / ".join(f"{r.cpu_share * 100:.0f} %" for r in rounds) + " of a core; held "
                         + " / ".join(f"{r.calls_held}/{calls}" for r in rounds) + ", frames lost "
                         + " / ".join(f"{r.frames_lost} of {r.frames_sent}" for r in rounds))
    if set(by) == set(ARMS):
        fwd, parsed, none = (statistics.median(by[a]) for a in ("forwarded", "not-forwarded", "none"))
        lines.append(f"  forwarding (forwarded − not-forwarded): {(fwd / parsed - 1) * 100:+.2f} % of the whole worker; "
                     f"{(fwd - parsed) / LINES_PER_CALL_SECOND:,.0f} instructions per line")
        lines.append(f"  receiving + parsing the lines (not-forwarded − none): {(parsed / none - 1) * 100:+.2f} %; "
                     f"{(parsed - none) / LINES_PER_CALL_SECOND:,.0f} instructions per line")
        lines.append(f"  live transcripts in all (forwarded − none): {(fwd / none - 1) * 100:+.2f} %")
    return lines


@contextlib.contextmanager
def emulator_stack() -> Iterator[tuple[str, RunningServer]]:
    """A private Redis and the Kallglot emulator (not instrumented)."""
    with run_redis() as redis_url, run_gunicorn(
            "app.devtools.emulator:create_emulator_app()",
            {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_API_KEY, "LOG_LEVEL": "WARNING"},
            ready_path="/_emulator/stats") as emulator:
        yield redis_url, emulator


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every arm (fresh bridge each) for every round, print the table."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.loadtest.worker_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3, help="concurrent calls (few: valgrind must keep real time)")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds counted per arm (long run minus short)")
    parser.add_argument("--short", type=float, default=2.0, help="seconds of the short run's measured step")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between placing the calls and counting")
    parser.add_argument("--warm", type=float, default=5.0, help="seconds of the warm-up step (not counted)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the arms (order rotated)")
    parser.add_argument("--arms", default=",".join(ARMS), help="arms to run (comma-separated)")
    parser.add_argument("--layer", default="sansio", help="WEBSOCKET_LAYER of the bridge")
    args = parser.parse_args(argv)
    if not (shutil.which("valgrind") and shutil.which("node")):
        print("needs valgrind and node on the PATH", file=sys.stderr)
        return 2
    ensure_node_modules()
    arms = [arm for arm in ARMS if arm in args.arms.split(",")]
    print(f"whole bridge worker (gunicorn, 1 gevent worker, {args.layer}) under callgrind: {args.calls} calls × "
          f"{args.steady:g} s counted after a {args.warm:g} s warm-up step; per call-second 50 Twilio frames in and "
          f"the emulator's echo, {LINES_PER_CALL_SECOND} transcript lines in the arms with lines; load average "
          f"{Path('/proc/loadavg').read_text().split()[0]} at the start", flush=True)
    runs: list[ArmRun] = []
    with emulator_stack() as (redis_url, emulator), tempfile.TemporaryDirectory(prefix="worker-cost-") as tmp:
        for round_no in range(args.rounds):
            shift = round_no % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                run = run_arm(arm, args, redis_url, emulator, Path(tmp))
                runs.append(run)
                print(f"round {round_no + 1} {arm}: {run.per_call_second(args.calls):,.0f} instructions per "
                      f"call-second ({run.instructions:,} in {run.window_seconds:g} s, long − short); worker CPU "
                      f"{run.cpu_share * 100:.0f} % of a core; held {run.calls_held}/{args.calls}, frames lost "
                      f"{run.frames_lost} of {run.frames_sent}, echo p99 {run.echo_p99_ms or 0:.0f} ms; load average "
                      f"{Path('/proc/loadavg').read_text().split()[0]}", flush=True)
    for line in report(runs, args.calls):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
