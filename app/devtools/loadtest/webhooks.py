"""``python -m app.devtools.loadtest.webhooks``: the load benchmark's webhook-only mode — calls per second one
gevent worker answers when the bridge carries no media (the ``direct`` and ``sip`` transports, README "Capacity").

A ``direct`` or ``sip`` call costs the bridge its webhooks only: the voice webhook (profile, Redis, Kallglot's
create, the TwiML), for ``sip`` the ``<Dial action>``, and the final status callback (the leg's end and Kallglot's
end). This starts a private Redis, the Kallglot emulator and the bridge (gunicorn, ONE gevent worker) on loopback,
pins the bridge to ``--bridge-cpu`` and everything else (Redis, emulator, this generator) to ``--other-cpu``, gives
the called number the transport asked for, then places ``--calls`` calls, ``--concurrency`` at a time, each as
Twilio would (signed form POSTs, in order), and prints:

- calls/s achieved and the webhooks' latency (p50/p95/p99 of each request),
- the bridge worker's CPU over the run (from /proc) as % of a core and as ms per call, and the calls/s one fully
  busy worker would answer at that cost (1000 / ms per call) — the figure to size by, since on a 2-core machine
  the generator and the emulator may saturate their core first,
- whether every call's session was created and ended exactly once at the emulator (a run that is not is no result).

``--transport relay`` runs the same webhooks for comparison, but a relay call's real cost is its media, which this
mode does not send (the media benchmark is ``python -m app.devtools.loadtest``). Loopback only; Linux /proc.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from twilio.request_validator import RequestValidator

from app.carriers.registry import carrier_names
from app.devtools.localstack import RunningServer, free_port, run_gunicorn, run_redis
from app.profiles import TRANSPORTS, NumberProfile, ProfileStore
from app.redis_keys import RedisKeys

TWILIO_AUTH_TOKEN = "loadtest-twilio-auth-token"
TWILIO_ACCOUNT_SID = "AC" + "0" * 32
EMULATOR_API_KEY = "sk_test_loadtest"
TO, FROM = "+15005550006", "+15551230000"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU (user + system) ``pid`` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` and of its children to ``cpu``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})
        for child in (task / "children").read_text().split():
            pin(int(child), cpu)


def worker_pid(master: int) -> int:
    """The one gunicorn worker of ``master``."""
    (child,) = [int(c) for task in Path(f"/proc/{master}/task").iterdir() for c in (task / "children").read_text().split()]
    return child


@contextmanager
def stack(bridge_cpu: int, other_cpu: int, transport: str) -> Iterator[tuple[RunningServer, RunningServer, int]]:
    """Redis, the emulator and a one-worker bridge, pinned; the called number on ``transport``."""
    with run_redis() as redis_url:
        port_of_redis = redis_url.split(":")[2].split("/")[0]
        for pid in subprocess.run(["pgrep", "-f", f"redis-server.*{port_of_redis}"], capture_output=True,
                                  text=True).stdout.split():
            pin(int(pid), other_cpu)
        with run_gunicorn("app.devtools.emulator:create_emulator_app()",
                          {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_API_KEY, "LOG_LEVEL": "WARNING"},
                          ready_path="/_emulator/stats") as emulator:
            pin(emulator.process.pid, other_cpu)
            port, namespace = free_port(), f"loadtest-webhooks-{os.getpid()}"
            client = redis.Redis.from_url(redis_url)
            ProfileStore(client, RedisKeys(namespace), NumberProfile(), carriers=carrier_names()).set(
                TO, NumberProfile(transport=transport))
            client.close()
            env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": EMULATOR_API_KEY,
                   "KALLGLOT_SIP_DOMAIN": urlsplit(emulator.url).netloc, "REDIS_URL": redis_url,
                   "REDIS_NAMESPACE": namespace, "PUBLIC_URL": f"http://127.0.0.1:{port}",
                   "SECRET_KEY": "loadtest-secret-key-0123456789", "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID,
                   "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN, "LOG_LEVEL": "WARNING"}
            with run_gunicorn("app:create_app()", env, workers=1, port=port) as bridge:
                pin(bridge.process.pid, bridge_cpu)
                yield bridge, emulator, worker_pid(bridge.process.pid)


class Caller:
    """Places one call's webhooks in order, signed as Twilio signs them, and keeps their latencies."""

    def __init__(self, bridge_url: str, transport: str) -> None:
        self.url, self.transport = bridge_url, transport
        self.validator = RequestValidator(TWILIO_AUTH_TOKEN)
        self.latency_ms: dict[str, list[float]] = {"voice": [], "dial-action": [], "status": []}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.local = threading.local()

    def post(self, path: str, params: dict[str, str]) -> None:
        session = getattr(self.local, "http", None) or requests.Session()
        self.local.http = session
        url = self.url + path
        started = time.perf_counter()
        response = session.post(url, data=params, timeout=30,
                                headers={"X-Twilio-Signature": self.validator.compute_signature(url, params)})
        elapsed = (time.perf_counter() - started) * 1000
        with self.lock:
            self.latency_ms[path.rsplit("/", 1)[1]].append(elapsed)
            if response.status_code >= 300:
                self.failures.append(f"{path} HTTP {response.status_code}")

    def call(self, _: int) -> None:
        """One whole call: voice webhook, (sip) the dial's end, the final status callback."""
        base = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": TWILIO_ACCOUNT_SID, "From": FROM, "To": TO,
                "Direction": "inbound", "ApiVersion": "2010-04-01"}
        try:
            self.post("/twilio/voice", {**base, "CallStatus": "ringing"})
            if self.transport == "sip":
                self.post("/twilio/dial-action", {**base, "CallStatus": "in-progress", "DialCallStatus": "completed",
                                                  "DialCallSid": "CA" + uuid.uuid4().hex, "DialCallDuration": "30",
                                                  "DialSipResponseCode": "200"})
            self.post("/twilio/status", {**base, "CallStatus": "completed", "CallDuration": "30",
                                         "SequenceNumber": "0"})
        except requests.RequestException as exc:
            with self.lock:
                self.failures.append(type(exc).__name__)


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p95/p99 of ``values`` (ms), or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, warm it up, place the calls and return the figures."""
    with stack(args.bridge_cpu, args.other_cpu, args.transport) as (bridge, emulator, worker):
        os.sched_setaffinity(0, {args.other_cpu})
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(Caller(bridge.url, args.transport).call, range(min(50, args.calls))))  # warm-up
            requests.post(emulator.url + "/_emulator/reset", timeout=10)
            caller = Caller(bridge.url, args.transport)
            cpu0, started = cpu_seconds(worker), time.monotonic()
            list(pool.map(caller.call, range(args.calls)))
            seconds, cpu = time.monotonic() - started, cpu_seconds(worker) - cpu0
        load = float(Path("/proc/loadavg").read_text().split()[0])
        stats = requests.get(emulator.url + "/_emulator/stats", timeout=10).json()
    ms_per_call = cpu * 1000 / args.calls
    return {"transport": args.transport, "calls": args.calls, "concurrency": args.concurrency,
            "seconds": seconds, "calls_per_s": args.calls / seconds, "bridge_cpu_core": cpu / seconds,
            "bridge_cpu_ms_per_call": ms_per_call, "calls_per_s_per_busy_worker": 1000 / ms_per_call if cpu else None,
            "latency_ms": {name: percentiles(values) for name, values in caller.latency_ms.items() if values},
            "failures": caller.failures[:10], "failure_count": len(caller.failures),
            "sessions_created": stats.get("created"), "sessions_ended": stats.get("ended"),
            "end_calls": stats.get("end_calls"), "double_end_calls": stats.get("double_end_calls"),
            "loadavg_1m_after": load}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the figures (and write them as JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.loadtest.webhooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=TRANSPORTS, default="direct")
    parser.add_argument("--calls", type=int, default=2000, help="calls placed (after 50 unreported warm-up calls)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once")
    parser.add_argument("--bridge-cpu", type=int, default=0)
    parser.add_argument("--other-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args)
    latency = " ".join(f"{name} {v['p50']:.1f}/{v['p95']:.1f}/{v['p99']:.1f}" for name, v in
                       result["latency_ms"].items() if v)
    whole = result["sessions_created"] == result["sessions_ended"] == result["end_calls"] == args.calls \
        and not result["double_end_calls"] and not result["failure_count"]
    print(f"transport {args.transport}: {args.calls} calls, {args.concurrency} in flight, {result['seconds']:.1f} s "
          f"→ {result['calls_per_s']:.1f} calls/s achieved; bridge worker {result['bridge_cpu_core'] * 100:.0f}% of a "
          f"core, {result['bridge_cpu_ms_per_call']:.2f} ms CPU per call → "
          f"{result['calls_per_s_per_busy_worker'] or 0:.0f} calls/s per fully busy worker; webhook ms p50/p95/p99 "
          f"{latency}; sessions created/ended/end calls {result['sessions_created']}/{result['sessions_ended']}/"
          f"{result['end_calls']} (double ends {result['double_end_calls']}), failures {result['failure_count']}; "
          f"load average after {result['loadavg_1m_after']:.2f}" + ("" if whole else "  — NOT A RESULT: calls lost"),
          flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
