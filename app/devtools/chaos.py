"""Chaos run: hundreds of simulated calls with faults mixed in, then a count of what leaked.

``python -m app.devtools.chaos --calls 300 --concurrency 24`` starts a private stack on loopback — redis-server, the
Kallglot emulator, a fake Twilio REST API (for agent legs and hang-ups), and two bridge instances under
gunicorn + gevent sharing that Redis — and places calls through the Twilio simulator. Each call draws one
scenario (seeded, so a run can be repeated):

``normal``          talk, listen, hang up (status callbacks as Twilio sends them)
``callbacks``       hang up with the callbacks repeated or in reverse order
``caller-drop``     the caller's socket drops without ``stop`` and no callback ever comes
``kallglot-drop``   Kallglot's stream socket drops mid-call (the relay reopens it)
``create-fault``    Kallglot answers 503 to session creation (the caller must hear the fallback)
``connect-fault``   Kallglot refuses the first stream connect (the relay retries)
``agent``           the number has an agent: the agent leg is dialled, then hung up with the customer
``returning``       the caller drops, then calls back within the window (re-attaches to the held session)
``worker-kill``     the worker holding the media socket is killed with SIGKILL mid-call

It then waits for every hold window and heartbeat to run out and prints: sessions created, ended, leaked
(not ended), double-ended (ended more than once), and calls that heard nothing (neither audio nor a message).
Exit status 0 only when leaked, double-ended and dead air are all 0. Loopback only; bounded; stops by itself.
"""
from __future__ import annotations

import argparse
import base64
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import redis as redis_lib
import requests

from app.calls.lifecycle import STREAM_START_GRACE_SECONDS
from app.carriers.registry import carrier_names
from app.devtools.localstack import RunningServer, free_port, run_gunicorn, run_redis
from app.profiles import NumberProfile, ProfileStore
from app.redis_keys import RedisKeys
from app.devtools.simulator.twilio import CallResult, SimulatedStream, TwilioCallSimulator

SCENARIOS = ("normal", "callbacks", "caller-drop", "kallglot-drop", "create-fault", "connect-fault", "agent",
             "returning", "worker-kill")
WEIGHTS = (30, 10, 10, 10, 8, 8, 10, 8, 2)
AUTH_TOKEN = "chaos-twilio-auth-token"
ACCOUNT_SID = "AC" + "c" * 32
API_KEY = "sk_test_emulator"
NUMBER, AGENT_LINE, AGENT_NUMBER = "+15005550006", "+15005550008", "+15005550007"
RECONNECT_WINDOW_SECONDS, HEARTBEAT_TIMEOUT_SECONDS = 3, 4


@dataclass
class Outcome:
    """What one simulated call experienced."""

    scenario: str
    results: list[CallResult]
    error: str = ""

    @property
    def dead_air(self) -> bool:
        """Neither audio nor a spoken message reached the caller on any of its calls."""
        return not any(r.heard_audio or r.said for r in self.results)


