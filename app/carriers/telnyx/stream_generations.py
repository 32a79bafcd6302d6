"""Which of a Call Control leg's media streams an event is about: a generation number per leg.

Telnyx's ``streaming.stopped`` has no ``stream_id`` (the SDK's ``CallStreamingStopped`` payload: ids,
``client_state``, ``stream_url``), so a stop cannot be told apart from the stop of a newer stream by its own
fields. Both it and ``streaming.failed`` do carry ``client_state`` ("state received from a command";
``start_streaming``'s own: "add state to every subsequent webhook"). So every ``start_streaming`` (and ``answer``)
carries the leg's current stream generation there (:data:`~app.carriers.telnyx.control.GENERATION_KEY`), kept in Redis
beside the leg's state (:meth:`app.redis_keys.RedisKeys.stream_generation`, in the leg's slot).

A restore first claims the loss of the generation it was told about, moving the leg to the next one in one
atomic step: a late, repeated or concurrent stop or failure of a generation that is no longer the newest finds
the claim taken and changes nothing — no second ``start_streaming`` whose stream would be refused as "another
relay is live", no restore counted twice.

An event whose client_state names no generation is about the newest stream: a later command's client_state
(the agent-unavailable ``speak`` on a streaming leg) may be the one Telnyx echoes, and taking such a loss for a
stale one would leave the caller in silence; a call answered before generations existed has only generation 0.
"""
from __future__ import annotations

from app.extensions import Services
from app.redis_keys import RECORD_TTL_SECONDS, as_text
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.control import GENERATION_KEY
from app.carriers.telnyx.events import CallEvent

#: Claims the loss of generation ARGV[1]: the leg moves to ARGV[1] + 1 unless it is already past ARGV[1]
#: (then -1: that stream was replaced, its loss handled). A generation ahead of the stored one (the key expired
#: or was lost with a Redis restart) is believed: the event is Telnyx's echo of what we sent.
_CLAIM_LOSS = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local lost = tonumber(ARGV[1])
if current > lost then return -1 end
redis.call('SET', KEYS[1], lost + 1, 'EX', ARGV[2])
return lost + 1
"""
#: Generations are small counters; anything longer in client_state is not ours.
_MAX_DIGITS = 9


def generation_of(event: CallEvent) -> int | None:
    """The stream generation the event's ``client_state`` names (None when it names none)."""
    value = event.state.get(GENERATION_KEY, "")
    return int(value) if value.isdigit() and len(value) <= _MAX_DIGITS else None


def current_generation(svc: Services, session_id: str, call_id: str) -> int:
    """The generation of the leg's newest stream (0 before any restore)."""
    value = as_text(svc.redis.get(svc.keys.stream_generation(session_id, CARRIER, call_id)))
    return int(value) if value and value.isdigit() else 0


def claim_loss(svc: Services, session_id: str, call_id: str, generation: int) -> int | None:
    """Claim the handling of generation ``generation``'s loss: the next stream's generation, or None when a newer
    stream already replaced it (the event is stale, or another worker is handling the same loss)."""
    claimed = int(svc.redis.eval(_CLAIM_LOSS, 1, svc.keys.stream_generation(session_id, CARRIER, call_id),
                                 str(generation), str(RECORD_TTL_SECONDS)))
    return claimed if claimed > 0 else None
