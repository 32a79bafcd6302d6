"""``python -m app.devtools.relay_cost [--callgrind]``: what one relayed call-second costs the relay's process,
sockets, framing and event loop included, in instructions (a figure load barely moves) or CPU time.

:mod:`app.devtools.forward_cost` counts the relay *core* with recorded sockets; the load benchmark
(``python -m app.devtools.loadtest``) a whole gunicorn worker in CPU time, which the machine's load moves by tens
of percent. This runs the production media path in one gevent process, on real loopback TCP: the carrier's side
is :class:`app.websocket.SansIoServer` (the ``sansio`` layer) behind :func:`app.relay.sockets.await_start`, the
Kallglot side :class:`app.kallglot.stream.KallglotStream` (:class:`app.websocket_sansio.SansIoClient`), between
them :class:`app.relay.core.MediaRelay` with the Twilio codec. The peers run in a separate process (not
counted): ``--calls`` Twilio-like callers, each sending ``connected``, ``start``, 50 ``media`` frames of 20 ms a
second paced in real time and a ``stop``; and a Kallglot-like echo answering every ``audio.input`` with an
``audio.output`` of the same μ-law, as the emulator does. Each relay run is made twice, ``--warm`` and ``--warm`` +
``--seconds`` seconds of audio; the difference is the steady cost per call-second (start-up, imports, handshakes
and the ends cancel out). ``--callgrind`` runs the relay process under ``valgrind --tool=callgrind`` (Ir);
keep ``--calls`` small there (valgrind runs ~50× slower and the peers keep real time).

The relay process's figure varies a little with timing (how many frames one wake-up finds), much less than CPU
time does with load; run ``--rounds`` to see it.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FRAMES_PER_SECOND, FRAME_BYTES, CHUNK_MS = 50, 160, 100
#: Bound on every wait (a stuck run fails instead of hanging).
STEP_TIMEOUT_SECONDS = 300.0


# -- the peers (their own process: their CPU is not the relay's) ------------------------------------------------
class _Streams:
    """How many relays have their Kallglot stream open: callers pace their audio only once all have (a relay
    still starting, slowed down by valgrind, would otherwise take the first frames in a burst)."""

    def __init__(self) -> None:
        self.open = 0
        self.changed = threading.Condition()

    def opened(self) -> None:
        """One more stream is open."""
        with self.changed:
            self.open += 1
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        """Block until ``count`` streams are open."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.open >= count, timeout=STEP_TIMEOUT_SECONDS):
                raise TimeoutError(f"only {self.open} of {count} Kallglot streams opened")


def _kallglot_echo(ws: Any, streams: _Streams) -> None:
    """Kallglot as the emulator echoes: each ``audio.input`` back as an ``audio.output`` of the same audio."""
    streams.opened()
    for raw in ws:
        message = json.loads(raw)
        if message.get("type") == "audio.input":
            ws.send(json.dumps({"type": "audio.output", "audio": {
                "encoding": "mulaw", "sample_rate_hz": 8000, "payload": message["audio"]["payload"]}}))
        elif message.get("type") == "ping":
            ws.send('{"type":"pong"}')


