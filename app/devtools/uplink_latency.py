"""``python -m app.devtools.uplink_latency``: how long the end of what a caller said takes to reach Kallglot.

A carrier that suppresses silence sends nothing between utterances, so the last, half-full uplink batch of an
utterance waits for ``UPLINK_QUIET_FLUSH_MS`` (or, with it off, for the caller's next word). This script runs the
relay core in-process between a paced carrier (20 ms frames in real time, utterances of random length, nothing
during the pauses between them) and the Kallglot emulator (``echo``) under gunicorn, and times, per frame,
*frame handed to the relay → its audio echoed back to the carrier*. It prints, for each quiet time:

- **end of speech**: the last frame of each utterance → its echo (the latency this setting is about),
- **every frame**: the batching delay all audio sees (on average (chunk − 20) / 2 ms plus the echo).

The echo includes the emulator and two loopback hops (about a millisecond on an idle machine). With the flush
off the end of speech waits for the next utterance: that figure is the pause length, shown as such.
"""
from __future__ import annotations

import argparse
import base64
import json
import queue
import random
import statistics
import threading
import time

import requests

from app.carriers.twilio.media import TwilioMediaCodec
from app.devtools.localstack import run_gunicorn
from app.kallglot.client import KallglotClient
from app.kallglot.stream import KallglotStream
from app.relay.core import MediaRelay

API_KEY = "sk_test_uplink_latency"
STREAM_SID = "MZ" + "5" * 32
FRAME_BYTES, FRAME_SECONDS = 160, 0.02


class PacedCarrier:
    """The carrier's side: frames the script queues, and the time each tagged frame's echo came back."""

    def __init__(self) -> None:
        self.connected = True
        self.inbox: queue.Queue[str] = queue.Queue()
        self.echoed_at: dict[int, float] = {}

    def receive(self, timeout: float | None = None) -> str | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, data: str | bytes) -> None:
        now = time.perf_counter()
        message = json.loads(data)
        if message.get("event") != "media":
            return
        audio = base64.b64decode(message["media"]["payload"])
        for offset in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
            self.echoed_at.setdefault(int.from_bytes(audio[offset:offset + 2], "big"), now)

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.connected = False

    def frame(self, tag: int) -> None:
        payload = tag.to_bytes(2, "big") + b"\x7f" * (FRAME_BYTES - 2)
        self.inbox.put(json.dumps({"event": "media", "streamSid": STREAM_SID,
                                   "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()}}))


def measure(emulator_url: str, *, quiet_ms: int, chunk_ms: int, utterances: int, pause_ms: int,
            seed: int) -> tuple[list[float], list[float]]:
    """(end-of-speech latencies, every frame's latency) in ms for one quiet time."""
    session = KallglotClient(emulator_url + "/v1", API_KEY).create_session(
        mode="ai_agent", idempotency_key=f"uplink-latency-{quiet_ms}-{time.time_ns()}")
    codec = TwilioMediaCodec()
    codec.parse(json.dumps({"event": "start", "streamSid": STREAM_SID,
                            "start": {"callSid": "CA" + "5" * 32, "streamSid": STREAM_SID}}))
    carrier = PacedCarrier()
    relay = MediaRelay(carrier, codec, KallglotStream.open(session.stream.url, session.stream.token),
                       speaker="customer", chunk_ms=chunk_ms, context="uplink-latency", quiet_flush_ms=quiet_ms)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    rng = random.Random(seed)
    sent_at: dict[int, float] = {}
    last_frames: list[int] = []
    tag, next_at = 1, time.perf_counter()
    for _ in range(utterances):
        for _ in range(rng.randint(8, 60)):  # 160 ms – 1.2 s of speech: every batch fill level occurs
            next_at += FRAME_SECONDS
            time.sleep(max(next_at - time.perf_counter(), 0.0))
            sent_at[tag] = time.perf_counter()
            carrier.frame(tag)
            tag += 1
        last_frames.append(tag - 1)
        next_at += pause_ms / 1000  # silence suppressed: no frames at all
    time.sleep(max(next_at - time.perf_counter(), 0.0) + 0.2)
    carrier.inbox.put(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {}}))
    thread.join(timeout=10)
    latency = {t: (carrier.echoed_at[t] - sent_at[t]) * 1000 for t in sent_at if t in carrier.echoed_at}
    end_of_speech = [latency[t] for t in last_frames if t in latency]
    return end_of_speech, list(latency.values())


def summary(values: list[float]) -> str:
    """p50 / p95 / max of ``values`` in ms."""
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{statistics.median(ordered):6.1f} / {p95:6.1f} / {ordered[-1]:6.1f}"


def main(argv: list[str] | None = None) -> None:
    """Start the emulator, measure each quiet time, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m app.devtools.uplink_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet-ms", default="0,20,40,80", help="UPLINK_QUIET_FLUSH_MS values (comma-separated)")
    parser.add_argument("--chunk-ms", type=int, default=100, help="UPLINK_CHUNK_MS")
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--pause-ms", type=int, default=600, help="silence (no frames) between utterances")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)
    with run_gunicorn("app.devtools.emulator:create_emulator_app()", {"KALLGLOT_EMULATOR_API_KEY": API_KEY,
                                                                      "LOG_LEVEL": "WARNING"},
                      ready_path="/_emulator/stats") as emulator:
        requests.post(emulator.url + "/_emulator/behaviour", json={"behaviour": "echo"}, timeout=5).raise_for_status()
        print(f"UPLINK_CHUNK_MS={args.chunk_ms}, {args.utterances} utterances of 160–1200 ms, "
              f"{args.pause_ms} ms pauses without frames; ms p50 / p95 / max (relay + emulator echo)")
        for quiet_ms in (int(q) for q in args.quiet_ms.split(",")):
            end_of_speech, every_frame = measure(emulator.url, quiet_ms=quiet_ms, chunk_ms=args.chunk_ms,
                                                 utterances=args.utterances, pause_ms=args.pause_ms, seed=args.seed)
            label = f"UPLINK_QUIET_FLUSH_MS={quiet_ms}" + (" (off)" if quiet_ms == 0 else "")
            print(f"{label:32} end of speech {summary(end_of_speech)}   every frame {summary(every_frame)}"
                  f"   (n={len(end_of_speech)}/{len(every_frame)})", flush=True)


if __name__ == "__main__":
    main()
