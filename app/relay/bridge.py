"""Bridge one carrier media socket to its Kallglot session: verify, connect, relay, then hand the leg's end
to the session lifecycle. Vendor-free; each carrier's WebSocket route calls :func:`bridge_leg` with its codec.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from app.calls.agent import dial_agent_if_configured
from app.ops.draining import current_drain
from app.extensions import Services
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.kallglot.client import KallglotError
from app.logging_setup import bind_log_context
from app.carriers.contract import CarrierCodec
from app.relay.core import CarrierSocket, MediaRelay, RelayEnd, await_start, close_quietly
from app.kallglot.stream import KallglotStream, KallglotStreamError
from app.relay.tokens import InvalidRelayToken

log = logging.getLogger(__name__)

#: Names of the stream parameters our TwiML/TeXML sets and the relay reads back from ``start``.
SESSION_PARAMETER = "session_id"
RELAY_TOKEN_PARAMETER = "relay_token"
#: The leg end reason recorded when the Kallglot stream could not be opened at all.
KALLGLOT_UNREACHABLE = "relay_kallglot_unreachable"
#: Refresh a Kallglot stream token this close to its expiry rather than risk a refused connect.
TOKEN_REFRESH_MARGIN_SECONDS = 5.0


def bridge_leg(ws: CarrierSocket, codec: CarrierCodec, svc: Services) -> RelayEnd | None:
    """Serve one carrier media socket from ``connected`` to close; never raises."""
    started = await_start(ws, codec)
    if started is None:
        return None
    try:
        grant = svc.relay_tokens.open(started.parameters.get(RELAY_TOKEN_PARAMETER), carrier=codec.carrier,
                                      call_id=started.call_id)
    except InvalidRelayToken as exc:
        log.warning("%s call=%s media socket refused: %s", codec.carrier, started.call_id, exc)
        close_quietly(ws, 1008, "invalid relay token")
        return None
    context = f"{codec.carrier} call={grant.call_id} session={grant.session_id}"
    bind_log_context(carrier=codec.carrier, call_id=grant.call_id, session_id=grant.session_id)

    def open_kallglot() -> KallglotStream:
        """Open (or reopen) the session's stream; an expired token is refreshed with GET (assumption §9.4)."""
        stream_url, stream_token = grant.stream_url, grant.stream_token
        if grant.stream_expires_at and grant.stream_expires_at - time.time() < TOKEN_REFRESH_MARGIN_SECONDS:
            session = svc.kallglot.get_session(grant.session_id)
            if session.stream is None or session.status == "ended":
                raise KallglotStreamError("the Kallglot session has no stream (ended?)")
            stream_url, stream_token = session.stream.url, session.stream.token
        return KallglotStream.open(stream_url, stream_token)

    try:
        kallglot = open_kallglot()
    except (KallglotStreamError, KallglotError) as exc:
        log.error("%s could not reach the Kallglot stream: %s", context, exc)
        # Record first: the carrier reacts to the close at once (<Connect action>) and must find the reason.
        _leg_over(svc, codec.carrier, grant.call_id, KALLGLOT_UNREACHABLE, context, clean=False)
        close_quietly(ws, 1011, "translation service unavailable")
        return None
    log.info("%s relay started (stream %s)", context, started.stream_id)

    def record_end(end: RelayEnd, kallglot_reason: str) -> None:
        if end is RelayEnd.KALLGLOT_ENDED:
            try:
                svc.lifecycle.ended_by_kallglot(grant.session_id, kallglot_reason or "session.ended")
            except redis.RedisError as exc:
                log.error("%s could not record Kallglot's end: %s", context, exc)
        # Only the carrier's own "stream over" (or Kallglot's end) is clean; any loss may be reconnected.
        _leg_over(svc, codec.carrier, grant.call_id, f"relay_{end.value}", context,
                  clean=end in (RelayEnd.CARRIER_STOP, RelayEnd.KALLGLOT_ENDED))

    heartbeat = _Heartbeat(svc, codec.carrier, grant.call_id, context)
    heartbeat.start()
    if grant.speaker == SPEAKER_CUSTOMER:
        # Off the hot path: a REST call to the carrier, once per session (re-attached streams find it done).
        threading.Thread(target=dial_agent_if_configured, args=(svc, grant.session_id, codec.carrier),
                         name="dial-agent", daemon=True).start()
    try:
        relay = MediaRelay(ws, codec, kallglot, speaker=grant.speaker, chunk_ms=svc.settings.uplink_chunk_ms,
                           context=context, on_end=record_end, reopen_kallglot=open_kallglot,
                           reconnect_backoff_seconds=svc.settings.kallglot_reconnect_backoff_seconds,
                           ping_interval_seconds=svc.settings.kallglot_ping_interval_seconds)
        with current_drain().track(relay):  # a deploy's SIGTERM hands the leg over as lost (app/ops/draining.py)
            return relay.run()
    finally:
        heartbeat.stop()


class _Heartbeat:
    """Beats the leg's heartbeat in Redis while the relay runs, so a dead worker's legs are noticed."""

    def __init__(self, svc: Services, carrier: str, call_id: str, context: str) -> None:
        self._lifecycle = svc.lifecycle
        self._interval = svc.settings.heartbeat_timeout_seconds / 3
        self._carrier, self._call_id, self._context = carrier, call_id, context
        self._stopped = threading.Event()

    def start(self) -> None:
        self._beat()
        threading.Thread(target=self._run, name="relay-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self._lifecycle.heartbeat(self._carrier, self._call_id)
        except redis.RedisError as exc:  # Redis down: the call goes on; the beat resumes when it is back
            log.warning("%s heartbeat not recorded: %s", self._context, exc)


def _leg_over(svc: Services, carrier: str, call_id: str, reason: str, context: str, *, clean: bool) -> None:
    try:
        svc.lifecycle.leg_ended(carrier, call_id, reason, clean=clean)
    except redis.RedisError as exc:  # the heartbeat expiry or a status callback ends it once Redis is back
        log.error("%s could not record the leg's end: %s", context, exc)
