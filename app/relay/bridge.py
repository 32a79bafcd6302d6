"""Bridge one carrier media socket to its Kallglot session: verify, connect, relay, then hand the leg's end
to the session lifecycle. Vendor-free; each carrier's WebSocket route calls :func:`bridge_leg` with its codec.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app

from app.background import spawn
from app.calls import events as live_events
from app.calls.agent import dial_agent_if_configured
from app.calls.reasons import EndReason
from app.calls.states import LEG_ENDED, SESSION_ENDED
from app.ops.draining import current_drain
from app.extensions import Services
from app.kallglot.stream_protocol import SPEAKER_AGENT, SPEAKER_CUSTOMER, Transcript
from app.kallglot.client import KallglotError
from app.logging_setup import bind_log_context
from app.carriers.contract import CarrierCodec
from app.relay.core import CarrierSocket, MediaRelay, RelayEnd, await_start, close_quietly
from app.relay.reopen import StreamNotWanted
from app.kallglot.stream import KallglotStream, KallglotStreamError
from app.relay.tokens import RELAY_TOKEN_PARAMETER, InvalidRelayToken, RelayGrant

log = logging.getLogger(__name__)

#: The leg end reason recorded when the Kallglot stream could not be opened at all.
KALLGLOT_UNREACHABLE = EndReason.RELAY_KALLGLOT_UNREACHABLE.value
#: The leg end reason the lifecycle records for each way a relay stops.
LEG_END_REASONS = {
    RelayEnd.CARRIER_STOP: EndReason.RELAY_CARRIER_STOP, RelayEnd.CARRIER_LOST: EndReason.RELAY_CARRIER_LOST,
    RelayEnd.KALLGLOT_ENDED: EndReason.RELAY_KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST: EndReason.RELAY_KALLGLOT_LOST,
    RelayEnd.PROTOCOL_ERROR: EndReason.RELAY_PROTOCOL_ERROR, RelayEnd.WORKER_DRAINING: EndReason.RELAY_WORKER_DRAINING,
}
#: Carriers send ``start`` right after the upgrade; a socket with nothing useful by then is closed.
MEDIA_START_TIMEOUT_SECONDS = 2.0
#: Refresh a Kallglot stream token this close to its expiry rather than risk a refused connect.
TOKEN_REFRESH_MARGIN_SECONDS = 5.0


def bridge_leg(ws: CarrierSocket, codec: CarrierCodec, svc: Services,
               start_timeout: float = MEDIA_START_TIMEOUT_SECONDS) -> RelayEnd | None:
    """Serve one carrier media socket from ``connected`` to close; never raises.

    A socket that has not sent a valid ``start`` within ``start_timeout`` is closed (a stalled or bare upgrade
    holds a worker connection for no more than that), and a token is good for one socket only.
    """
    started = await_start(ws, codec, timeout=start_timeout)
    if started is None:
        return None
    try:
        grant = svc.relay_tokens.open(started.parameters.get(RELAY_TOKEN_PARAMETER), carrier=codec.carrier,
                                      call_id=started.call_id)
    except InvalidRelayToken as exc:
        log.warning("%s call=%.40s media socket refused: %s", codec.carrier, started.call_id, exc)
        close_quietly(ws, 1008, "invalid relay token")
        return None
    try:
        refusal = ("relay token already used" if not svc.relay_guard.consume(grant)
                   else "another relay is live for this leg" if not svc.relay_guard.claim_leg(grant) else "")
    except redis.RedisError as exc:  # cannot prove single use: refuse rather than risk a second relay
        log.error("%s call=%s media socket refused, Redis unavailable: %s", codec.carrier, grant.call_id, exc)
        refusal = "state store unavailable"
    if refusal:
        log.warning("%s call=%s session=%s media socket refused: %s", codec.carrier, grant.call_id,
                    grant.session_id, refusal)
        close_quietly(ws, 1008, refusal)
        return None
    try:  # whoever waits on this relay's end can now tell a killed worker from a slow one (app/calls/workers.py)
        svc.workers.record_relay(codec.carrier, grant.call_id)
    except redis.RedisError as exc:  # unknown worker: a waiter waits its full settle, as without this record
        log.warning("%s call=%s relay worker not recorded: %s", codec.carrier, grant.call_id, exc)
    try:
        return _relay_granted_leg(ws, codec, svc, grant, started.stream_id)
    finally:
        try:
            svc.relay_guard.release_leg(grant)
        except redis.RedisError:  # the lease lapses by itself after heartbeat_timeout_seconds
            pass


def _relay_granted_leg(ws: CarrierSocket, codec: CarrierCodec, svc: Services, grant: RelayGrant,
                       stream_id: str) -> RelayEnd | None:
    """Relay a leg whose token was verified, consumed and whose lease is held."""
    context = f"{codec.carrier} call={grant.call_id} session={grant.session_id}"
    bind_log_context(carrier=codec.carrier, call_id=grant.call_id, session_id=grant.session_id)

    def open_kallglot() -> KallglotStream:
        """Open (or reopen) the session's stream; an expired token is refreshed with GET (assumption 4 in
        :mod:`app.kallglot.stream_protocol`)."""
        stream_url, stream_token = grant.stream_url, grant.stream_token
        if grant.stream_expires_at and grant.stream_expires_at - time.time() < TOKEN_REFRESH_MARGIN_SECONDS:
            session = svc.kallglot.get_session(grant.session_id)
            if session.stream is None or session.status == "ended":
                raise KallglotStreamError("the Kallglot session has no stream (ended?)")
            stream_url, stream_token = session.stream.url, session.stream.token
        return KallglotStream.open(stream_url, stream_token)

    def reopen_kallglot() -> KallglotStream:
        """Reopen the dropped stream, unless the leg or its session is over (then retrying cannot help)."""
        _raise_if_leg_over(svc, codec.carrier, grant)
        return open_kallglot()

    try:
        kallglot = open_kallglot()
    except (KallglotStreamError, KallglotError) as exc:
        log.error("%s could not reach the Kallglot stream: %s", context, exc)
        # Record first: the carrier reacts to the close at once (<Connect action>) and must find the reason.
        # The end is fenced by this stream's id, which only a running relay's first heartbeat binds: bind it
        # here, or the lifecycle ignores the end as one from a replaced stream and the reason is lost.
        _bind_stream(svc, codec.carrier, grant.call_id, stream_id, context)
        _leg_over(svc, codec.carrier, grant.call_id, EndReason.RELAY_KALLGLOT_UNREACHABLE, context, clean=False,
                  stream_id=stream_id)
        close_quietly(ws, 1011, "translation service unavailable")
        return None
    log.info("%s relay started (stream %.64s)", context, stream_id)
    _, forwarder = live_events.event_log_for(current_app)

    def leg_changed(state: str, detail: str = "") -> None:
        forwarder.publish(grant.session_id, live_events.LEG, live_events.leg_event(
            carrier=codec.carrier, call_id=grant.call_id, speaker=grant.speaker, state=state, detail=detail))

    def forward_health(health: dict[str, float]) -> None:
        forwarder.publish(grant.session_id, live_events.RELAY_HEALTH,
                          {"call_id": grant.call_id, "speaker": grant.speaker, **health})

    try:  # once per stream start, off the per-frame path: a restored stream says so on the live page
        restored = svc.lifecycle.call_record(codec.carrier, grant.call_id).get("stream_restarts", "0") not in ("", "0")
    except redis.RedisError:
        restored = False
    leg_changed("reattached" if restored else "agent_joined" if grant.speaker == SPEAKER_AGENT else "started")

    def record_end(end: RelayEnd, kallglot_reason: str) -> None:
        try:  # before the carrier hears of the close: its restored stream (a new token) must find the leg free
            svc.relay_guard.release_leg(grant)
        except redis.RedisError:
            pass
        if end is RelayEnd.KALLGLOT_ENDED:
            try:
                svc.lifecycle.ended_by_kallglot(grant.session_id, kallglot_reason or "session.ended")
            except redis.RedisError as exc:
                log.error("%s could not record Kallglot's end: %s", context, exc)
        # Only the carrier's own "stream over" (or Kallglot's end) is clean; any loss may be reconnected.
        clean = end in (RelayEnd.CARRIER_STOP, RelayEnd.KALLGLOT_ENDED)
        _leg_over(svc, codec.carrier, grant.call_id, LEG_END_REASONS[end], context, clean=clean, stream_id=stream_id)
        leg_changed("ended" if clean else "lost", end.value)

    heartbeat = _Heartbeat(svc, grant, stream_id, context)
    heartbeat.start()
    if grant.speaker == SPEAKER_CUSTOMER:
        # Off the hot path: a REST call to the carrier, once per session (re-attached streams find it done).
        spawn(dial_agent_if_configured, svc, grant.session_id, codec.carrier, grant.call_id, name="dial-agent")
    try:
        relay = MediaRelay(ws, codec, kallglot, speaker=grant.speaker, chunk_ms=svc.settings.uplink_chunk_ms,
                           quiet_flush_ms=svc.settings.uplink_quiet_flush_ms,
                           context=context, on_end=record_end, reopen_kallglot=reopen_kallglot,
                           reconnect_backoff_seconds=svc.settings.kallglot_reconnect_backoff_seconds,
                           ping_interval_seconds=svc.settings.kallglot_ping_interval_seconds,
                           on_transcript=(transcript_forwarder(forwarder, grant.session_id, grant.speaker)
                                          if svc.settings.live_transcripts else None),
                           on_health=forward_health)
        with current_drain().track(relay):  # a deploy's SIGTERM hands the leg over as lost (app/ops/draining.py)
            return relay.run()
    finally:
        heartbeat.stop()


def _raise_if_leg_over(svc: Services, carrier: str, grant: RelayGrant) -> None:
    """Before a reopen: stop (:class:`StreamNotWanted`) if the session ended or the leg ended for good (a hang-up,
    a stop — not a heartbeat given up on a slow relay, which its next beat revives). Redis unreachable: reopen."""
    try:
        if svc.lifecycle.session_record(grant.session_id).get("status") == SESSION_ENDED:
            raise StreamNotWanted("the session is over")
        call = svc.lifecycle.call_record(carrier, grant.call_id)
    except redis.RedisError:
        return
    if call.get("state") == LEG_ENDED and call.get("end_reason") != EndReason.HEARTBEAT_LOST.value:
        raise StreamNotWanted(f"the leg ended ({call.get('end_reason') or 'no reason'})")


def transcript_forwarder(forwarder: live_events.EventForwarder, session_id: str,
                         speaker: str) -> Callable[[Transcript], None]:
    """The relay's ``on_transcript`` hook: each Kallglot transcript line becomes a live-console event, handed to
    ``forwarder`` without waiting (``LIVE_TRANSCRIPTS=off`` passes no hook at all: the line is parsed, not kept).

    On the media greenlet it is one queue put of the parsed line and its arrival time; the forwarder's writer
    builds the event from them (issue 16: nothing per line on the media path beyond the put). Module-level (not a
    closure in the relay) so :mod:`app.devtools.forward_cost` measures this very code.
    """
    def build(line: tuple[Transcript, float]) -> dict[str, Any]:
        message, at = line
        return live_events.transcript_event(
            speaker=message.speaker or speaker, text=message.text, final=message.final,
            language=message.language, translation=message.translation,
            translation_language=message.translation_language, item_id=message.item_id, at=at)

    publish, kind, now = forwarder.publish_built, live_events.TRANSCRIPT, time.time

    def forward_transcript(message: Transcript) -> None:
        publish(session_id, kind, build, (message, now()))
    return forward_transcript


class _Heartbeat:
    """Beats the leg's heartbeat in Redis while the relay runs, so a dead worker's legs are noticed."""

    def __init__(self, svc: Services, grant: RelayGrant, stream_id: str, context: str) -> None:
        self._lifecycle = svc.lifecycle
        self._guard = svc.relay_guard
        self._grant = grant
        self._interval = svc.settings.heartbeat_timeout_seconds / 3
        self._carrier, self._call_id, self._stream_id, self._context = grant.carrier, grant.call_id, stream_id, context
        self._stopped = threading.Event()

    def start(self) -> None:
        # The first beat binds this stream as the leg's current one (a late end of a stream it replaced is
        # then ignored); a leg given up while this worker was stalled comes back if its session is held.
        try:
            if not self._lifecycle.stream_started(self._carrier, self._call_id, self._stream_id):
                log.warning("%s stream started after its session was over", self._context)
            self._guard.renew_leg(self._grant)
        except redis.RedisError as exc:
            log.warning("%s stream not bound: %s", self._context, exc)
        spawn(self._run, name="relay-heartbeat")

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self._lifecycle.heartbeat(self._carrier, self._call_id, self._stream_id)  # a refusal logs why
            self._guard.renew_leg(self._grant)
        except redis.RedisError as exc:  # Redis down: the call goes on; the beat resumes when it is back
            log.warning("%s heartbeat not recorded: %s", self._context, exc)


def _bind_stream(svc: Services, carrier: str, call_id: str, stream_id: str, context: str) -> None:
    """Make ``stream_id`` the leg's current stream, as a relay's first heartbeat does (see :class:`_Heartbeat`)."""
    try:
        svc.lifecycle.stream_started(carrier, call_id, stream_id)
    except redis.RedisError as exc:  # the end below is then ignored; the heartbeat expiry ends the leg instead
        log.warning("%s stream not bound: %s", context, exc)


def _leg_over(svc: Services, carrier: str, call_id: str, reason: EndReason, context: str, *, clean: bool,
              stream_id: str) -> None:
    try:
        svc.lifecycle.leg_ended(carrier, call_id, reason, clean=clean, stream_id=stream_id)
    except redis.RedisError as exc:  # the heartbeat expiry or a status callback ends it once Redis is back
        log.error("%s could not record the leg's end: %s", context, exc)
