"""The lifecycle's Lua scripts: every state change of a leg or a session is one of these, atomic in Redis.

Invariants (property-tested in ``tests/test_lifecycle_properties.py``):

I1. **One end per session.** Kallglot's ``end`` is called only by the holder of the session's end claim
    (``{ns}:session:{id}:end-claim``). :data:`CLAIM_END` grants it to one caller at a time; the claim carries a
    random token (a fencing token) and a lease recorded in the session hash (``end_lease_until``). Only a
    claim whose lease has run out may be taken over, so a merely slow holder is not overtaken while its own
    request is bounded by the Kallglot client's budget (far shorter than the lease). Once the end is done
    the claim becomes ``ended:<reason>`` for good, and nothing ends, attaches or holds the session again.
    (Belt and braces: the ``end`` request carries ``Idempotency-Key: end-{id}``, so even a holder paused for
    longer than its lease between the check and the request would be answered with a replay.)

I2. **A leg is live, held or ended — never two.** The call hash's ``state`` is ``live`` or ``ended``; a held
    session has no live leg. Every end of a leg by a relay carries the relay's stream id (a fence): an end
    or heartbeat from a stream that is no longer the leg's current one (a restored stream replaced it, or
    it was declared lost) changes nothing. Each attach increments the leg's ``epoch`` and clears its
    ``stream`` until the new stream binds, so a late end of the old stream cannot end the restored leg.
    Heartbeat expiry ends a leg only if its heartbeat is still due *inside the script*, so a beat or a
    re-attach that lands between "found due" and "ended" wins. A leg given up for a missed heartbeat is a
    guess about a relay that may only be slow: its next beat makes it live again (while nobody claimed the
    session's end, whether the session was held or kept active by another leg), and its own end from its
    current stream replaces the guess and is acted on (the agent is hung up with the customer).

I3. **Every created session is registered or recoverable.** A create's intent (idempotency key and
    arguments) is stored before the request and removed only once a leg is attached, or once Kallglot gave
    a definitive refusal (a replay's 5xx or timeout is none: the first create may still have succeeded).
    A reaper replays due intents (Kallglot answers with the same session) and ends them through
    :data:`CLAIM_END` (``force`` off), so it never ends a session a slow worker attached meanwhile, and a slow
    worker never attaches a session the reaper ended (attach refuses any claim).

I4. **One slot per script** (Redis Cluster; the layout is in :mod:`app.redis_keys`). Every key a script
    touches lives in the session's shard: the session hash and end claim, the leg's state hash
    (``{S}:leg:…``), and the shard's deadline, heartbeat and live-session sets. The returning-caller hint
    (``{ns}:held:{to}:{from}``, found by the numbers, so in no session's shard) is written *after* a script
    holds the session and deleted after one re-attaches it; it is only a hint: an attach through it
    (``require_held``) is refused unless the session is still held (or the leg is already one of its legs,
    a retried webhook), and a hint lost to a worker dying between the two steps only means a returning
    caller gets a new session while the held one ends at its deadline.

Every deadline (hold, retry, lease) lives in the session's shard's ``deadlines`` zset: a worker that dies
mid-step leaves a deadline behind that another worker's reaper takes, so nothing depends on a process staying
alive.
"""
from __future__ import annotations

# Shared by the scripts: count live legs in a session hash (fields ``leg:carrier:id`` → state).
_COUNT_LIVE = """
local function live_legs(session_key)
  local live = 0
  local fields = redis.call('HGETALL', session_key)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 4) == 'leg:' and fields[i + 1] == 'live' then live = live + 1 end
  end
  return live
end
"""

# KEYS: leg, session, heartbeats, deadlines (the session's shard).
# ARGV: leg field, reason, now, heartbeat member, clean ('1'/'0'), session id, lease seconds,
#       stream fence ('' = any stream), heartbeat due by ('0' = end regardless of the heartbeat).
# Ends the leg unless it already ended or the fence says the end is stale. When it was the last live leg:
# holds the session (status held, deadline; the caller then writes the returning-caller hint) when the
# profile gives a window, else sets a safety deadline (a lease) and tells the caller to end the session now — should the
# caller die before it does, a reaper finds the deadline. Returns {changed, live legs left, action} where
# action is 0 nothing to do, 1 end the session now, 2 held; changed is 1, 0 (already ended), -1 (unknown leg),
# -2 (stale: another stream is current), -3 (heartbeat not due any more).
END_LEG = _COUNT_LIVE + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, 0, 0} end
if ARGV[9] ~= '0' then
  local due = redis.call('ZSCORE', KEYS[3], ARGV[4])
  if not due or tonumber(due) > tonumber(ARGV[9]) then return {-3, 0, 0} end
