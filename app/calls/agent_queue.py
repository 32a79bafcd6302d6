"""Calls waiting for an agent in the browser: offered, taken by the first agent who clicks, or given up.

Vendor-free. A number whose profile has ``browser_agents`` offers each call (once its customer's stream is up) to
the agents signed in to the admin's Agent page: an entry in ``RedisKeys.agents_waiting`` (score: when the wait runs
out) and a hash ``RedisKeys.agent_offer`` with what the page shows. Taking and giving up both start with ``ZREM``
of that entry inside one Lua script, so exactly one of "agent A takes", "agent B takes" and "the wait ran out"
wins, on any worker of any instance.

A browser agent's leg is a leg like a phone leg (``carrier`` :data:`BROWSER_LEG`, its own leg id), so it has the
same lifecycle: leg states, heartbeats, the reconnect window, exactly-once end.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from app.redis_keys import RedisKeys, as_text, as_text_map

#: The "carrier" name of browser agent legs (call records, relay tokens, leases, metrics labels).
BROWSER_LEG = "browser"
#: An offer's record outlives its wait by this long (the page can still say who took it).
OFFER_TTL_SECONDS = 3600

#: KEYS: waiting zset, offer hash. ARGV: session id, new state, field/value pairs to set.
#: 1 when this caller removed the entry (it won), 0 when someone else did first.
_CLAIM = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


class AgentQueue:
    """Offers calls to browser agents and decides, atomically, who (or what) gets each one."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._keys = keys
        self._clock = clock
        self._claim = client.register_script(_CLAIM)

    def offer(self, session_id: str, *, carrier: str, call_id: str, to_number: str, from_number: str,
              source_language: str, target_language: str, wait_seconds: int, reason: str = "new") -> float:
        """Put the call on the agents' list until ``wait_seconds`` from now; returns that deadline.

        ``reason`` is ``new`` or ``agent_lost`` (a browser agent's leg was lost: the call is offered again).
        """
        now = self._clock()
        deadline = now + wait_seconds
        key = self._keys.agent_offer(session_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={
                "session_id": session_id, "carrier": carrier, "call_id": call_id, "to": to_number,
                "from": from_number, "source_language": source_language, "target_language": target_language,
                "offered_at": f"{now:.3f}", "deadline": f"{deadline:.3f}", "state": "waiting", "reason": reason})
            pipe.expire(key, wait_seconds + OFFER_TTL_SECONDS)
            pipe.zadd(self._keys.agents_waiting(), {session_id: deadline})
            pipe.execute()
        return deadline

    def offer_record(self, session_id: str) -> dict[str, str]:
        """What is known about the offer of ``session_id`` (empty when none)."""
        return as_text_map(self._redis.hgetall(self._keys.agent_offer(session_id)))

    def waiting(self) -> list[dict[str, Any]]:
        """Calls waiting now, the longest-waiting first, each with ``seconds_left``."""
        now = self._clock()
        entries = self._redis.zrangebyscore(self._keys.agents_waiting(), now, "+inf", withscores=True)
        offers = []
        for member, deadline in entries:
            record = self.offer_record(as_text(member))
            if record.get("state") == "waiting":
                offers.append({**record, "seconds_left": max(0, round(deadline - now))})
        return sorted(offers, key=lambda o: float(o.get("offered_at") or 0))

    def take(self, session_id: str, *, agent: str, owner: str, leg_id: str) -> bool:
        """The agent ``agent`` (admin session digest ``owner``) takes the call as leg ``leg_id``; True for the
        first taker only, False when another agent took it or its wait ran out."""
        return bool(self._claim(keys=[self._keys.agents_waiting(), self._keys.agent_offer(session_id)],
                                args=[session_id, "taken", "agent", agent, "owner", owner, "leg", leg_id,
                                      "taken_at", f"{self._clock():.3f}"]))

    def withdraw(self, session_id: str, why: str) -> bool:
        """Take the call off the list without an agent (``why``: the call ended, the agent came back…)."""
        return bool(self._claim(keys=[self._keys.agents_waiting(), self._keys.agent_offer(session_id)],
                                args=[session_id, why]))

    def expire_due(self, on_expired: Callable[[str, dict[str, str]], None]) -> int:
        """Give up every offer whose wait ran out: ``on_expired(session_id, offer)`` runs once per offer, on the
        one worker whose claim won. Returns how many this worker handled."""
        handled = 0
        for member in self._redis.zrangebyscore(self._keys.agents_waiting(), 0, self._clock()):
            session_id = as_text(member)
            if self.withdraw(session_id, "expired"):
                on_expired(session_id, self.offer_record(session_id))
                handled += 1
        return handled
