"""Chaos run (long: every carrier's scenarios share one plan, stack and tally): simulated calls with faults mixed
in, then a count of what leaked.

``python -m app.devtools.chaos --calls 300 --concurrency 24`` starts a private stack on loopback — redis-server, the
Kallglot emulator, a fake Twilio REST API (for agent legs and hang-ups), and two bridge instances under
gunicorn + gevent sharing that Redis (``--instances N``; ``--redis cluster`` or ``sentinel`` for a 3-master
Redis Cluster or a Sentinel-managed master + replica instead of one server), and the fake Telnyx — and places
calls. Each call draws a carrier from ``--carriers`` (default ``twilio,texml,call-control``: Twilio through the
Twilio simulator, Telnyx TeXML and Call Control through :mod:`app.devtools.chaos_telnyx`) and one scenario (both
seeded, so a run can be repeated):

``normal``          talk, listen, hang up (status callbacks as Twilio sends them)
``callbacks``       hang up with the callbacks repeated or in reverse order
``caller-drop``     the caller's socket drops without ``stop`` and no callback ever comes
``kallglot-drop``   Kallglot's stream socket drops mid-call (the relay reopens it)
``create-fault``    Kallglot answers 503 to session creation (the caller must hear the fallback)
``connect-fault``   Kallglot refuses the first stream connect (the relay retries)
``agent``           the number has an agent: the agent leg is dialled, then hung up with the customer
``returning``       the caller drops, then calls back within the window (re-attaches to the held session)
``worker-kill``     the worker holding the media socket is killed with SIGKILL mid-call

Callers are patient (:mod:`app.devtools.simulator.caller`): after talking (and after "hello?" on a restored
stream) each waits until it hears audio or a spoken message, up to ``--patience`` (default 5 s, the rationale is
there), then listens ``--listen`` more and hangs up. Dead air is a caller who waited a whole patience on a stream
and heard nothing, a Call Control call left up in silence (stranded), or a caller nothing ever reached
(:func:`app.devtools.chaos_report.left_in_silence`).

It then waits for every hold window and heartbeat to run out and prints: sessions created, ended, leaked
(not ended), double-ended (``end`` called more than once), and dead-air calls, overall and per carrier, each
failure with its timeline (the simulator's view, then the bridges' log lines for that call and session); then
the first-audio latency per carrier and scenario (p50/p95/p99/max from the end of talking, and the calls answered
later than 1.0 s and 1.5 s: the old caller's criterion stays visible), and the five slowest calls with their
timelines. Exit status 0 only when leaked, double-ended and dead air are all 0. Loopback only; bounded; stops
by itself.

Options for the lifecycle at scale: ``--stress`` keeps one extra process busy on the CPU for the whole run
(a bounded spin, stopped with the run), so workers are slow rather than dead; ``--listen`` makes callers stay
on longer after being answered; ``--patience`` how long they wait for the answer; ``--kill-weight`` raises the
share of ``worker-kill`` calls. Start-up waits are generous and readiness probes
scale with the load average (:mod:`app.devtools.localstack`). Each run prints the load average at its start
and end: the machine may be busy with other work, and every figure means little without it.
"""
from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import nacl.signing
import requests

from app.calls.lifecycle import END_CLAIM_LEASE_SECONDS, PENDING_CREATE_GRACE_SECONDS, STREAM_START_GRACE_SECONDS
from app.carriers.registry import carrier_names
from app.devtools.chaos_report import (
    agent_leg_lines, bridge_closed_lines, call_of, call_timeline, first_audio_lines, late_call_lines,
    left_in_silence, load_average, per_carrier_lines, pid_of_relay, reaper_work_by_instance, redis_view,
    refused_then_reopened_lines, session_timeline, slowest, stress, wait_summary,
)
from app.devtools.chaos_telnyx import (
    MODES, TEXML, TWILIO, HeardCall, TelnyxChaos, fake_telnyx_env, parse_modes, telnyx_bridge_env,
)
from app.devtools.simulator.caller import DEFAULT_PATIENCE_SECONDS
from app.devtools.simulator.telnyx import TelnyxSigner
from app.devtools.localstack import RunningServer, free_port, run_gunicorn, startup_timeout
from app.devtools.redis_topologies import RedisDeployment, run_redis_deployment
from app.profiles import NumberProfile, ProfileStore
from app.redis_keys import RedisKeys
from app.devtools.simulator.twilio import CallResult, SimulatedStream, TwilioCallSimulator

SCENARIOS = ("normal", "callbacks", "caller-drop", "kallglot-drop", "create-fault", "connect-fault", "agent",
             "returning", "worker-kill")