class Chaos:
    """The running stack and the scenario implementations."""

    def __init__(self, bridges: list[RunningServer], emulator: RunningServer, seed: int) -> None:
        self.bridges, self.emulator = bridges, emulator
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.killed = 0

    def simulator(self) -> TwilioCallSimulator:
        with self.lock:
            bridge = self.random.choice(self.bridges)
        return TwilioCallSimulator(bridge.url, AUTH_TOKEN, public_url=self.bridges[0].url, account_sid=ACCOUNT_SID,
                                   timeout=15)

    def fault(self, **fault: object) -> None:
        requests.post(self.emulator.url + "/_emulator/faults", json={"faults": [fault]}, timeout=5).raise_for_status()

    def session_of(self, call_sid: str) -> str | None:
        for session in requests.get(self.emulator.url + "/_emulator/sessions", timeout=10).json()["sessions"]:
            if (session.get("metadata") or {}).get("twilio_call_sid") == call_sid:
                return str(session["id"])
        return None

    def run(self, scenario: str, audio: bytes) -> Outcome:
        """Place one call (or two, for ``returning``) under ``scenario``."""
        sim = self.simulator()
        caller = f"+1555{self.random.randrange(10**6, 10**7)}"
        to = AGENT_LINE if scenario == "agent" else NUMBER
        # A number configured as README says (VoiceFallbackUrl set); a caller whose line went quiet speaks up.
        # Callers talk in real time (0.5 s) and listen a second, as people do.
        call = dict(audio=audio, pace=True, listen_seconds=1.0, fallback_url=sim.public_url + "/twilio/fallback",
                    restore_audio=audio[:1600])
        try:
            if scenario == "callbacks":
                return Outcome(scenario, [sim.place_call(to, caller, **call,
                                                         status_callbacks=self.random.choice(["twice", "reversed"]))])
            if scenario in ("caller-drop", "returning"):
                first = sim.place_call(to, caller, **{**call, "listen_seconds": 0}, status_callbacks="none",
                                       hold_open=lambda s: (time.sleep(0.3), s.close_abruptly()))
                if scenario == "caller-drop":
                    return Outcome(scenario, [first])
                time.sleep(0.5)  # the relay notices the drop and holds the session
                return Outcome(scenario, [first, sim.place_call(to, caller, **call)])
            if scenario == "kallglot-drop":
                return Outcome(scenario, [sim.place_call(to, caller, **call, hold_open=self._drop_kallglot)])
            if scenario == "create-fault":
                self.fault(endpoint="create", status=503, code="service_unavailable", times=3)
            elif scenario == "connect-fault":
                self.fault(endpoint="connect", status=503, code="service_unavailable", times=1)
            elif scenario == "worker-kill":
                return Outcome(scenario, [sim.place_call(to, caller, **call, hold_open=self._kill_relay_worker)])
            elif scenario == "agent":
                call["listen_seconds"] = 1.5  # long enough for the agent leg to be dialled and answer
            return Outcome(scenario, [sim.place_call(to, caller, **call)])
        except Exception as exc:  # a simulator failure is reported, never hidden
            return Outcome(scenario, [], error=f"{type(exc).__name__}: {exc}")

    def _drop_kallglot(self, stream: SimulatedStream) -> None:
        session_id = self._wait(lambda: self.session_of(stream.call_sid))
        if session_id:
            requests.post(f"{self.emulator.url}/_emulator/sessions/{session_id}/drop", timeout=5)
        time.sleep(0.6)

    def _kill_relay_worker(self, stream: SimulatedStream) -> None:
        time.sleep(0.3)  # let the relay start and log its line
        for bridge in self.bridges:
            pid = _pid_of_relay(bridge.log(), stream.call_sid)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # that worker was already killed (its call moved on): nothing more to do
                with self.lock:
                    self.killed += 1
                stream.wait_for(lambda s: s.server_closed, 5)
                return

    @staticmethod
    def _wait(get: Callable[[], str | None], timeout: float = 5.0) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = get()
            if value:
                return value
            time.sleep(0.1)
        return None


def _pid_of_relay(log: str, call_sid: str) -> int | None:
    for line in log.splitlines():
        if call_sid in line and "relay started" in line:
            match = re.search(r'"pid":\s*(\d+)', line) or re.search(r"\[pid (\d+)\]", line)
            if match:
                return int(match.group(1))
    return None


@contextmanager
def stack(workers: int) -> Iterator[tuple[list[RunningServer], RunningServer, str]]:
    """Redis, emulator, fake Twilio REST and two bridge instances, all on loopback."""
    with ExitStack() as stack:
        redis_url = stack.enter_context(run_redis())
        emulator = stack.enter_context(run_gunicorn("app.devtools.emulator:create_emulator_app()",
                                                    {"KALLGLOT_EMULATOR_API_KEY": API_KEY},
                                                    ready_path="/_emulator/stats", print_log_on_error=False))
        ports = [free_port(), free_port()]
        public = f"http://127.0.0.1:{ports[0]}"
        fake = stack.enter_context(run_gunicorn("app.devtools.simulator.twilio_rest:create_fake_twilio_rest()", {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "FAKE_TWILIO_BRIDGE_URL": public,
            "FAKE_TWILIO_MAX_CALL_SECONDS": "30"}, print_log_on_error=False))
        env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": API_KEY, "REDIS_URL": redis_url,
               "REDIS_NAMESPACE": "chaos", "PUBLIC_URL": public, "SECRET_KEY": "chaos-secret-key-0123456789",
               "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_URL": fake.url,
               "RECONNECT_WINDOW_SECONDS": str(RECONNECT_WINDOW_SECONDS),
               "HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT_SECONDS), "LOG_LEVEL": "INFO"}
        bridges = [stack.enter_context(run_gunicorn("app:create_app()", env, workers=workers, port=port,
                                                    print_log_on_error=False)) for port in ports]
        client = redis_lib.Redis.from_url(redis_url)
        ProfileStore(client, RedisKeys("chaos"), NumberProfile(), carriers=carrier_names()).set(AGENT_LINE,
                                                                     NumberProfile(agent_number=AGENT_NUMBER))
        yield bridges, emulator, redis_url