def _caller(relay_port: int, call: int, seconds: float, received: list[int], streams: _Streams, calls: int) -> None:
    """One Twilio-like caller: ``connected``, ``start``, paced ``media`` frames, ``stop``; counts what comes back."""
    from websockets.sync.client import connect

    sid, call_sid = f"MZ{call:032d}", f"CA{call:032d}"
    payload = base64.b64encode(bytes((call + n) % 256 for n in range(FRAME_BYTES))).decode()
    with connect(f"ws://127.0.0.1:{relay_port}/twilio/media", compression=None,
                 open_timeout=STEP_TIMEOUT_SECONDS) as ws:
        counter = threading.Thread(target=lambda: received.append(sum(1 for _ in ws)), daemon=True)
        ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
            "streamSid": sid, "callSid": call_sid, "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        counter.start()
        streams.wait_for(calls)
        started = time.monotonic()
        for n in range(int(seconds * FRAMES_PER_SECOND)):
            time.sleep(max(0.0, started + n / FRAMES_PER_SECOND - time.monotonic()))
            ws.send(json.dumps({"event": "media", "sequenceNumber": str(n + 2), "streamSid": sid, "media": {
                "track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20), "payload": payload}}))
        time.sleep(1.0)  # the last chunk's echo comes back before the stop
        ws.send(json.dumps({"event": "stop", "sequenceNumber": "0", "streamSid": sid,
                            "stop": {"callSid": call_sid}}))
        counter.join(STEP_TIMEOUT_SECONDS)


def run_peers(calls: int, seconds: float) -> None:
    """The peer process: print the Kallglot echo's port, read the relay's port, call, report frames echoed."""
    from websockets.sync.server import serve

    streams = _Streams()
    with serve(lambda ws: _kallglot_echo(ws, streams), "127.0.0.1", 0, compression=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(server.socket.getsockname()[1], flush=True)
        relay_port = int(sys.stdin.readline())
        received: list[int] = []
        callers = [threading.Thread(target=_caller, args=(relay_port, call, seconds, received, streams, calls))
                   for call in range(calls)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(STEP_TIMEOUT_SECONDS)
        print(json.dumps({"frames_back": sum(received)}), flush=True)
        server.shutdown()


# -- the relay (the measured process) ---------------------------------------------------------------------------
def run_relays(calls: int, kallglot_port: int, hold: str) -> None:
    """The relay process: accept ``calls`` carrier sockets and relay each until its ``stop``; print its figures."""
    from gevent import monkey

    monkey.patch_all()
    import gevent.event
    from gevent.server import StreamServer

    from app.carriers.twilio.codec import TwilioMediaCodec
    from app.kallglot.stream import KallglotStream
    from app.relay.core import MediaRelay
    from app.relay.sockets import await_start
    from app.websocket import SansIoServer

    # The uplink's hold (app.relay.uplink.DEFAULT_HOLD_MARGIN_MS) as in production, or another margin (0: off).
    options = {} if hold == "default" else {"hold_margin_ms": int(hold)}
    ends: list[str] = []
    holds: list[int] = []
    done = gevent.event.Event()

    def handle(sock: Any, address: Any) -> None:
        try:
            relay_one(sock)
        except BaseException as exc:  # a broken run ends at once, not at the timeout
            ends.append(f"error: {exc!r}")
            done.set()
            raise

    def relay_one(sock: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        request_line, *lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        environ = {"werkzeug.socket": sock, "RAW_URI": request_line.split(" ")[1]}
        for line in lines:
            key, _, value = line.partition(":")
            environ["HTTP_" + key.strip().upper().replace("-", "_")] = value.strip()
        ws = SansIoServer(environ)
        codec = TwilioMediaCodec()
        started = await_start(ws, codec)
        if started is None:
            raise RuntimeError("no start")
        stream = KallglotStream.open(f"ws://127.0.0.1:{kallglot_port}/stream", "token")
        relay = MediaRelay(ws, codec, stream, speaker="customer", chunk_ms=CHUNK_MS,
                           context=f"relay-cost call={started.call_id}", **options)
        ends.append(relay.run().value)
        holds.append(getattr(relay.uplink, "holds", 0))  # 0 on code without the hold (a comparison)
        if len(ends) >= calls:
            done.set()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    cpu_started = time.process_time()
    print(server.server_port, flush=True)
    if not done.wait(STEP_TIMEOUT_SECONDS) or len(ends) < calls:
        raise TimeoutError(f"only {len(ends)} of {calls} relays ended")
    server.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ends": ends, "holds": sum(holds), "cpu_seconds": time.process_time() - cpu_started,
                      "max_rss_kb": usage.ru_maxrss}), flush=True)


# -- the driver ---------------------------------------------------------------------------------------------------
def _own_line(stream: Any) -> str:
    """The relay's next line of its own (py-spy, sharing its stdout, writes lines of its own too)."""
    while True:
        line = stream.readline()
        if not line or line[0].isdigit() or line[0] == "{":
            return line


def run_once(calls: int, seconds: float, callgrind: bool, workdir: Path, profile: str = "",
             hold: str = "default", syscalls: bool = False) -> dict[str, Any]:
    """One relay process (under callgrind, or py-spy into ``profile``, when asked) and its peers; its figures."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    me = [sys.executable, "-m", "app.devtools.relay_cost"]
    peers = subprocess.Popen([*me, "--peers", str(calls), str(seconds)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    out = workdir / f"callgrind.{seconds}.out"
    relay_cmd = [*me, "--relays", str(calls), hold]
    if callgrind:
        relay_cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no", *relay_cmd]
    elif syscalls:  # strace's count of system calls by name (strace -c), written when the relay exits
        relay_cmd = ["strace", "-f", "-c", "-o", str(workdir / f"strace.{seconds}.txt"), *relay_cmd]
    elif profile:  # collapsed stacks (one line per stack and its sample count), 250 samples a second
        relay_cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--rate", "250", "--nonblocking", "--output", profile,
                     "--", *relay_cmd]
    try:
        assert peers.stdout is not None and peers.stdin is not None
        kallglot_port = peers.stdout.readline().strip()
        relay = subprocess.Popen([*relay_cmd, kallglot_port], stdout=subprocess.PIPE, text=True, env=env,
                                 stderr=subprocess.DEVNULL if callgrind else None)
        assert relay.stdout is not None
        peers.stdin.write(_own_line(relay.stdout))
        peers.stdin.flush()
        figures = json.loads(_own_line(relay.stdout))
        figures.update(json.loads(peers.stdout.readline()))
        relay.wait(STEP_TIMEOUT_SECONDS)
    finally:
        peers.kill()
        peers.wait()
    if any(end != "carrier_stop" for end in figures["ends"]):
        raise RuntimeError(f"a relay did not end with the carrier's stop: {figures['ends']}")
    if syscalls:  # strace -c's table: "% time  seconds  usecs/call  calls  [errors]  syscall"
        table = (workdir / f"strace.{seconds}.txt").read_text()
        figures["syscalls"] = {m.group(2): int(m.group(1)) for m in re.finditer(
            r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)\s*$", table, re.MULTILINE)}
    if callgrind:
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.MULTILINE)
        if summary is None:
            raise RuntimeError("callgrind wrote no instruction count")
        figures["instructions"] = int(summary.group(1))
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peers"]:
        run_peers(int(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["--relays"]:
        run_relays(int(argv[1]), int(argv[3]), argv[2])
        return 0
    parser = argparse.ArgumentParser(prog="python -m app.devtools.relay_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of audio per call")
    parser.add_argument("--warm", type=float, default=2.0, help="seconds of the short run subtracted")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--holds", default="default", help="comma-separated uplink hold margins in ms, each "
                        "measured in every round: 'default' (production's), 0 (no hold), or another margin")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind's callgrind")
    parser.add_argument("--syscalls", action="store_true", help="count the relay's system calls (strace -c)")
    parser.add_argument("--profile", default="", help="py-spy the long run's relay process into this file "
                        "(collapsed stacks)")
    args = parser.parse_args(argv)
    if args.callgrind and not shutil.which("valgrind"):
        print("--callgrind needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    print(f"relay_cost: {args.calls} calls, {args.seconds:g} s measured ({args.warm:g} s subtracted), "
          f"{'instructions (callgrind)' if args.callgrind else 'CPU time'}; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    call_seconds = args.calls * args.seconds
    for n, hold in ((n, hold) for n in range(1, args.rounds + 1) for hold in args.holds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            short = run_once(args.calls, args.warm, args.callgrind, Path(tmp), hold=hold, syscalls=args.syscalls)
            long = run_once(args.calls, args.warm + args.seconds, args.callgrind, Path(tmp), args.profile, hold,
                            args.syscalls)
        cpu_ms = (long["cpu_seconds"] - short["cpu_seconds"]) * 1000 / call_seconds
        line = f"round {n}, hold {hold}: CPU {cpu_ms:.2f} ms per call-second"
        if args.callgrind:
            per = (long["instructions"] - short["instructions"]) / call_seconds
            line += f" (under valgrind); {per:,.0f} instructions per call-second ({per / FRAMES_PER_SECOND:,.0f} " \
                    f"per caller frame)"
        if args.syscalls:
            calls = {name: (long["syscalls"].get(name, 0) - short["syscalls"].get(name, 0)) / call_seconds
                     for name in long["syscalls"]}
            top = sorted(calls.items(), key=lambda item: -item[1])[:6]
            line += "; system calls per call-second: " + ", ".join(f"{name} {n:.1f}" for name, n in top)
        print(f"{line}; frames echoed back {short['frames_back']} / {long['frames_back']}, uplink holds "
              f"{short['holds']} / {long['holds']}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
