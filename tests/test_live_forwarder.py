"""The relay's event forwarder (issue 16): partials replaced within a batch are not written, everything else is, in
order; more than a batch goes out in several; what the page would show is unchanged."""
from __future__ import annotations

import redis as redis_lib

from app.calls.events import LEG, TRANSCRIPT, EventForwarder, SessionEventLog, leg_event
from app.calls.forwarder import coalesce_partials
from app.kallglot.stream_protocol import Transcript
from app.redis_keys import RedisKeys
from app.relay.bridge import transcript_forwarder


def line(session_id: str, text: str, *, final: bool = False, item: str = "", speaker: str = "customer"
         ) -> tuple[str, str, dict[str, object]]:
    """A transcript event as the writer sees it once built."""
    data: dict[str, object] = {"speaker": speaker, "text": text, "final": final}
    if item:
        data["item"] = item
    return (session_id, TRANSCRIPT, data)


def test_a_partial_is_left_out_only_when_a_later_line_of_the_batch_replaces_it() -> None:
    leg = ("s1", LEG, {"state": "started"})
    events = [
        line("s1", "Hel", item="u1"),                 # replaced by the next partial of u1: out
        leg,
        line("s1", "Hello", item="u1"),               # replaced by u1's final: out
        line("s2", "Hello", item="u1"),               # another session's u1: kept
        line("s1", "Hello there", final=True, item="u1"),
        line("s1", "And", item="u2"),                 # nothing replaces it in this batch: kept
        line("s1", "x", speaker="agent"),             # no id: replaced by the agent's next line: out
        line("s1", "y", speaker="customer"),          # no id, another speaker: kept
        line("s1", "xy", speaker="agent"),
        line("s1", "Done", final=True, item="u3"),    # a final is never left out ...
        line("s1", "Done", final=True, item="u3"),    # ... not even when repeated (the other leg's copy)
    ]
    kept = coalesce_partials(events)
    assert [(e[0], e[1], e[2].get("text")) for e in kept] == [
        ("s1", LEG, None), ("s2", TRANSCRIPT, "Hello"), ("s1", TRANSCRIPT, "Hello there"), ("s1", TRANSCRIPT, "And"),
        ("s1", TRANSCRIPT, "y"), ("s1", TRANSCRIPT, "xy"), ("s1", TRANSCRIPT, "Done"), ("s1", TRANSCRIPT, "Done")]
    assert coalesce_partials(events[:1]) == events[:1]


def test_the_forwarder_writes_what_the_page_would_show(redis_client: redis_lib.Redis, namespace: str) -> None:
    # A long linger: every line below lands in one batch even on a loaded machine.
    log = SessionEventLog(redis_client, RedisKeys(namespace))
    forwarder = EventForwarder(log, linger_seconds=1.0)
    forward = transcript_forwarder(forwarder, "sess_c", "customer")
    forward(Transcript(final=False, speaker="customer", text="Hel", item_id="u1"))
    forward(Transcript(final=False, speaker="customer", text="Hello", item_id="u1"))
    assert forwarder.publish("sess_c", LEG, leg_event(carrier="twilio", call_id="CA1", speaker="agent",
                                                       state="agent_joined"))
    forward(Transcript(final=True, speaker="customer", text="Hello", language="en", translation="Hola",
                       translation_language="es", item_id="u1"))
    forward(Transcript(final=False, speaker="customer", text="How", item_id="u2"))
    assert forwarder.flush(timeout=10)
    assert (forwarder.batches, forwarder.written, forwarder.coalesced, forwarder.dropped) == (1, 5, 2, 0)
    kept = [(e.kind, e.data.get("text"), e.data.get("final"), e.data.get("translation"))
            for e in log.latest("sess_c", 10)]
    assert kept == [(LEG, None, None, None), (TRANSCRIPT, "Hello", True, "Hola"), (TRANSCRIPT, "How", False, None)]
    # A partial written in an earlier batch stays (the page may have shown it); its final follows it.
    forward(Transcript(final=True, speaker="customer", text="How are you", item_id="u2"))
    assert forwarder.flush(timeout=10) and forwarder.coalesced == 2 and log.length("sess_c") == 4


def test_more_than_a_batch_goes_out_in_several_in_order(redis_client: redis_lib.Redis, namespace: str) -> None:
    log = SessionEventLog(redis_client, RedisKeys(namespace))
    forwarder = EventForwarder(log, linger_seconds=0.2, batch_size=10)
    for n in range(25):
        assert forwarder.publish("sess_many", TRANSCRIPT, {"text": str(n), "final": True})
    assert forwarder.flush(timeout=10)
    assert forwarder.written == 25 and forwarder.batches == 3 and forwarder.dropped == 0
    assert [e.data["text"] for e in log.latest("sess_many", 100)] == [str(n) for n in range(25)]
    assert not forwarder._pending and forwarder.flush(timeout=0)  # nothing left, the writer idle