WEIGHTS = (30, 10, 10, 10, 8, 8, 10, 8, 2)
#: Least time between two kills in one bridge instance, so it always keeps a worker serving.
KILL_SPACING_SECONDS = 45.0
AUTH_TOKEN = "chaos-twilio-auth-token"
ACCOUNT_SID = "AC" + "c" * 32
API_KEY = "sk_test_emulator"
NUMBER, AGENT_LINE = "+15005550006", "+15005550008"
#: A number the bridge's toll-fraud rules dial (app/calls/destinations.py): a +1 500 "personal number" is refused,
#: which left the ``agent`` scenario without an agent leg.
AGENT_NUMBER = "+14155557770"
#: The Telnyx number with an agent (dialled through Call Control, for TeXML and Call Control customers alike);
#: its agent is dialable for the same reason as ``AGENT_NUMBER`` (``+15005550109`` was refused as toll fraud).
TELNYX_AGENT_LINE, TELNYX_AGENT_NUMBER = "+15005550108", "+14155557771"
RECONNECT_WINDOW_SECONDS, HEARTBEAT_TIMEOUT_SECONDS = 3, 4


@dataclass
class Outcome:
    """What one simulated call experienced."""

    scenario: str
    results: list[CallResult | HeardCall]
    error: str = ""
    carrier: str = TWILIO

    @property
    def dead_air(self) -> bool:
        """The caller was left in silence (:func:`app.devtools.chaos_report.left_in_silence`)."""
        return left_in_silence(self.results)


