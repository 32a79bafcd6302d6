"""Throw hostile bodies and sockets at one bridge worker while a real simulated call goes through it.

``python -m app.devtools.hostile`` starts a private redis-server, the Kallglot emulator and the bridge
(gunicorn + gevent, ONE worker, this repository's gunicorn.conf.py) on loopback ports, measures the worker's
resident memory at idle, then — while a paced Twilio call with 20 s of random μ-law audio runs through that
same worker — sends, all bounded in count and time and to 127.0.0.1 only:

- chunked POSTs of 16 MiB (no Content-Length) to a webhook, the call API and a body-less route;
- POSTs announcing 256 MiB with ``Content-Length`` and streaming until the server stops them;
- bodies of 200 000 ``[`` (deep JSON nesting) to every JSON route;
- sockets that send half a request line and stall, and bare ``/telnyx/media`` upgrades that never ``start``;
- forged Telnyx ``start`` frames with 200 KB ids; a ``/readyz`` and ``/metrics`` flood.

It prints the worker's RSS above idle (peak), every status seen per attack, whether any request got a 5xx,
how long ``/healthz`` took meanwhile, and whether the call's audio came back byte-exact. Exit status 1 when
the call was damaged, a 5xx was seen, or memory grew by ``--max-rss-mib`` (default 50) or more.
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from app.devtools.localstack import free_port, run_gunicorn, run_redis
from app.devtools.simulator.twilio import TwilioCallSimulator

EMULATOR_KEY = "sk_test_emulator"
AUTH_TOKEN = "hostile-run-twilio-token"
TO, FROM = "+15005550006", "+14155550142"
MIB = 1024 * 1024
#: A loaded machine (shared CI) can take a minute to import the SDKs; the attack itself is bounded separately.
READY_TIMEOUT_SECONDS = 120.0


def worker_pid(master_pid: int) -> int:
    """The one gunicorn worker's pid (the master's only child)."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one worker, found {children}")
    return int(children[0])


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))