end
if ARGV[8] ~= '' and (redis.call('HGET', KEYS[1], 'stream') or '') ~= ARGV[8] then return {-2, 0, 0} end
-- A leg given up for a missed heartbeat whose relay (the current stream: the fence above matched) now ends
-- it was slow, not gone: its own end, clean or not, replaces the guess and is acted on (hang up the other
-- legs, end or hold the session). Any other ended leg stays as it ended.
if state == 'ended' and (ARGV[8] == '' or redis.call('HGET', KEYS[1], 'end_reason') ~= 'heartbeat_lost') then
  redis.call('ZREM', KEYS[3], ARGV[4])  -- an ended leg has no heartbeat
  return {0, live_legs(KEYS[2]), 0}
end
redis.call('HSET', KEYS[1], 'state', 'ended', 'end_reason', ARGV[2], 'ended_at', ARGV[3], 'clean', ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], 'ended')
redis.call('ZREM', KEYS[3], ARGV[4])
local live = live_legs(KEYS[2])
if live > 0 then return {1, live, 0} end
local status = redis.call('HGET', KEYS[2], 'status')
-- A failed end awaiting its retry is committed to ending too: holding it would let the retry skip asking Kallglot.
if status == 'ended' or status == 'ending' or status == 'end_failed' then return {1, 0, 0} end
local window_field = 'reconnect_window'
if ARGV[5] == '1' then window_field = 'hangup_grace' end
local window = tonumber(redis.call('HGET', KEYS[2], window_field) or '0') or 0
local now = tonumber(ARGV[3])
if window <= 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), ARGV[6])
  return {1, 0, 1}
end
redis.call('HSET', KEYS[2], 'status', 'held', 'held_until', string.format('%.3f', now + window),
           'hold_reason', ARGV[2])
redis.call('ZADD', KEYS[4], now + window, ARGV[6])
return {1, 0, 2}
"""

# KEYS: end claim, session, deadlines. ARGV: fencing token, lease seconds, force ('1'/'0'), session id, now.
# Returns 1 when this caller holds the claim and may call Kallglot's end — 2 when an earlier end may have
# reached Kallglot (its holder failed, died or stalled), so the new holder asks Kallglot before ending again;
# 0 when the session is ended or
# another caller's claim is within its lease; -1 when a leg is live (a reconnect won) and force is off.
# A claim whose lease ran out (holder dead, or slow beyond the lease) is taken over with a new token; the
# old holder's later release or retry scheduling then no longer matches and changes nothing.
CLAIM_END = _COUNT_LIVE + """
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'ended' then return 0 end
local now = tonumber(ARGV[5])
local holder = redis.call('GET', KEYS[1])
if holder then
  if string.sub(holder, 1, 6) == 'ended:' then return 0 end
  local lease = tonumber(redis.call('HGET', KEYS[2], 'end_lease_until') or '0') or 0
  if lease > now then return 0 end
end
-- Taking over a lapsed claim honours its holder's decision: the session was committed to ending the moment
-- that claim was taken (attaches have been refused since), whatever its legs say now.
if not holder and ARGV[3] ~= '1' and live_legs(KEYS[2]) > 0 then return -1 end
local until_ = now + tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'ending', 'end_lease_until', string.format('%.3f', until_))
redis.call('ZADD', KEYS[3], until_ + 1, ARGV[4])
-- Any earlier claim (lapsed, failed or awaiting its retry) may have reached Kallglot.
if holder or status == 'ending' or status == 'end_failed' then return 2 end
return 1
"""

# KEYS: end claim, session, deadlines. ARGV: fencing token, session id, retry at, error text.
# The end failed: hand the claim (only if still ours) to the retry deadline, when it may be taken over.
RELEASE_FOR_RETRY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
-- The claim stays (a failed end may have landed at Kallglot: nothing may attach to the session now); its
-- lease runs out at the retry, when a reaper takes it over and asks Kallglot before ending again.
redis.call('SET', KEYS[1], 'retry:' .. ARGV[1])
local attempts = redis.call('HINCRBY', KEYS[2], 'end_attempts', 1)
redis.call('HSET', KEYS[2], 'status', 'end_failed', 'last_error', ARGV[4], 'end_lease_until', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return attempts
"""