class Chaos:
    """The running stack and the scenario implementations."""

    def __init__(self, bridges: list[RunningServer], emulator: RunningServer, seed: int, redis: RedisDeployment,
                 listen_seconds: float = 1.0, fake_telnyx: RunningServer | None = None,
                 signer: TelnyxSigner | None = None, patience_seconds: float = DEFAULT_PATIENCE_SECONDS) -> None:
        self.bridges, self.emulator = bridges, emulator
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.killed = 0
        self.kills_spared = 0
        self.last_kill: dict[int, float] = {}
        self.listen_seconds, self.patience_seconds = listen_seconds, patience_seconds
        self.redis = redis.client(decode_responses=True)
        self.keys = RedisKeys("chaos")
        self.telnyx = TelnyxChaos([b.url for b in bridges], bridges[0].url, fake_telnyx.url, signer, self._choose,
                                  self.kill_relay, self.drop_kallglot, listen_seconds, patience_seconds) \
            if fake_telnyx is not None and signer is not None else None

    def _choose(self, options: list[str]) -> str:
        with self.lock:
            return self.random.choice(options)

    def simulator(self) -> TwilioCallSimulator:
        with self.lock:
            bridge = self.random.choice(self.bridges)
        return TwilioCallSimulator(bridge.url, AUTH_TOKEN, public_url=self.bridges[0].url, account_sid=ACCOUNT_SID,
                                   timeout=15)

    def fault(self, **fault: object) -> None:
        requests.post(self.emulator.url + "/_emulator/faults", json={"faults": [fault]}, timeout=5).raise_for_status()

    def session_of(self, call_sid: str, carrier: str = "twilio") -> str | None:
        """The call's session as the bridge recorded it (one Redis read, not a scan of every session)."""
        value = self.redis.hget(self.keys.call(carrier, call_sid), "session_id")
        return str(value) if value else None

    def run(self, scenario: str, audio: bytes, mode: str = TWILIO) -> Outcome:
        """Place one call (or two, for ``returning``) under ``scenario`` through ``mode``'s carrier."""
        if mode != TWILIO:
            return self._run_telnyx(scenario, audio, mode)
        sim = self.simulator()
        caller = f"+1555{self.random.randrange(10**6, 10**7)}"
        to = AGENT_LINE if scenario == "agent" else NUMBER
        # A number configured as README says (VoiceFallbackUrl set); a caller whose line went quiet speaks up.
        # Callers talk in real time (0.5 s), wait for the answer (their patience), then listen a second.
        call = dict(audio=audio, pace=True, listen_seconds=self.listen_seconds,
                    fallback_url=sim.public_url + "/twilio/fallback", restore_audio=audio[:1600],
                    patience_seconds=self.patience_seconds)
        try:
            if scenario == "callbacks":
                return Outcome(scenario, [sim.place_call(to, caller, **call,
                                                         status_callbacks=self.random.choice(["twice", "reversed"]))])
            if scenario in ("caller-drop", "returning"):
                first = sim.place_call(to, caller, **{**call, "listen_seconds": 0}, status_callbacks="none",
                                       hold_open=self._drop_caller)
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
                # Long enough for the agent leg to be dialled and answer.
                call["listen_seconds"] = max(1.5, self.listen_seconds)
            return Outcome(scenario, [sim.place_call(to, caller, **call)])
        except Exception as exc:  # a simulator failure is reported, never hidden
            return Outcome(scenario, [], error=f"{type(exc).__name__}: {exc}")

    def _run_telnyx(self, scenario: str, audio: bytes, mode: str) -> Outcome:
        assert self.telnyx is not None
        with self.lock:
            caller = f"+1555{self.random.randrange(10**6, 10**7)}"
            choice = self.random.choice(["twice", "reversed"])
        to = TELNYX_AGENT_LINE if scenario == "agent" else NUMBER
        try:
            if scenario == "create-fault":
                self.fault(endpoint="create", status=503, code="service_unavailable", times=3)
            elif scenario == "connect-fault":
                self.fault(endpoint="connect", status=503, code="service_unavailable", times=1)
            place = self.telnyx.texml if mode == TEXML else self.telnyx.call_control
            return Outcome(scenario, list(place(scenario, to, caller, audio, choice)), carrier=mode)
        except Exception as exc:  # a simulator failure is reported, never hidden
            return Outcome(scenario, [], error=f"{type(exc).__name__}: {exc}", carrier=mode)

    def drop_kallglot(self, carrier: str, call_id: str) -> None:
        """Drop the Kallglot stream socket of ``call_id``'s session (the relay must reopen it)."""
        session_id = self._wait(lambda: self.session_of(call_id, carrier))
        if session_id:
            requests.post(f"{self.emulator.url}/_emulator/sessions/{session_id}/drop", timeout=5)

    def _drop_caller(self, stream: SimulatedStream) -> None:
        # The caller drops mid-call: once the call got going (they heard something), or after their whole
        # patience in silence — which then counts as dead air, as it should. (Hooks run right after the talking.)
        stream.wait_for(lambda s: bool(s.heard) or s.server_closed, self.patience_seconds)
        time.sleep(0.3)
        stream.close_abruptly()

    def _drop_kallglot(self, stream: SimulatedStream) -> None:
        stream.wait_for(lambda s: bool(s.heard), self.patience_seconds)
        self.drop_kallglot("twilio", stream.call_sid)
        time.sleep(0.6)

    def _kill_relay_worker(self, stream: SimulatedStream) -> None:
        self.kill_relay(stream.call_sid, lambda: stream.wait_for(lambda s: s.server_closed, 5))

    def kill_relay(self, call_id: str, wait_closed: Callable[[], object]) -> None:
        """SIGKILL the worker whose relay carries ``call_id`` (spaced per instance), then ``wait_closed()``."""
        time.sleep(0.3)  # let the relay start and log its line
        for index, bridge in enumerate(self.bridges):
            pid = pid_of_relay(bridge.log(), call_id)
            if pid:
                with self.lock:
                    # The run has no load balancer: an instance whose every worker is dead (the replacement
                    # still importing — 20 s and more on a busy machine) times out every webhook pinned to
                    # it, which says nothing about the lifecycle. So an instance loses one worker at a time.
                    if time.monotonic() - self.last_kill.get(index, -1e9) < KILL_SPACING_SECONDS:
                        self.kills_spared += 1
                        return
                    self.last_kill[index] = time.monotonic()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # that worker was already killed (its call moved on): nothing more to do
                with self.lock:
                    self.killed += 1
                wait_closed()
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


