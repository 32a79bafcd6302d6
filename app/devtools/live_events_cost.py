"""``python -m app.devtools.live_events_cost``: CPU the live console's event forwarding costs a relay process.

Each simulated second, 200 calls each say one transcript line (the issue's load); every line is parsed as the
relay parses it and handed to :class:`~app.calls.events.EventForwarder` (the relay's side), then the writer
drains it into a private Redis. Prints the CPU per event on the relay side and in the whole process (writer
and Redis client included), and that total for 200 lines a second as a share of the relay CPU 200 calls use
(3.4–4.2 ms per call-second, the reference in shared/engineering-notes.md). This is an estimate from a
micro-benchmark; the issue's figure is the load benchmark's, on a quiet machine.
"""
from __future__ import annotations

import time

import redis

from app.calls.events import TRANSCRIPT, EventForwarder, SessionEventLog, transcript_event
from app.devtools.localstack import run_redis
from app.kallglot.stream_protocol import Transcript, parse_server_message
from app.redis_keys import RedisKeys

CALLS, SECONDS = 200, 100
LINE = ('{"type":"transcript.final","id":"u1","speaker":"customer","language":"en","text":"I ordered a blue '
        'jacket last week","translation":{"language":"es","text":"Pedí una chaqueta azul la semana pasada"}}')
RELAY_MS_PER_CALL_SECOND = (3.4, 4.2)


def measure(client: redis.Redis) -> tuple[float, float, int]:
    """(relay-side µs per event, whole-process µs per event, events dropped)."""
    forwarder = EventForwarder(SessionEventLog(client, RedisKeys("cost-bench")))
    forwarder.publish("warm-up", TRANSCRIPT, {})
    forwarder.flush(10)
    relay_side, started = 0.0, time.process_time()
    for _ in range(SECONDS):
        t0 = time.thread_time()
        for call in range(CALLS):
            line = parse_server_message(LINE)
            assert isinstance(line, Transcript)
            forwarder.publish(f"sess_{call}", TRANSCRIPT, transcript_event(
                speaker=line.speaker, text=line.text, final=line.final, language=line.language,
                translation=line.translation, translation_language=line.translation_language, item_id=line.item_id))
        relay_side += time.thread_time() - t0
        forwarder.flush(10)  # the writer drains what one second produced
    total = time.process_time() - started
    events = CALLS * SECONDS
    return relay_side / events * 1e6, total / events * 1e6, forwarder.dropped


def main() -> None:
    """Run the measurement against a private redis-server and print the figures."""
    with run_redis() as url:
        relay_us, total_us, dropped = measure(redis.Redis.from_url(url))
    per_second_ms = CALLS * total_us / 1000
    low, high = (per_second_ms / (CALLS * ms) * 100 for ms in reversed(RELAY_MS_PER_CALL_SECOND))
    print(f"{CALLS * SECONDS} transcript events, {dropped} dropped")
    print(f"relay side (parse + publish): {relay_us:.1f} µs/event; whole process incl. writer: {total_us:.1f} µs/event")
    print(f"{CALLS} calls × 1 line/s: {per_second_ms:.1f} ms CPU/s = {low:.1f}–{high:.1f} % of their relay CPU")


if __name__ == "__main__":
    main()
