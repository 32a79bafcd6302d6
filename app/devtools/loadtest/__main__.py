"""``python -m app.devtools.loadtest``: measure how many two-way calls one gevent worker core carries, and how fast.

It starts a private Redis, the Kallglot emulator (``echo``: every ``audio.input`` comes back as
``audio.output``) and the bridge (gunicorn, ONE gevent worker) on loopback ports, pins the bridge to one core
(``--bridge-cpu``) and Redis, the emulator and the Node load generator to the other (``--other-cpu``), then
for each step N of ``--steps``: places N calls at ``--rate`` calls/s (signed like Twilio), lets them settle,
measures for ``--steady`` seconds, hangs up, and prints:

- calls held (media sockets still open at the end),
- end-to-end echo latency at the generator (last 20 ms frame of a 100 ms chunk sent → its echo received),
  the emulator's own echo time measured at the same moment by probe sockets that talk to it directly, and
  their difference per percentile: the time the relay adds on both hops (plus one loopback hop pair),
- the relay's own hop times from its ``kallglot_bridge_relay_hop_seconds`` histogram (sampled, in-process),
- frames lost (sent minus echoed back), CPU of the bridge worker (from /proc) as % of a core and as ms per
  call-second, RSS per live call (worker RSS at steady state minus idle RSS before the step, over N),
- ``/twilio/voice`` latency during the ramp (a setup burst at ``--rate``) next to Kallglot's create time.

With ``--reference`` every step runs twice in the same run, same machine, same generator and core: against the
bridge and against a reference relay in the style of Twilio's own sample (FastAPI/uvicorn/websockets,
:mod:`app.devtools.loadtest.reference_relay`, the ``[loadtest]`` extra). ``--transcripts`` picks the arms of each
bridge step — forwarded, not-forwarded (a second bridge with ``LIVE_TRANSCRIPTS=off``), none — and ``--pairs N``
repeats each step with the arms alternating, then summarizes (:mod:`app.devtools.loadtest.arms`).

Loopback only; every phase is bounded and the run ends by itself. Needs ``node`` and ``npm`` (it runs
``npm install`` in this directory once, for ``ws``), ``redis-server``, and Linux ``/proc``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from app.devtools.loadtest import profile
from app.devtools.loadtest.arms import ARM_CHOICES, ARMS, arm_summary
from app.devtools.loadtest.targets import Target, run_reference
from app.devtools.localstack import RunningServer, free_port, run_gunicorn, run_redis

HERE = Path(__file__).resolve().parent
TWILIO_AUTH_TOKEN = "loadtest-twilio-auth-token"
TWILIO_ACCOUNT_SID = "AC" + "0" * 32
EMULATOR_API_KEY = "sk_test_loadtest"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds used so far and resident memory of one process."""

    cpu_seconds: float
    rss_kb: int


def sample(pid: int) -> ProcSample:
    """CPU (user + system) and RSS of ``pid`` from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15 of stat)
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcSample(cpu, rss_pages * PAGE_KB)


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def pin(pid: int, cpu: int) -> None:
    """Pin ``pid``, its threads and its children to ``cpu`` (what ``taskset -a -p -c`` does)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})
    for child in children(pid):
        pin(child, cpu)


def ensure_node_modules() -> None:
    """``npm install`` the generator's one dependency (``ws``) once."""
    if not (HERE / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=HERE, check=True, timeout=300)