@contextmanager
def stack(workers: int, signer: TelnyxSigner, instances: int = 2, redis_kind: str = "standalone",
          ) -> Iterator[tuple[list[RunningServer], RunningServer, RedisDeployment, RunningServer]]:
    """Redis (standalone, a cluster or under Sentinel), emulator, fake Twilio REST, fake Telnyx and ``instances``
    bridge instances sharing that Redis, all on loopback."""
    with ExitStack() as stack:
        redis = stack.enter_context(run_redis_deployment(redis_kind))
        emulator = stack.enter_context(run_gunicorn("app.devtools.emulator:create_emulator_app()",
                                                    {"KALLGLOT_EMULATOR_API_KEY": API_KEY},
                                                    ready_path="/_emulator/stats", print_log_on_error=False,
                                                    ready_timeout=startup_timeout()))
        ports = [free_port() for _ in range(instances)]
        public = f"http://127.0.0.1:{ports[0]}"
        fake = stack.enter_context(run_gunicorn("app.devtools.simulator.twilio_rest:create_fake_twilio_rest()", {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "FAKE_TWILIO_BRIDGE_URL": public,
            "FAKE_TWILIO_MAX_CALL_SECONDS": "30"}, print_log_on_error=False, ready_timeout=startup_timeout()))
        fake_telnyx = stack.enter_context(run_gunicorn(
            "app.devtools.simulator.telnyx_api:create_fake_call_control_app()",
            fake_telnyx_env(public + "/telnyx/call-control", signer), ready_path="/_fake/health",
            print_log_on_error=False, ready_timeout=startup_timeout()))
        env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": API_KEY, **redis.env,
               "REDIS_NAMESPACE": "chaos", "PUBLIC_URL": public, "SECRET_KEY": "chaos-secret-key-0123456789",
               "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_URL": fake.url,
               "RECONNECT_WINDOW_SECONDS": str(RECONNECT_WINDOW_SECONDS),
               "HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT_SECONDS), "LOG_LEVEL": "INFO",
               **telnyx_bridge_env(fake_telnyx.url, signer)}
        # Start-up waits scale with the load average: on a busy machine a bridge takes 20 s and more to import.
        bridges = [stack.enter_context(run_gunicorn("app:create_app()", env, workers=workers, port=port,
                                                    print_log_on_error=False, ready_timeout=startup_timeout()))
                   for port in ports]
        profiles = ProfileStore(redis.client(), RedisKeys("chaos"), NumberProfile(), carriers=carrier_names())
        profiles.set(AGENT_LINE, NumberProfile(agent_number=AGENT_NUMBER))
        profiles.set(TELNYX_AGENT_LINE, NumberProfile(carrier="telnyx", agent_number=TELNYX_AGENT_NUMBER))
        yield bridges, emulator, redis, fake_telnyx