class Tally:
    """Outcomes per attack (HTTP status, or what happened to the socket), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def add(self, attack: str, outcome: object) -> None:
        with self._lock:
            self.seen[attack][str(outcome)] += 1

    def server_errors(self) -> int:
        """5xx answers, except ``/readyz``'s 503, which is its way of saying "not ready" (an overloaded worker)."""
        return sum(n for attack, c in self.seen.items() for k, n in c.items()
                   if k.isdigit() and int(k) >= 500 and not (attack.endswith("/readyz") and k == "503"))


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    block = b"[" * size
    for _ in range(total // size):
        yield block


def chunked_post(base: str, path: str, tally: Tally) -> None:
    """A 16 MiB chunked body: the server must stop it at its limit."""
    try:
        response = requests.post(base + path, data=_chunks(16 * MIB), timeout=20,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer hostile"})
        tally.add("chunked 16 MiB " + path, response.status_code)
    except requests.RequestException as exc:
        tally.add("chunked 16 MiB " + path, f"closed ({type(exc).__name__})")


def announced_post(port: int, path: str, tally: Tally) -> None:
    """Announce 256 MiB with Content-Length and stream until the server answers or closes (≤ 10 s)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {256 * MIB}\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(0.001)
            deadline = time.monotonic() + 10
            status = "no answer"
            sent = 0
            while time.monotonic() < deadline and sent < 256 * MIB:
                try:
                    reply = sock.recv(64)
                    status = reply.split(b" ", 2)[1].decode() if reply else "closed"
                    break
                except (socket.timeout, BlockingIOError):
                    pass
                sock.settimeout(5)
                try:
                    sock.sendall(b"[" * (256 * 1024))
                except socket.timeout:  # the server stopped reading: its answer is what counts
                    sock.settimeout(5)
                    reply = sock.recv(64)
                    status = reply.split(b" ", 2)[1].decode() if reply else "closed"
                    break
                sent += 256 * 1024
                sock.settimeout(0.001)
            tally.add("Content-Length 256 MiB " + path, status)
    except OSError as exc:
        tally.add("Content-Length 256 MiB " + path, f"closed ({type(exc).__name__})")


def nested_json(base: str, path: str, tally: Tally) -> None:
    """200 000 ``[``: a RecursionError in any parser would be a 500."""
    try:
        response = requests.post(base + path, data="[" * 200_000, timeout=10,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer hostile"})
        tally.add("nested JSON " + path, response.status_code)
    except requests.RequestException as exc:
        tally.add("nested JSON " + path, f"error ({type(exc).__name__})")


def stalled_sockets(port: int, count: int, hold_seconds: float, tally: Tally, request: bytes) -> None:
    """``count`` sockets that send ``request`` and then nothing; how many the server closes within the hold."""
    sockets = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(request)
            sockets.append(sock)
        except OSError:
            tally.add("stalled " + request[:20].decode(errors="replace"), "connect failed")
    deadline = time.monotonic() + hold_seconds
    label = "stalled " + ("media upgrade" if b"Upgrade" in request else "half request line")
    for sock in sockets:
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            while sock.recv(4096):
                pass
            tally.add(label, "closed by server")
        except (socket.timeout, OSError):
            tally.add(label, "still open at the end")
        finally:
            sock.close()


UPGRADE = (b"GET /telnyx/media HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def forged_starts(base: str, count: int, tally: Tally) -> None:
    """Telnyx ``start`` frames with 200 KB ids and no token: each socket must be closed, nothing called."""
    from simple_websocket import Client, ConnectionClosed

    for _ in range(count):
        ws = Client.connect(base.replace("http", "ws") + "/telnyx/media")
        huge = "v3:" + "A" * 200_000
        ws.send(json.dumps({"event": "start", "stream_id": huge, "start": {"call_control_id": huge}}))
        try:
            while ws.receive(timeout=3) is not None:
                pass
            tally.add("forged Telnyx start", "still open")
        except ConnectionClosed as exc:
            tally.add("forged Telnyx start", f"closed {exc.reason}")


def flood(base: str, path: str, count: int, tally: Tally) -> None:
    """``count`` GETs of ``path``, 50 at a time."""
    def one(_: int) -> None:
        try:
            tally.add("flood " + path, requests.get(base + path, timeout=10).status_code)
        except requests.RequestException as exc:
            tally.add("flood " + path, f"error ({type(exc).__name__})")

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(one, range(count)))


def healthz_latency(base: str, stop: threading.Event, samples: list[float]) -> None:
    """Time ``/healthz`` every 200 ms while the attack runs."""
    while not stop.wait(0.2):
        started = time.monotonic()
        try:
            requests.get(base + "/healthz", timeout=10)
            samples.append(time.monotonic() - started)
        except requests.RequestException:
            samples.append(float("inf"))


def _wait_for_live_stream(emulator_url: str, timeout: float = 60.0) -> None:
    """Until the emulator holds one live stream connection (the simulated call is relaying)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = requests.get(emulator_url + "/_emulator/stats", timeout=5).json()
        if stats.get("connections_live"):
            return
        time.sleep(0.1)
    raise RuntimeError("the simulated call never started streaming")


def run(args: argparse.Namespace) -> int:
    """Start the stack, attack, report; 0 when the call survived intact and memory stayed bounded."""
    with run_redis() as redis_url, \
            run_gunicorn("app.devtools.emulator:create_emulator_app()", {"KALLGLOT_EMULATOR_API_KEY": EMULATOR_KEY},
                         ready_path="/_emulator/stats", ready_timeout=READY_TIMEOUT_SECONDS) as emulator:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"KALLGLOT_API_URL": emulator.url + "/v1", "KALLGLOT_API_KEY": EMULATOR_KEY, "REDIS_URL": redis_url,
               "REDIS_NAMESPACE": f"hostile-{os.getpid()}", "PUBLIC_URL": base,
               "SECRET_KEY": os.urandom(16).hex(), "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
               "TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "API_TOKEN": "the-real-token",
               "KALLGLOT_WEBHOOK_SECRET": "whsec_hostile", "DEFAULT_SOURCE_LANGUAGE": "en",
               "DEFAULT_TARGET_LANGUAGE": "es", "WEB_CONCURRENCY": "1"}
        with run_gunicorn("app:create_app()", env, workers=1, port=port,
                          ready_timeout=READY_TIMEOUT_SECONDS) as bridge:
            pid = worker_pid(bridge.process.pid)
            for _ in range(3):  # warm every route once so imports and first-use caches count as idle
                requests.get(base + "/readyz", timeout=10)
                requests.get(base + "/metrics", timeout=10)
            time.sleep(0.5)
            idle = rss_mib(pid)
            tally = Tally()
            audio = os.urandom(args.call_seconds * 8000)
            sim = TwilioCallSimulator(base, AUTH_TOKEN, account_sid="AC" + "0" * 32)
            result_box: list[Any] = []
            call = threading.Thread(target=lambda: result_box.append(
                sim.place_call(TO, FROM, audio, pace=True, listen_seconds=2.0)), daemon=True)
            stop_probe = threading.Event()
            latencies: list[float] = []
            probe = threading.Thread(target=healthz_latency, args=(base, stop_probe, latencies), daemon=True)
            attacks: list[Callable[[], None]] = []
            for path in ("/kallglot/webhooks", "/api/calls", "/healthz", "/twilio/voice"):
                attacks += [lambda p=path: chunked_post(base, p, tally)] * args.repeat
                attacks += [lambda p=path: announced_post(port, p, tally)] * args.repeat
            for path in ("/kallglot/webhooks", "/api/calls", "/telnyx/call-control", "/healthz"):
                attacks += [lambda p=path: nested_json(base, p, tally)] * args.repeat
            attacks += [lambda: stalled_sockets(port, args.sockets, 8, tally, b"GET /healthz HT"),
                        lambda: stalled_sockets(port, args.sockets, 8, tally, UPGRADE),
                        lambda: forged_starts(base, 5, tally),
                        lambda: flood(base, "/readyz", 300, tally),
                        lambda: flood(base, "/metrics", 300, tally)]
            started = time.monotonic()
            with RssSampler(pid) as sampler:
                call.start()
                _wait_for_live_stream(emulator.url)  # the attack starts once the call's audio flows
                probe.start()
                with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                    list(pool.map(lambda attack: attack(), attacks))
                call.join(timeout=args.call_seconds + 30)
                stop_probe.set()
                probe.join(timeout=12)
            elapsed = time.monotonic() - started
            after = rss_mib(pid)
            emulator_sessions = requests.get(emulator.url + "/_emulator/sessions", timeout=5).json()["sessions"]

    result = result_box[0] if result_box else None
    received = b""
    for session in emulator_sessions:
        received = base64.b64decode(session.get("audio_received", {}).get("customer", "")) or received
    audio_intact = bool(result) and received == audio and not result.protocol_errors and not result.errors
    echoed_ok = bool(result) and audio.startswith(bytes(result.heard_audio)) and len(result.heard_audio) > 0
    grew = sampler.peak - idle
    print(f"hostile run: {len(attacks)} attacks in {elapsed:.1f}s against one worker (pid {pid}), loopback only")
    for attack, outcomes in sorted(tally.seen.items()):
        print(f"  {attack:<45} {dict(outcomes)}")
    finite = sorted(x for x in latencies if x != float("inf"))
    if finite:
        print(f"  /healthz during the attack: {len(latencies)} probes, median {finite[len(finite) // 2] * 1000:.0f} ms, "
              f"max {finite[-1] * 1000:.0f} ms, failed {len(latencies) - len(finite)}")
    print(f"worker RSS: idle {idle:.1f} MiB, peak {sampler.peak:.1f} MiB (+{grew:.1f} MiB), after {after:.1f} MiB")
    print(f"call: {args.call_seconds}s of audio; Kallglot received {len(received)} of {len(audio)} bytes, "
          f"byte-exact: {received == audio}; "
          f"caller heard {len(result.heard_audio) if result else 0} bytes of echo, in order: {echoed_ok}; "
          f"protocol errors: {result.protocol_errors if result else 'no result'}")
    if result and (result.errors or result.webhook_status != 200):
        print(f"call errors: webhook {result.webhook_status}, {result.errors}")
    print(f"5xx responses (not counting /readyz's 503 'not ready'): {tally.server_errors()}")
    ok = audio_intact and echoed_ok and tally.server_errors() == 0 and grew < args.max_rss_mib
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--call-seconds", type=int, default=20, help="length of the simulated call's audio")
    parser.add_argument("--repeat", type=int, default=2, help="how often each body attack is sent per route")
    parser.add_argument("--sockets", type=int, default=300, help="stalled sockets of each kind")
    parser.add_argument("--concurrency", type=int, default=8, help="attacks running at once")
    parser.add_argument("--max-rss-mib", type=float, default=50.0, help="fail when the worker grows this much")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