# KEYS: end claim, session, live sessions, deadlines (the session's shard). ARGV: session id, reason, now, record ttl, only-first
# ('1': Kallglot ended it itself; do nothing if it is already recorded as ended).
# Records the end for good. Returns 1 when this call recorded it, 0 when it was already recorded.
MARK_ENDED = """
if redis.call('HGET', KEYS[2], 'status') == 'ended' then return 0 end
redis.call('SET', KEYS[1], 'ended:' .. ARGV[2], 'EX', ARGV[4])
redis.call('HSET', KEYS[2], 'status', 'ended', 'end_reason', ARGV[2], 'ended_at', ARGV[3])
redis.call('HDEL', KEYS[2], 'end_lease_until', 'held_until')
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: end claim, session, leg, deadlines, heartbeats, live sessions (the session's shard).
# ARGV: session id, leg field, heartbeat member, heartbeat expiry, now, restoring a stream ('1'/'0'),
#       require held ('1': a returning caller, through the held hint).
# Attaches a (new or returning) leg to a session that is not ended or being ended; returns the leg's new
# epoch (> 0) on success, else 0 (also when a returning caller finds the session no longer held). A leg that was not live (or whose stream is being restored) waits for its
# stream: ``stream`` is cleared until one binds, so ends from the stream it replaces are ignored.
ATTACH_LEG = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'ended' or status == 'ending' then return 0 end
if ARGV[7] == '1' and status ~= 'held' and not redis.call('HGET', KEYS[2], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], 'live', 'status', 'active')
redis.call('HDEL', KEYS[2], 'held_until')
redis.call('ZREM', KEYS[4], ARGV[1])
local epoch = redis.call('HINCRBY', KEYS[3], 'epoch', 1)
-- A restored stream replaces the current one; a retried registration of a live leg keeps its stream.
if ARGV[6] == '1' or redis.call('HGET', KEYS[3], 'state') ~= 'live' then
  redis.call('HSET', KEYS[3], 'stream', '')
end
redis.call('HSET', KEYS[3], 'state', 'live', 'attached_at', ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[6], 'NX', ARGV[5], ARGV[1])
return epoch
"""

# KEYS: leg, session, heartbeats, deadlines, end claim (the session's shard).
# ARGV: stream id, heartbeat member, heartbeat expiry, leg field, session id, bind ('1' at the stream's
# start, '0' for a heartbeat).
# The relay of ``stream id`` is alive. Returns 1 (beat recorded), 2 (the leg had been given up — its
# heartbeat expired while the worker was merely slow — and is live again because its session was only
# held; the caller then deletes the returning-caller hint), 3 (the same, back into a session its other legs
# kept active: no hold to cancel), or a refusal (the relay should stop): 0 no such leg, -1 this stream is not
# the leg's current one, -2 the leg ended for good (a hang-up or stop), -3 the session's end is claimed,
# -4 the session is over.
# Binding at the stream's start makes the stream current; a plain beat never changes which stream is.
BEAT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local current = redis.call('HGET', KEYS[1], 'stream') or ''
if ARGV[6] == '1' then
  -- The newest stream to start is the leg's current one (a carrier runs one media stream per call).
  redis.call('HSET', KEYS[1], 'stream', ARGV[1])
elseif current ~= ARGV[1] then
  return -1
end
if state == 'live' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
  return 1
end
-- Only a leg given up for a missed heartbeat comes back; any other end (hang-up, stop) is final.
if redis.call('HGET', KEYS[1], 'end_reason') ~= 'heartbeat_lost' then return -2 end
if redis.call('EXISTS', KEYS[5]) == 1 then return -3 end
-- Back into a held session (it was the last leg), or into one whose other legs kept it active (an agent
-- still talking): a slow relay's leg was given up either way, and either way it is live again.
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'held' and status ~= 'active' then return -4 end
if status == 'held' then
  redis.call('HDEL', KEYS[2], 'held_until')
  redis.call('ZREM', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[2], ARGV[4], 'live', 'status', 'active')
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'state', 'live')
redis.call('HDEL', KEYS[1], 'end_reason', 'ended_at', 'clean')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
if status == 'held' then return 2 end
return 3
"""

# KEYS: zset. ARGV: member, now, lease. Takes a due member by pushing its score forward by the lease.
TAKE_DUE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""