def histogram_deltas(before: str, after: str, name: str, labels: str) -> list[tuple[float, float]]:
    """``[(upper bound, count)]`` of a histogram's bucket increments between two scrapes."""
    def buckets(text: str) -> dict[float, float]:
        found: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket{") and labels in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                found[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        return found
    old, new = buckets(before), buckets(after)
    return sorted((le, new[le] - old.get(le, 0.0)) for le in new)


def histogram_quantile(deltas: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile (linear within the bucket) of cumulative bucket increments."""
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank, lower, below = q * deltas[-1][1], 0.0, 0.0
    for le, cumulative in deltas:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / max(cumulative - below, 1e-9))
        lower, below = le, cumulative
    return lower


def histogram_mean(before: str, after: str, name: str, labels: str) -> float | None:
    """Mean of a histogram's observations between two scrapes."""
    def value(text: str, suffix: str) -> float:
        for line in text.splitlines():
            if line.startswith(f"{name}_{suffix}{{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    count = value(after, "count") - value(before, "count")
    return (value(after, "sum") - value(before, "sum")) / count if count else None


@contextlib.contextmanager
def stack(bridge_cpu: int, other_cpu: int, chunk_ms: int, reference: bool,
          layers: list[str], logs: Path | None = None,
          not_forwarded: bool = False) -> Iterator[tuple[list[Target], RunningServer]]:
    """Redis, the emulator, the bridge(s: ``not_forwarded`` adds one with ``LIVE_TRANSCRIPTS=off`` per layer) and
    (``reference``) the reference relay, pinned; yields (targets, emulator)."""
    with run_redis() as redis_url:
        if not os.environ.get("REDIS_URL"):
            redis_pids = subprocess.run(["pgrep", "-f", f"redis-server.*{redis_url.split(':')[2].split('/')[0]}"],
                                        capture_output=True, text=True).stdout.split()
            for pid in redis_pids:
                pin(int(pid), other_cpu)
        with run_gunicorn("app.devtools.emulator:create_emulator_app()", {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_API_KEY,
                                                                 "LOG_LEVEL": "WARNING"},
                          ready_path="/_emulator/stats") as emulator:
            pin(emulator.process.pid, other_cpu)
            port = free_port()
            env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": EMULATOR_API_KEY,
                   "REDIS_URL": redis_url, "REDIS_NAMESPACE": f"loadtest-{os.getpid()}",
                   "PUBLIC_URL": f"http://127.0.0.1:{port}", "SECRET_KEY": "loadtest-secret-key-0123456789",
                   "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
                   "UPLINK_CHUNK_MS": str(chunk_ms), "LOG_LEVEL": "WARNING"}
            with contextlib.ExitStack() as servers:
                targets = []
                # One bridge per WebSocket layer (and LIVE_TRANSCRIPTS value), each with its own port and namespace.
                for layer in layers:
                    for live in (True, False) if not_forwarded else (True,):
                        port = free_port()
                        bridge = servers.enter_context(run_gunicorn("app:create_app()", {
                            **env, "WEBSOCKET_LAYER": layer, "PUBLIC_URL": f"http://127.0.0.1:{port}",
                            "LIVE_TRANSCRIPTS": "on" if live else "off",
                            "REDIS_NAMESPACE": f"loadtest-{os.getpid()}-{layer}{'' if live else '-nf'}",
                            "LOG_LEVEL": "INFO" if logs else "WARNING"},
                            workers=1, port=port, log_path=logs / f"bridge-{layer}{'' if live else '-nf'}.log" if logs else None))
                        pin(bridge.process.pid, bridge_cpu)
                        (worker,) = children(bridge.process.pid)
                        targets.append(Target(f"bridge[{layer}]{'' if live else ' LIVE_TRANSCRIPTS=off'}", bridge.url,
                                              worker, live_transcripts=live, layer=layer))
                reference_server = servers.enter_context(run_reference(env, enabled=reference))
                if reference_server is not None:
                    pin(reference_server.process.pid, bridge_cpu)
                    targets.append(Target("reference", reference_server.url, reference_server.process.pid))
                yield targets, emulator


def run_step(calls: int, args: argparse.Namespace, target: Target, emulator: RunningServer,
             transcripts: bool = True, arm: str = "") -> dict[str, Any]:
    """One step: N calls through the generator against ``target``; returns the measured figures."""
    (emulator_worker,) = children(emulator.process.pid)
    requests.post(emulator.url + "/_emulator/behaviour", timeout=10,
                  json={"behaviour": "echo" if transcripts else "echo_no_transcripts"}).raise_for_status()
    worker = target.worker_pid
    idle = sample(worker)
    metrics_before = requests.get(target.url + "/metrics", timeout=10).text
    config = {"baseUrl": target.url, "authToken": TWILIO_AUTH_TOKEN, "accountSid": TWILIO_ACCOUNT_SID,
              "to": "+15005550006", "calls": calls, "rate": args.rate, "settleSeconds": args.settle,
              "steadySeconds": args.steady, "emulatorUrl": emulator.url, "emulatorApiKey": EMULATOR_API_KEY,
              "probes": args.probes, "chunkMs": args.chunk_ms}
    generator = subprocess.Popen(["taskset", "-c", str(args.other_cpu), "node", str(HERE / "generator.mjs"),
                                  json.dumps(config)], stdout=subprocess.PIPE, text=True, cwd=HERE)
    marks: dict[str, tuple[float, ProcSample, ProcSample, ProcSample]] = {}
    sampler: subprocess.Popen[bytes] | None = None
    profile_path = Path()
    result: dict[str, Any] = {}
    assert generator.stdout is not None
    for line in generator.stdout:
        line = line.strip()
        if line == "STEADY_END":
            result["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
        if line in ("STEADY_START", "STEADY_END"):
            marks[line] = (time.monotonic(), sample(worker), sample(emulator_worker), sample(generator.pid))
        if line == "STEADY_START" and args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile_path = args.profile / f"{target.name}-{calls}{'' if transcripts else '-no-transcripts'}.txt"
            sampler = profile.record(worker, args.steady, profile_path)
        elif line.startswith("RESULT "):
            result = {**result, **json.loads(line[len("RESULT "):])}
    generator.wait(timeout=60)
    if sampler is not None:
        sampler.wait(timeout=60)
        result["profile"] = profile.format_summary(profile_path)
    metrics_after = requests.get(target.url + "/metrics", timeout=10).text
    result = {**result, "target": target.name, "transcripts": transcripts, "arm": arm, "layer": target.layer}
    if "STEADY_END" not in marks or "error" in result:
        return {"calls": calls, "error": result.get("error", "generator ended early"), **result}
    (t0, w0, e0, g0), (t1, w1, e1, g1) = marks["STEADY_START"], marks["STEADY_END"]
    seconds = t1 - t0
    held = result["held"]
    hop = {}
    for direction in ("uplink", "downlink"):
        deltas = histogram_deltas(metrics_before, metrics_after, "kallglot_bridge_relay_hop_seconds",
                                  f'direction="{direction}"')
        hop[direction] = {q: histogram_quantile(deltas, q / 100) for q in (50, 99)}
    added = {}
    if result.get("e2eMs") and result.get("probeMs"):
        added = {q: result["e2eMs"][q] - result["probeMs"][q] for q in ("p50", "p95", "p99")}
    return {
        **result, "seconds": seconds, "added_ms": added, "relay_hop_s": hop,
        "bridge_cpu_core": (w1.cpu_seconds - w0.cpu_seconds) / seconds,
        "bridge_cpu_ms_per_call_s": (w1.cpu_seconds - w0.cpu_seconds) * 1000 / (held * seconds) if held else None,
        # Per caller frame the generator sent in the window (each brings 1/5 of an audio.input and of an echo):
        # unlike per call-second, this does not fall when a starved machine delivers fewer frames.
        "bridge_cpu_us_per_frame": ((w1.cpu_seconds - w0.cpu_seconds) * 1e6 / result["framesSentInSteady"]
                                    if result.get("framesSentInSteady") else None),
        "emulator_cpu_core": (e1.cpu_seconds - e0.cpu_seconds) / seconds,
        "generator_cpu_core": (g1.cpu_seconds - g0.cpu_seconds) / seconds,
        "rss_idle_kb": idle.rss_kb, "rss_steady_kb": w1.rss_kb,
        "rss_per_call_kb": (w1.rss_kb - idle.rss_kb) / held if held else None,
        "kallglot_create_mean_ms": (histogram_mean(metrics_before, metrics_after, "kallglot_bridge_kallglot_api_seconds",
                                                   'operation="create_session"') or 0) * 1000,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table, or ``-``."""
    return "-" if value is None else f"{value:.{digits}f}"


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, None kept."""
    return None if seconds is None else seconds * 1000


def print_step(r: dict[str, Any]) -> None:
    """One step's figures as a few readable lines."""
    label = f"{r.get('target', 'bridge')}{'' if r.get('transcripts', True) else ' (no transcripts)'} "
    if r.get("arm"):
        label += f"[{r['arm']}] "
    if "error" in r:
        print(f"{label}N={r['calls']}: FAILED: {r['error']}", flush=True)
        return
    e2e, probe, added, voice = r["e2eMs"] or {}, r["probeMs"] or {}, r["added_ms"], r["voiceMs"] or {}
    hop_up, hop_down = r["relay_hop_s"]["uplink"], r["relay_hop_s"]["downlink"]
    print(f"{label}N={r['calls']}: held {r['held']}/{r['calls']} (closed early {r['closedEarly']}), "
          f"frames lost {r['framesLost']} of {r['framesSent']}, errors {r['errors'] or 'none'}, "
          f"machine load average {r.get('loadavg_1m')}\n"
          f"  end-to-end echo ms p50/p95/p99 {fmt(e2e.get('p50'))}/{fmt(e2e.get('p95'))}/{fmt(e2e.get('p99'))}"
          f" (n={e2e.get('n')}); emulator alone {fmt(probe.get('p50'))}/{fmt(probe.get('p95'))}/"
          f"{fmt(probe.get('p99'))}; added by the relay {fmt(added.get('p50'))}/{fmt(added.get('p95'))}/"
          f"{fmt(added.get('p99'))}\n"
          f"  relay hop (in-process histogram) ms p50/p99: uplink {fmt(ms(hop_up[50]), 2)}/"
          f"{fmt(ms(hop_up[99]), 2)}, downlink {fmt(ms(hop_down[50]), 2)}/{fmt(ms(hop_down[99]), 2)}\n"
          f"  bridge worker CPU {r['bridge_cpu_core'] * 100:.0f}% of a core = "
          f"{fmt(r['bridge_cpu_ms_per_call_s'], 2)} ms per call-second = {fmt(r['bridge_cpu_us_per_frame'], 0)} µs "
          f"per caller frame sent; emulator {r['emulator_cpu_core'] * 100:.0f}%, "
          f"generator {r['generator_cpu_core'] * 100:.0f}% (other core; generator max lag "
          f"{fmt(r['generatorMaxLagMs'])} ms, late ticks {r['generatorLateTicks']})\n"
          f"  RSS {r['rss_steady_kb'] / 1024:.0f} MB (idle {r['rss_idle_kb'] / 1024:.0f} MB) = "
          f"{fmt(r['rss_per_call_kb'], 0)} KB per live call\n"
          f"  /twilio/voice at {r.get('rate', '?')} calls/s ms p50/p95/p99 {fmt(voice.get('p50'))}/"
          f"{fmt(voice.get('p95'))}/{fmt(voice.get('p99'))} (n={voice.get('n')}); Kallglot create mean "
          f"{r['kallglot_create_mean_ms']:.1f} ms", flush=True)
    if r.get("profile"):
        print(r["profile"], flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the stack, run every step and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,200,300,400", help="concurrent calls per step (comma-separated)")
    parser.add_argument("--rate", type=float, default=50.0, help="calls placed per second during a ramp")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds measured per step")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between the ramp and the measurement")
    parser.add_argument("--probes", type=int, default=4, help="direct emulator sockets measuring its echo time")
    parser.add_argument("--chunk-ms", type=int, default=100, help="UPLINK_CHUNK_MS of the bridge")
    parser.add_argument("--bridge-cpu", type=int, default=0)
    parser.add_argument("--other-cpu", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every step's figures to this file")
    parser.add_argument("--reference", action="store_true",
                        help="run every step against the reference relay too (needs the [loadtest] extra)")
    parser.add_argument("--profile", type=Path, help="py-spy each measured step into this folder (and summarize)")
    parser.add_argument("--logs", type=Path, help="keep each bridge's log (at INFO) in this folder")
    parser.add_argument("--layers", default="simple-websocket",
                        help="WEBSOCKET_LAYER of the bridge; several (comma-separated) run one bridge each, side by side")
    parser.add_argument("--transcripts", choices=tuple(ARM_CHOICES), default="on",
                        help="arms of each bridge step: on = forwarded, off = none (no transcript lines), both = "
                             "forwarded and none, not-forwarded (lines parsed, LIVE_TRANSCRIPTS=off), all = the three")
    parser.add_argument("--pairs", type=int, default=1,
                        help="rounds of every step, the arms alternating (order rotated each round)")
    args = parser.parse_args(argv)
    if not shutil.which("node") or not shutil.which("taskset"):
        print("needs node (and npm) and taskset on the PATH", file=sys.stderr)
        return 2
    ensure_node_modules()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    results = []
    print(f"machine: {os.cpu_count()} cores ({Path('/proc/cpuinfo').read_text().split('model name')[1].split(':')[1].splitlines()[0].strip()}); "
          f"bridge: 1 gevent worker on cpu {args.bridge_cpu}; Redis, emulator, generator on cpu {args.other_cpu}",
          flush=True)
    layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    arms = ARM_CHOICES[args.transcripts]
    with stack(args.bridge_cpu, args.other_cpu, args.chunk_ms, args.reference, layers,
               args.logs, not_forwarded="not-forwarded" in arms) as (targets, emulator):
        for target in targets:  # warm-up (imports, caches, connection pools), short and unreported
            run_step(10, argparse.Namespace(**{**vars(args), "steady": 2.0, "settle": 1.0}), target, emulator)
        for calls in steps:
            for round_no in range(1, max(1, args.pairs) + 1):
                # Rotate the arms' order each round: a neighbour's burst, or a drift, lands on each arm in turn.
                shift = (round_no - 1) % len(arms)
                order = arms[shift:] + arms[:shift]
                runs: list[tuple[Target, bool, str]] = []
                for layer in layers:
                    for arm in order:
                        says, forwards = ARMS[arm]
                        (target,) = [t for t in targets if t.layer == layer and t.live_transcripts == forwards]
                        runs.append((target, says, arm))
                runs += [(t, True, "") for t in targets if not t.layer]  # the reference relay, once a round
                for target, says, arm in runs:
                    result = {**run_step(calls, args, target, emulator, says, arm), "rate": args.rate,
                              "round": round_no}
                    results.append(result)
                    print_step(result)
                    time.sleep(2)  # the previous step's sessions end
    for line in arm_summary(results):
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
