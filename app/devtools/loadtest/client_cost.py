"""``python -m app.devtools.loadtest.client_cost``: CPU per round trip of the relay's Kallglot stream socket.

A load-independent companion to the load benchmark (CPU time of this process only, not wall time: other processes
on the machine change it little). Under gevent, as in the bridge's worker, one client sends an ``audio.input`` of
100 ms and waits for the peer's ``audio.output`` (also 100 ms), ``--round-trips`` times, with

- simple-websocket's ``Client`` (wsproto, a reader greenlet per socket and a condition-variable hand-off: what
  the Kallglot stream socket was), and
- :class:`app.websocket_sansio.SansIoClient` (websockets' sans-I/O protocol read in the caller's greenlet: what
  it is now),

alternating, ``--repeat`` times each. The peer is a separate process (websockets' threaded server), so its CPU is
not counted. The figure includes the greenlet switches and socket calls, unlike ``framing_cost``.

It also prints what a gevent timer costs a waited ``recv``: ping-pong on a socketpair with the socket's timeout
``None`` (no timer) and 0.25 s (gevent arms and cancels a timer per wait, as each ``receive(timeout)`` does).
"""
from __future__ import annotations

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import argparse  # noqa: E402 - after the monkey-patching, as in the bridge's worker
import base64  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from app.kallglot import stream_protocol  # noqa: E402
from app.websocket_sansio import SansIoClient  # noqa: E402

REPLY = json.dumps({"type": "audio.output", "audio": {"encoding": "mulaw", "sample_rate_hz": 8000,
                                                      "payload": base64.b64encode(b"\x7f" * 800).decode()}})


def serve_peer(port_out: Any) -> None:
    """The peer (run in its own process): answer every message with one 100 ms ``audio.output``."""
    from websockets.sync.server import serve

    def handler(ws: Any) -> None:
        for _ in ws:
            ws.send(REPLY)

    with serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(server.socket.getsockname()[1], file=port_out, flush=True)
        server.serve_forever()


def cpu_seconds() -> float:
    """User + system CPU of this process (every greenlet of it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(connect: Callable[[], Any], round_trips: int) -> float:
    """µs of this process's CPU per send + receive."""
    ws = connect()
    message = stream_protocol.audio_input(base64.b64encode(b"\x11" * 800).decode(), sequence=1, timestamp_ms=0,
                                          speaker="customer")
    for _ in range(200):  # warm-up
        ws.send(message)
        ws.receive(timeout=5)
    started = cpu_seconds()
    for _ in range(round_trips):
        ws.send(message)
        if ws.receive(timeout=5) is None:
            raise RuntimeError("the peer did not answer within 5 s")
    cost = (cpu_seconds() - started) / round_trips * 1e6
    ws.close()
    return cost


def timer_cost(round_trips: int) -> dict[str, float]:
    """CPU µs per ping-pong on a socketpair (two waited ``recv``, one with the measured timeout setting)."""
    import socket

    import gevent

    results: dict[str, float] = {}
    for label, timeout in (("no timeout (no timer)", None), ("0.25 s timeout (a timer per wait)", 0.25)):
        near, far = socket.socketpair()

        def echo() -> None:
            for _ in range(round_trips):
                far.recv(16)
                far.send(b"x")

        near.settimeout(timeout)
        echoer = gevent.spawn(echo)
        started = cpu_seconds()
        for _ in range(round_trips):
            near.send(b"x")
            near.recv(16)
        results[label] = (cpu_seconds() - started) / round_trips * 1e6
        echoer.join()
        near.close()
        far.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Start the peer, measure both clients alternately, print µs per round trip."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.loadtest.client_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        serve_peer(sys.stdout)
        return 0
    peer = subprocess.Popen([sys.executable, "-m", "app.devtools.loadtest.client_cost", "--peer"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        url = f"ws://127.0.0.1:{int(peer.stdout.readline())}/"
        from simple_websocket import Client
        clients: dict[str, Callable[[], Any]] = {
            "simple-websocket Client (before)": lambda: Client.connect(url),
            "SansIoClient (now)": lambda: SansIoClient.connect(url, timeout=5),
        }
        print(f"{args.round_trips} round trips (a 100 ms audio.input out, a 100 ms audio.output back) per run; "
              f"CPU µs of the client's process per round trip", flush=True)
        results: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.repeat):
            for name, connect in clients.items():
                results[name].append(measure(connect, args.round_trips))
                time.sleep(0.2)
        for name, costs in results.items():
            print(f"  {name:34} " + " / ".join(f"{c:5.1f}" for c in costs), flush=True)
        timers = [timer_cost(args.round_trips * 4) for _ in range(args.repeat)]
        print(f"{args.round_trips * 4} ping-pongs on a socketpair under gevent; CPU µs per ping-pong", flush=True)
        for label in timers[0]:
            print(f"  {label:34} " + " / ".join(f"{t[label]:5.1f}" for t in timers), flush=True)
    finally:
        peer.terminate()
        peer.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
