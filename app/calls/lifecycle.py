"""Session lifecycle (long: every transition and the Lua call that makes it atomic read as one state machine):
correlate carrier call legs with Kallglot sessions in Redis, hold sessions for reconnects,
and end each session exactly once — across workers and instances, and when a worker dies or stalls mid-call.

Vendor-free: adapters pass a carrier name (``twilio``, ``telnyx``), the carrier's call ID and whether a leg
ended cleanly. Everything another worker or instance needs lives in Redis; nothing in process memory.

Rules (the invariants they keep are written next to the Lua in :mod:`app.calls.scripts`):
- A session ends when its last live leg ends: at once after a clean end (plus the profile's hang-up grace),
  or after the reconnect window when the leg was lost abnormally (socket dropped, relay died, odd hang-up).
- While held, a new call from the same caller to the same number, or a restored media stream, re-attaches.
- Deadlines live in Redis (``deadlines`` zset). Any instance's :class:`~app.calls.reaper.Reaper` may take a
  due one (:mod:`app.calls.recovery`); a lease makes exactly one take it, and it comes due again if that
  worker dies or stalls.
- Kallglot's ``end`` is called under a fenced claim, so one worker calls it per session; a failed ``end`` is
  retried with backoff, and a retry or take-over first asks Kallglot whether the earlier attempt landed.
- A relay beats a heartbeat for its stream; a leg whose heartbeat expires counts as lost, and comes back
  if its relay was only slow and the session is still held.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from app import metrics
from app.calls import scripts, usage
from app.calls.leg_spec import LegSpec
from app.calls.reads import LifecycleReads
from app.calls.reasons import EndReason, reason_value
from app.calls.states import (
    LEG_ENDED, LEG_LIVE, SESSION_ACTIVE, SESSION_END_FAILED, SESSION_ENDED, SESSION_ENDING, SESSION_HELD, EndOutcome,
)
from app.calls.recovery import PENDING_CREATE_GRACE_SECONDS, RecoveryPasses, create_may_have_succeeded
from app.carriers.contract import CarrierError
from app.kallglot.client import KallglotClient, KallglotError, KallglotNotFound, KallglotSession
from app.redis_keys import CALL_LOG_MAX_ENTRIES, CALL_LOG_RETENTION_SECONDS, RECORD_TTL_SECONDS, RedisKeys

log = logging.getLogger(__name__)

__all__ = [
    "SessionLifecycle", "EndOutcome", "EndReason", "PENDING_CREATE_GRACE_SECONDS", "LEG_LIVE", "LEG_ENDED",
    "SESSION_ACTIVE", "SESSION_HELD", "SESSION_ENDING", "SESSION_ENDED", "SESSION_END_FAILED",
]

#: Before its media stream starts, a leg counts as lost after this long without a heartbeat.
STREAM_START_GRACE_SECONDS = 60
#: A leg whose audio bypasses the bridge (``direct``/``sip`` transports) has no relay to beat its heartbeat: the
#: carrier's callbacks end it. Its heartbeat is a backstop for callbacks that never come, set past the longest
#: call a carrier carries (Twilio's ``timeLimit`` maximum is 4 hours), so it never cuts a real call short.
CARRIER_WATCHED_LEG_SECONDS = 4 * 3600 + 600
#: A worker that claimed a session's end has this long before another may take the claim over: six times the
#: Kallglot client's whole budget for one request (10 s), so only a holder stalled for a minute is overtaken.
#: (A chaos run at load average 13 on 2 cores showed an end request arriving more than 30 s after its claim.)
END_CLAIM_LEASE_SECONDS = 60
END_RETRY_MAX_BACKOFF_SECONDS = 60
#: How long a leg's end stays "ended, safety deadline" before a reaper ends the session for a dead worker.
SAFETY_LEASE_SECONDS = 30

#: Why BEAT refused a relay's beat (its return values; see app/calls/scripts.py), for the log.
_BEAT_REFUSALS = {0: "no such leg", -1: "another stream is the leg's current one", -2: "the leg ended for good",
                  -3: "the session's end is claimed", -4: "the session is not held"}

# What END_LEG asks the caller to do next.
_ACTION_NONE, _ACTION_END_NOW, _ACTION_HELD = 0, 1, 2


class SessionLifecycle(LifecycleReads, RecoveryPasses):
    """Correlates call legs with sessions, holds and ends sessions exactly once, across workers and instances."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, kallglot: KallglotClient, *,
                 heartbeat_timeout_seconds: float = 15.0,
                 hang_up: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        # Hangs up a carrier leg (carrier, call_id): used when one participant's hang-up ends the call.
        self._hang_up = hang_up
        self._keys = keys
        self._kallglot = kallglot
        self._clock = clock
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self._end_leg = client.register_script(scripts.END_LEG)
        self._claim_end = client.register_script(scripts.CLAIM_END)
        self._release_for_retry = client.register_script(scripts.RELEASE_FOR_RETRY)
        self._mark_ended_script = client.register_script(scripts.MARK_ENDED)
        self._attach_leg = client.register_script(scripts.ATTACH_LEG)
        self._beat = client.register_script(scripts.BEAT)
        self._take_due = client.register_script(scripts.TAKE_DUE)

    # -- creating sessions --------------------------------------------------------------------------------
    def create_session(self, *, carrier: str, call_id: str, idempotency_key: str,
                       **create_args: Any) -> KallglotSession:
        """Create the Kallglot session for a new leg, leaving a recoverable intent in Redis until it is registered.

        If this worker dies between Kallglot's create and :meth:`register_leg` (or the create timed out after
        Kallglot processed it), a reaper later replays the create with the same idempotency key — Kallglot
        answers with the same session — and ends it, so no session is left running unseen.
        """
        member = _member(carrier, call_id)
        intent = json.dumps({"key": idempotency_key, "args": create_args, "attempts": 0})
        shard = self._keys.shard_of(member)
        with self._redis.pipeline(transaction=True) as pipe:  # one slot: both keys are in the member's shard
            pipe.hset(self._keys.pending_create_data(shard), member, intent)
            pipe.zadd(self._keys.pending_creates(shard), {member: self._clock() + PENDING_CREATE_GRACE_SECONDS})
            pipe.execute()
        try:
            return self._kallglot.create_session(idempotency_key=idempotency_key, **create_args)
        except KallglotError as exc:
            if not create_may_have_succeeded(exc):
                self._forget_pending_create(member)
            raise

    def confirm_create(self, carrier: str, call_id: str) -> None:
        """The session created under ``call_id`` is tracked by a registered leg of another ID (outbound calls)."""
        self._forget_pending_create(_member(carrier, call_id))

    # -- correlation ---------------------------------------------------------------------------------------
    def register_leg(self, leg: LegSpec, *, session_id: str, reattach_from: tuple[str, str] | None = None) -> bool:
        """Attach a live leg to ``session_id``; False if the session is ended or being ended.

        Idempotent: a retried webhook re-registers the same leg. ``reattach_from`` is the (to, from) pair of
        a held session a returning caller re-attaches to, so that hold is released in the same step.
        """
        started = self._clock()
        carrier, call_id = leg.carrier, leg.call_id
        call_key, session_key = self._keys.call(carrier, call_id), self._keys.session(session_id)
        member = _member(carrier, call_id)
        log_shard = self._keys.shard_of(member)
        # Three slots (the leg's description, the session's shard, the call log's shard), so three steps, each
        # idempotent; the description (which names the session) comes first, as every later step is found by it.
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(call_key, mapping={"session_id": session_id, "carrier": carrier, "speaker": leg.speaker,
                                         "from": leg.from_number, "to": leg.to_number, "transport": leg.transport})
            pipe.hsetnx(call_key, "created_at", f"{started:.3f}")
            if leg.start_grace_seconds:
                pipe.hset(call_key, "start_grace", str(leg.start_grace_seconds))
            pipe.expire(call_key, RECORD_TTL_SECONDS)
            pipe.execute()
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(session_key, "created_at", f"{started:.3f}")
            pipe.hsetnx(session_key, "reconnect_window", str(leg.reconnect_window_seconds))
            pipe.hsetnx(session_key, "hangup_grace", str(leg.hangup_grace_seconds))
            pipe.hsetnx(session_key, "agent_hangup_ends_call", "1" if leg.agent_hangup_ends_call else "0")
            pipe.hset(session_key, mapping={"carrier": carrier, "mode": leg.mode})
            if leg.speaker == "customer":
                pipe.hset(session_key, mapping={"to": leg.to_number, "from": leg.from_number})
            pipe.expire(session_key, RECORD_TTL_SECONDS)
            pipe.execute()
        recent = self._keys.recent_calls(log_shard)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(recent, {member: started}, nx=True)
            pipe.zremrangebyscore(recent, 0, started - CALL_LOG_RETENTION_SECONDS)
            pipe.zremrangebyrank(recent, 0, -(CALL_LOG_MAX_ENTRIES // len(self._keys.shards())) - 1)
            pipe.execute()
        epoch = self._attach(session_id, carrier, call_id, started, restoring=False,
                             require_held=reattach_from is not None, relayed=leg.relayed,
                             start_grace=leg.start_grace_seconds)
        if not epoch:
            return False
        if reattach_from:  # the hold is over: drop the returning-caller hint (invariant I4)
            self._redis.delete(self._keys.held(*reattach_from))
        # Attached: the create is accounted for (invariant I3). Not before: a refused attach leaves the
        # intent for the reaper, which ends the session if nobody else does.
        self._forget_pending_create(_member(carrier, call_id))
        if reattach_from:
            metrics.SESSIONS_REATTACHED.labels("returning_caller").inc()
        return True

    def _attach(self, session_id: str, carrier: str, call_id: str, now: float, *, restoring: bool,
                require_held: bool = False, relayed: bool = True, start_grace: float = 0) -> int:
        shard = self._keys.shard_of(session_id)
        grace = (start_grace or STREAM_START_GRACE_SECONDS) if relayed else CARRIER_WATCHED_LEG_SECONDS
        return int(self._attach_leg(
            keys=[self._keys.session_end_claim(session_id), self._keys.session(session_id),
                  self._keys.leg(session_id, carrier, call_id), self._keys.deadlines(shard),
                  self._keys.heartbeats(shard), self._keys.live_sessions(shard)],
            args=[session_id, _leg_field(carrier, call_id), _member(carrier, call_id),
                  now + grace, f"{now:.3f}", "1" if restoring else "0",
                  "1" if require_held else "0"]))

    def reattach_leg(self, carrier: str, call_id: str, *, restoring_lost_stream: bool = True) -> str | None:
        """Make a leg live again for a media stream being restored; returns the session or None.

        The leg's current stream is cleared, so a late end from the stream being replaced changes nothing.
        Only a lost stream counts towards the call's ``stream_restarts`` (the carriers' limit of restores): a
        stream we replace on purpose (``restoring_lost_stream=False``: a redirect to tell the caller something)
        is not a loss.
        """
        call = self.call_record(carrier, call_id)
        session_id = call.get("session_id")
        relayed = call.get("transport", "relay") == "relay"
        if not session_id or not self._attach(session_id, carrier, call_id, self._clock(), restoring=True,
                                              relayed=relayed, start_grace=float(call.get("start_grace") or 0)):
            return None
        if restoring_lost_stream:
            self._redis.hincrby(self._keys.call(carrier, call_id), "stream_restarts", 1)
            metrics.SESSIONS_REATTACHED.labels("stream_restored").inc()
        return session_id

    def claim_agent_dial(self, session_id: str) -> bool:
        """True for exactly one caller per session: the one that dials the agent leg."""
        return bool(self._redis.hsetnx(self._keys.session(session_id), "agent_dial", f"{self._clock():.3f}"))

    # -- relay heartbeats ----------------------------------------------------------------------------------
    def stream_started(self, carrier: str, call_id: str, stream_id: str) -> bool:
        """A relay started serving ``stream_id`` for this leg: it becomes the leg's current stream.

        False when the session is over (the relay should close); a leg given up while its worker was slow
        comes back if its session is only held.
        """
        return self._beat_stream(carrier, call_id, stream_id, bind=True) > 0

    def heartbeat(self, carrier: str, call_id: str, stream_id: str) -> bool:
        """The relay of ``stream_id`` is alive; without a beat for ``heartbeat_timeout_seconds`` the leg is lost.

        False when ``stream_id`` is no longer the leg's current stream or the session is over.
        """
        return self._beat_stream(carrier, call_id, stream_id, bind=False) > 0

    def _beat_stream(self, carrier: str, call_id: str, stream_id: str, *, bind: bool) -> int:
        call = self.call_description(carrier, call_id)
        session_id = call.get("session_id")
        if not session_id:
            return 0
        shard = self._keys.shard_of(session_id)
        result = int(self._beat(
            keys=[self._keys.leg(session_id, carrier, call_id), self._keys.session(session_id),
                  self._keys.heartbeats(shard), self._keys.deadlines(shard), self._keys.session_end_claim(session_id)],
            args=[stream_id, _member(carrier, call_id), self._clock() + self.heartbeat_timeout_seconds,
                  _leg_field(carrier, call_id), session_id, "1" if bind else "0"]))
        if result in (2, 3):
            # Held no more (2; a session kept active by another leg had no hint): drop the returning-caller hint.
            if result == 2 and (held_key := self._held_key(call)):
                self._redis.delete(held_key)
            log.warning("session=%s %s call=%s leg came back: its relay was slow, not gone", session_id, carrier,
                        call_id)
            metrics.SESSIONS_REATTACHED.labels("relay_recovered").inc()
        elif result <= 0:
            log.info("session=%s %s call=%s stream %.64s %s refused: %s", session_id, carrier, call_id, stream_id,
                     "start" if bind else "heartbeat", _BEAT_REFUSALS.get(result, result))
        return result

    def _write_held_hint(self, session_id: str, call: dict[str, str]) -> None:
        """After END_LEG held the session: the returning-caller hint, for as long as the hold (invariant I4)."""
        held_key = self._held_key(call)
        if not held_key:
            return
        record = self.session_record(session_id)
        if record.get("status") == SESSION_HELD:  # not re-attached (or ended) in the meantime
            left = float(record.get("held_until") or 0) - self._clock()
            self._redis.set(held_key, session_id, ex=max(1, int(left)))

    def _held_key(self, call: dict[str, str]) -> str:
        if call.get("speaker") == "customer" and call.get("to") and call.get("from"):
            return self._keys.held(call["to"], call["from"])
        return ""

    # -- ending --------------------------------------------------------------------------------------------
    def leg_ended(self, carrier: str, call_id: str, reason: EndReason | str, *, clean: bool = True,
                  stream_id: str = "") -> EndOutcome | None:
        """A leg is over: when it was the last live one, end the session now or hold it until its deadline.

        ``clean`` is True for a normal end (the carrier said the call or stream is over) and False for a loss
        (socket dropped without ``stop``, relay died, abnormal hang-up cause), which holds the session for the
        reconnect window. ``stream_id`` (set by a relay) fences the end: it applies only while that stream is
        the leg's current one. Safe to call any number of times, from any worker, in any order: only the call
        that ends the last live leg acts. Returns what happened, or None when nothing did.
        """
        return self._end_leg_now(carrier, call_id, reason_value(reason), clean=clean, stream_id=stream_id,
                                 due_by=None)

    def _give_up_leg(self, carrier: str, call_id: str, now: float, shard: int) -> bool:
        """End a leg whose heartbeat is due — checked inside the script, so a late beat wins."""
        self._end_leg_now(carrier, call_id, EndReason.HEARTBEAT_LOST.value, clean=False, stream_id="", due_by=now,
                          heartbeat_shard=shard)
        # Either the leg was given up (its heartbeat removed) or a beat renewed it meanwhile.
        return self._redis.zscore(self._keys.heartbeats(shard), _member(carrier, call_id)) is None

    def _end_leg_now(self, carrier: str, call_id: str, reason: str, *, clean: bool, stream_id: str,
                     due_by: float | None, heartbeat_shard: int | None = None) -> EndOutcome | None:
        """End the leg (fenced by ``stream_id`` when set; only if its heartbeat is due by ``due_by`` when set)."""
        call = self.call_description(carrier, call_id)
        session_id = call.get("session_id")
        now = self._clock()
        if not session_id:
            if due_by is not None and heartbeat_shard is not None:  # a heartbeat of a leg whose record expired
                self._redis.zrem(self._keys.heartbeats(heartbeat_shard), _member(carrier, call_id))
            return None
        shard = self._keys.shard_of(session_id)
        changed, live, action = self._end_leg(
            keys=[self._keys.leg(session_id, carrier, call_id), self._keys.session(session_id),
                  self._keys.heartbeats(shard), self._keys.deadlines(shard)],
            args=[_leg_field(carrier, call_id), reason, f"{now:.3f}", _member(carrier, call_id),
                  "1" if clean else "0", session_id, SAFETY_LEASE_SECONDS, stream_id,
                  "0" if due_by is None else f"{due_by:.3f}"])
        if changed == -2:
            log.info("session=%s %s call=%s end from replaced stream %s ignored (%s)", session_id, carrier,
                     call_id, stream_id, reason)
        if changed != 1:
            return None
        log.info("session=%s %s call=%s leg ended (%s, %s), %d live legs left", session_id, carrier, call_id,
                 reason, "clean" if clean else "lost", live)
        if live:
            if clean:
                self._hang_up_other_legs(session_id, call.get("speaker", ""))
            return None
        if action == _ACTION_END_NOW:
            return self.end_session(session_id, reason, force=False)
        if action == _ACTION_HELD:
            self._write_held_hint(session_id, call)
            log.info("session=%s held for a reconnect (%s)", session_id, reason)
            metrics.SESSIONS_HELD.inc()
            return EndOutcome.HELD
        return EndOutcome.ALREADY  # the session is ended, or being ended, already

    def _hang_up_other_legs(self, session_id: str, speaker: str) -> None:
        """The customer hung up (or the agent did, where the profile says so): hang up the other live legs."""
        agent_ends = self._redis.hget(self._keys.session(session_id), "agent_hangup_ends_call") in (b"1", "1")
        if speaker != "customer" and not (speaker == "agent" and agent_ends):
            return
        self.hang_up_live_legs(session_id, f"{speaker}_hung_up")

    def end_session(self, session_id: str, reason: EndReason | str, *, force: bool = True,
                    now: float | None = None) -> EndOutcome:
        """End ``session_id`` at Kallglot unless it is ended or being ended.

        ``force=False`` (the lifecycle's own automatic ends) also leaves it alone when a leg went live again
        meanwhile; an explicit end (admin, API) uses the default and ends it regardless.
        """
        reason = reason_value(reason)
        now = self._clock() if now is None else now
        token = secrets.token_hex(8)
        claim = self._keys.session_end_claim(session_id)
        claimed = int(self._claim_end(keys=[claim, self._keys.session(session_id),
                                            self._keys.deadlines(self._keys.shard_of(session_id))],
                                      args=[token, END_CLAIM_LEASE_SECONDS, "1" if force else "0", session_id,
                                            f"{now:.3f}"]))
        if claimed == 0:
            return EndOutcome.ALREADY
        if claimed == -1:
            return EndOutcome.LEGS_LIVE
        summary: dict[str, Any] = {}
        try:
            if claimed == 2 and self._already_ended_at_kallglot(session_id):
                self._mark_ended(session_id, reason)
                return EndOutcome.ENDED
            summary = self._kallglot.end_session(session_id)
        except KallglotNotFound:
            log.warning("session=%s unknown to Kallglot at end; treating as ended", session_id)
        except KallglotError as exc:
            self._schedule_retry(session_id, token, exc)
            return EndOutcome.FAILED
        self._mark_ended(session_id, reason)
        if (billed := usage.parse_seconds(summary.get("duration_seconds"))) is not None:  # Kallglot bills this
            usage.record_billed_seconds(self._redis, self._keys, session_id, billed)
        log.info("session=%s ended at Kallglot (%s)", session_id, reason)
        metrics.SESSIONS_ENDED.labels("bridge").inc()
        return EndOutcome.ENDED

    def _already_ended_at_kallglot(self, session_id: str) -> bool:
        """An earlier end attempt failed, died or stalled after it may have reached Kallglot: ask before
        ending again (a GET), so a recovered end is not a second ``end`` call."""
        status = self._kallglot.get_session(session_id).status
        if status == "ended":
            log.info("session=%s was already ended at Kallglot by an earlier attempt", session_id)
            return True
        return False

    def _schedule_retry(self, session_id: str, token: str, error: Exception) -> None:
        """Release our claim (if still ours) and put the session back on the deadlines with backoff."""
        attempts = int(self._redis.hget(self._keys.session(session_id), "end_attempts") or 0) + 1
        delay = min(END_RETRY_MAX_BACKOFF_SECONDS, 2 ** (attempts - 1))
        released = self._release_for_retry(
            keys=[self._keys.session_end_claim(session_id), self._keys.session(session_id),
                  self._keys.deadlines(self._keys.shard_of(session_id))],
            args=[token, session_id, self._clock() + delay, str(error)[:200]])
        metrics.SESSION_END_RETRIES.inc()
        log.error("session=%s end failed (attempt %d%s), retrying in %ds: %s", session_id, attempts,
                  "" if released else ", claim already taken over", delay, error)

    def hang_up_live_legs(self, session_id: str, reason: EndReason | str) -> int:
        """Hang up every live leg of a session at its carrier and record their end; returns how many."""
        count = 0
        for (carrier, call_id), state in self.session_legs(session_id).items():
            if state != LEG_LIVE:
                continue
            if self._hang_up is not None:
                try:
                    self._hang_up(carrier, call_id)
                except CarrierError as exc:  # the leg's own status callback or heartbeat will still end it
                    log.error("session=%s could not hang up %s call=%s: %s", session_id, carrier, call_id, exc)
            self.leg_ended(carrier, call_id, reason, clean=True)
            count += 1
        return count

    def ended_by_kallglot(self, session_id: str, reason: str) -> bool:
        """Kallglot ended the session itself: record it so nobody calls ``end``; True the first time."""
        first = self._mark_ended(session_id, f"kallglot:{reason}")
        if first:
            metrics.SESSIONS_ENDED.labels("kallglot").inc()
        return first

    def _mark_ended(self, session_id: str, reason: str) -> bool:
        shard = self._keys.shard_of(session_id)
        return bool(self._mark_ended_script(
            keys=[self._keys.session_end_claim(session_id), self._keys.session(session_id),
                  self._keys.live_sessions(shard), self._keys.deadlines(shard)],
            args=[session_id, reason, f"{self._clock():.3f}", RECORD_TTL_SECONDS]))


def _leg_field(carrier: str, call_id: str) -> str:
    return f"leg:{carrier}:{call_id}"


def _member(carrier: str, call_id: str) -> str:
    return f"{carrier}:{call_id}"