def main(argv: list[str] | None = None) -> int:
    """Run the chaos scenarios and print the tally."""
    parser = argparse.ArgumentParser(description="Chaos run: simulated calls with faults; prints what leaked.")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per bridge instance")
    parser.add_argument("--instances", type=int, default=2, help="bridge instances sharing the one Redis")
    parser.add_argument("--redis", choices=("standalone", "cluster", "sentinel"), default="standalone",
                        help="the Redis deployment: one server, a 3-master cluster, or master+replica under Sentinel")
    parser.add_argument("--stress", action="store_true", help="keep one more CPU busy for the whole run")
    parser.add_argument("--listen", type=float, default=1.0,
                        help="seconds a caller listens once answered (or once their patience ran out)")
    parser.add_argument("--patience", type=float, default=DEFAULT_PATIENCE_SECONDS,
                        help="seconds a caller waits in silence after talking for an answer; waiting all of it "
                             "without hearing anything is dead air (app/devtools/simulator/caller.py says why 5)")
    parser.add_argument("--kill-weight", type=int, default=WEIGHTS[SCENARIOS.index("worker-kill")],
                        help="weight of the worker-kill scenario (the others weigh 94 together)")
    parser.add_argument("--carriers", type=parse_modes, default=MODES,
                        help=f"carriers each call picks from, comma-separated (default: {','.join(MODES)})")
    parser.add_argument("--verbose", action="store_true", help="also print the Redis view of leaked sessions")
    parser.add_argument("--keep-logs", metavar="DIR", default="",
                        help="also write each bridge instance's log to DIR (to trace calls after the run)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    weights = [args.kill_weight if name == "worker-kill" else w for name, w in zip(SCENARIOS, WEIGHTS)]
    plan = rng.choices(SCENARIOS, weights=weights, k=args.calls)
    modes = [rng.choice(args.carriers) for _ in plan]
    audio = base64.b64decode(base64.b64encode(bytes(rng.randrange(256) for _ in range(4000))))
    started = time.monotonic()
    load_at_start = load_average()
    signer = TelnyxSigner(nacl.signing.SigningKey(bytes(rng.randrange(256) for _ in range(32))))
    with stress(args.stress), stack(args.workers, signer, args.instances, args.redis) as (
            bridges, emulator, redis, fake_telnyx):
        chaos = Chaos(bridges, emulator, args.seed, redis, listen_seconds=args.listen, fake_telnyx=fake_telnyx,
                      signer=signer, patience_seconds=args.patience)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            outcomes = list(pool.map(lambda planned: chaos.run(planned[0], audio, planned[1]), zip(plan, modes)))
        placed = time.monotonic() - started
        # Let every hold window, heartbeat expiry, end retry and end-claim lease run out before counting.
        settle = RECONNECT_WINDOW_SECONDS + HEARTBEAT_TIMEOUT_SECONDS + 6
        # At most: a leg registered by a worker killed before its stream started waits out the stream-start
        # grace, then the hold; an orphaned create waits out its grace, then the reaper's pass; a worker
        # killed holding an end claim is taken over when the claim's lease lapses.
        deadline = time.monotonic() + max(STREAM_START_GRACE_SECONDS, END_CLAIM_LEASE_SECONDS
                                          + PENDING_CREATE_GRACE_SECONDS) + settle + 10
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            stats = requests.get(emulator.url + "/_emulator/stats", timeout=30).json()
            if stats["created"] == stats["ended"] and time.monotonic() - started > placed + settle:
                break
            time.sleep(1)
        sessions = requests.get(emulator.url + "/_emulator/sessions", timeout=60).json()["sessions"]
        instance_logs = [bridge.log() for bridge in bridges]
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for index, text in enumerate(instance_logs, start=1):
                with open(os.path.join(args.keep_logs, f"instance-{index}.log"), "w", encoding="utf-8") as out:
                    out.write(text)
        logs = "\n".join(instance_logs).splitlines()
        state = redis_view(redis, [s["id"] for s in sessions if s["status"] != "ended"]) if args.verbose else {}
    duration = time.monotonic() - started
    leaked = [s for s in sessions if s["status"] != "ended"]
    double_ended = [s for s in sessions if s["end_calls"] > 1]
    dead_air = [o for o in outcomes if o.dead_air]
    errors = [o for o in outcomes if o.error]
    print(f"chaos run: {args.calls} calls ({Counter(o.scenario for o in outcomes).most_common()}; carriers "
          f"{Counter(o.carrier for o in outcomes).most_common()}), concurrency "
          f"{args.concurrency}, {args.instances} instances x {args.workers} workers, Redis {args.redis}, seed {args.seed}, "
          f"stress {'on' if args.stress else 'off'}, patience {args.patience:g}s, listen {args.listen:g}s, "
          f"{placed:.1f}s to place, {duration:.0f}s in all, "
          f"{chaos.killed} workers killed ({chaos.kills_spared} kills spared: instance already lost one)")
    print(f"load average (1/5/15 min): {load_at_start} at start, {load_average()} at end")
    print(f"sessions created: {stats.get('created', len(sessions))}")
    print(f"sessions ended:   {stats.get('ended', len(sessions) - len(leaked))}")
    print(f"leaked:           {len(leaked)}")
    print(f"double-ended:     {len(double_ended)}")
    print(f"dead-air calls:   {len(dead_air)} {dict(Counter(o.scenario for o in dead_air))}")
    print(f"simulator errors: {len(errors)}")
    print("\n".join(per_carrier_lines(outcomes, sessions, args.carriers)))
    print("\n".join(agent_leg_lines(outcomes, sessions, args.carriers)))
    for index, work in enumerate(reaper_work_by_instance(instance_logs)):
        print(f"reaper, instance {index + 1}: {work['legs_lost']} lost legs given up, {work['holds_ended']} held "
              f"sessions ended, {work['orphans_ended']} orphaned creates ended")
    print("\n".join(first_audio_lines(outcomes, args.carriers)))
    for outcome in dead_air + errors:
        why = outcome.error or "dead air: " + wait_summary(outcome.results)
        print(f"  - {outcome.carrier} {outcome.scenario}: {why}")
        print("\n".join(call_timeline(outcome.results, logs)))
    print("\n".join(refused_then_reopened_lines(outcomes, logs)))
    print("\n".join(bridge_closed_lines(outcomes)))
    late = late_call_lines(outcomes, logs)
    print(f"streams answered later than 1.5 s after talking, or not at all ({len(late)}; times from the end of "
          "talking, from the bridges' logs):")
    print("\n".join(late))
    print("slowest calls (longest silence on one stream after talking):")
    for outcome in slowest(outcomes):
        print(f"  - {outcome.carrier} {outcome.scenario}: {wait_summary(outcome.results)}")
        print("\n".join(call_timeline(outcome.results, logs)))
    for kind, found in (("leaked", leaked), ("double-ended", double_ended)):
        for s in found:
            print(f"  - {kind} session {s['id']} status={s['status']} end_calls={s['end_calls']} "
                  f"connections={s['connections_total']} call={call_of(s)}")
            if args.verbose:
                print(f"      redis: {state.get(str(s['id']))}")
            print("\n".join(session_timeline(s, logs)))
    return 0 if not (leaked or double_ended or dead_air) else 1


if __name__ == "__main__":
    sys.exit(main())