def _redis_view(redis_url: str, session_ids: list[str]) -> dict[str, object]:
    """What the bridge's Redis says about some sessions (for --verbose)."""
    keys = RedisKeys("chaos")
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    view: dict[str, object] = {}
    for session_id in session_ids:
        record = client.hgetall(keys.session(session_id))
        legs = {name: client.hgetall(keys.call(*name[4:].split(":", 1))) for name in record if name.startswith("leg:")}
        view[session_id] = {"session": record, "legs": legs, "deadline": client.zscore(keys.deadlines(), session_id),
                            "heartbeats": {n: client.zscore(keys.heartbeats(), n[4:]) for n in legs},
                            "now": time.time()}
    return view


def main(argv: list[str] | None = None) -> int:
    """Run the chaos scenarios and print the tally."""
    parser = argparse.ArgumentParser(description="Chaos run: simulated calls with faults; prints what leaked.")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per bridge instance")
    parser.add_argument("--verbose", action="store_true", help="print the bridge log lines of leaked sessions")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    plan = rng.choices(SCENARIOS, weights=WEIGHTS, k=args.calls)
    audio = base64.b64decode(base64.b64encode(bytes(rng.randrange(256) for _ in range(4000))))
    started = time.monotonic()
    with stack(args.workers) as (bridges, emulator, redis_url):
        chaos = Chaos(bridges, emulator, args.seed)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            outcomes = list(pool.map(lambda scenario: chaos.run(scenario, audio), plan))
        placed = time.monotonic() - started
        # Let every hold window, heartbeat expiry and end retry run out before counting.
        settle = RECONNECT_WINDOW_SECONDS + HEARTBEAT_TIMEOUT_SECONDS + 6
        # At most: a leg registered by a worker killed before its stream started waits out the stream-start
        # grace, then the hold; an orphaned create waits out its grace, then the reaper's pass.
        deadline = time.monotonic() + STREAM_START_GRACE_SECONDS + settle + 10
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            stats = requests.get(emulator.url + "/_emulator/stats", timeout=10).json()
            if stats["created"] == stats["ended"] and time.monotonic() - started > placed + settle:
                break
            time.sleep(1)
        sessions = requests.get(emulator.url + "/_emulator/sessions", timeout=10).json()["sessions"]
        logs = "\n".join(bridge.log() for bridge in bridges)
        state = _redis_view(redis_url, [s["id"] for s in sessions if s["status"] != "ended"]) if args.verbose else {}
    leaked = [s["id"] for s in sessions if s["status"] != "ended"]
    double_ended = [s["id"] for s in sessions if s["end_calls"] > 1]
    dead_air = [o for o in outcomes if o.dead_air]
    errors = [o for o in outcomes if o.error]
    print(f"chaos run: {args.calls} calls ({Counter(o.scenario for o in outcomes).most_common()}), concurrency "
          f"{args.concurrency}, 2 instances x {args.workers} workers, seed {args.seed}, {placed:.1f}s to place, "
          f"{chaos.killed} workers killed")
    print(f"sessions created: {stats.get('created', len(sessions))}")
    print(f"sessions ended:   {stats.get('ended', len(sessions) - len(leaked))}")
    print(f"leaked:           {len(leaked)}")
    print(f"double-ended:     {len(double_ended)}")
    print(f"dead-air calls:   {len(dead_air)}")
    print(f"simulator errors: {len(errors)}")
    for outcome in (dead_air + errors)[:10]:
        detail = "; ".join(f"{r.call_sid} streams={r.streams} sent={len(r.sent_audio)} "
                           f"{[e for _, e in r.timeline][-4:]}" for r in outcome.results)
        print(f"  - {outcome.scenario}: {outcome.error or 'heard nothing'} ({detail})")
    by_id = {s["id"]: s for s in sessions}
    for session_id in (leaked + double_ended)[:10]:
        s = by_id[session_id]
        print(f"  - session {session_id} status={s['status']} end_calls={s['end_calls']} "
              f"connections={s['connections_total']} call={(s.get('metadata') or {}).get('twilio_call_sid')}")
        if args.verbose:
            print(f"      redis: {state.get(session_id)}")
            call_sid = (s.get("metadata") or {}).get("twilio_call_sid") or session_id
            print("\n".join(f"      {line[:400]}" for line in logs.splitlines()
                            if call_sid in line or session_id in line))
    return 0 if not (leaked or double_ended or dead_air) else 1


if __name__ == "__main__":
    sys.exit(main())
