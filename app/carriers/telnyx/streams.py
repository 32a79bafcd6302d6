"""Streaming a Call Control leg into its session, and restoring a stream lost while the caller is still on.

A leg streams once answered (``start_streaming`` with the relay token in ``stream_auth_token`` and
``custom_parameters``). When its stream stops or fails with the call still up and no end of ours behind it
(the relay's worker was killed, a deploy drained it, the socket dropped), the stream is started again into the
same session, at most :data:`MAX_STREAM_RESTARTS` times per call; then the profile's fallback (message, then
forward or hang up) — as Twilio's ``<Connect action>`` does. Never silence. A stop or failure of a stream that
was already replaced (its generation is not the leg's newest: :mod:`app.carriers.telnyx.stream_generations`)
changes nothing.

Before restoring, a stop's handler lets the relay say why the stream ended (the caller's ``stop``, Kallglot's end)
for up to :data:`RELAY_SETTLE_SECONDS` — but only while the relay's worker is alive or unknown: a relay whose
worker's liveness key is gone (killed) will never say anything, and its caller is restored at once
(:mod:`app.calls.workers`).
"""
from __future__ import annotations

import logging
import time

from app.calls.events import announce_fallback
from app.calls.leg_spec import LegSpec
from app.calls.lifecycle import LEG_ENDED
from app.calls.workers import RELAY_WORKER_FIELD
from app.extensions import Services
from app.kallglot.client import KallglotError, StreamGrant
from app.kallglot.stream_protocol import SPEAKER_CUSTOMER
from app.kallglot.telephony import direct_parameters, sip_uri
from app.profiles import TRANSPORT_DIRECT, TRANSPORT_RELAY, TRANSPORT_SIP
from app.relay.bridge import KALLGLOT_UNREACHABLE
from app.relay.core import RelayEnd
from app.carriers.telnyx import CARRIER
from app.carriers.telnyx.control import GOODBYE_SESSION_OVER, GOODBYE_UNAVAILABLE, TelnyxControl
from app.carriers.telnyx.events import CallEvent, command, say_goodbye
from app.carriers.telnyx.media import UNSUPPORTED_CODEC
from app.carriers.telnyx.session import seal_relay_token
from app.carriers.telnyx.stream_generations import claim_loss, current_generation, generation_of

log = logging.getLogger(__name__)

#: How long a stop's handler waits for a live (or unknown) relay to record why the stream ended (normally
#: milliseconds); a relay whose worker is known gone is not waited for (:func:`_settled`).
RELAY_SETTLE_SECONDS = 3.0
#: How often the settle looks again at the leg's record and its relay's worker.
SETTLE_POLL_SECONDS = 0.05

#: Streams restored per call before the fallback (as Twilio's ``<Connect action>``).
MAX_STREAM_RESTARTS = 3
#: Leg ends that are not losses: Telnyx stopped the stream itself (call over), or our relay ended it on purpose
#: and the media socket route already said goodbye (Kallglot ended, unreachable or lost; a protocol error).
NOT_RESTORED_ENDS = frozenset({f"relay_{end.value}" for end in (
    RelayEnd.CARRIER_STOP, RelayEnd.KALLGLOT_ENDED, RelayEnd.KALLGLOT_LOST, RelayEnd.PROTOCOL_ERROR)}
    | {KALLGLOT_UNREACHABLE, UNSUPPORTED_CODEC, "answer_failed", "session_unavailable", "stream_restarts_exhausted"})


def stream_leg(svc: Services, control: TelnyxControl, event: CallEvent, session_id: str, speaker: str) -> None:
    """An answered leg (ours inbound, or one we dialled) streams into ``session_id`` as ``speaker``.

    An inbound leg was registered on ``call.initiated``; a dialled one is registered here if ``dial``'s caller
    has not done so yet (Telnyx may report the answer before ``dial`` returned).
    """
    try:
        call = svc.lifecycle.call_record(CARRIER, event.call_id)
        if call.get("state") == LEG_ENDED:
            log.info("telnyx call=%s answered after its leg ended; not streaming", event.call_id)
            return
        transport = call.get("transport") or TRANSPORT_RELAY
        session = svc.kallglot.get_session(session_id)  # also a fresh stream token (5-minute tokens)
        if session.status == "ended" or (session.stream is None and transport != TRANSPORT_SIP):
            raise KallglotError("session has no stream", code="no_stream")
        if call.get("session_id") != session_id:
            record = svc.lifecycle.session_record(session_id)
            leg = LegSpec.joining(record, carrier=CARRIER, call_id=event.call_id, speaker=speaker,
                                  from_number=str(event.payload.get("from") or ""),
                                  to_number=str(event.payload.get("to") or ""))
            if not svc.lifecycle.register_leg(leg, session_id=session_id):
                raise KallglotError("the session has already ended", code="session_ended")
    except KallglotError as exc:
        log.error("telnyx call=%s leg cannot stream into session=%s: %s", event.call_id, session_id, exc)
        if speaker == SPEAKER_CUSTOMER:  # the caller hears why, never silence
            svc.lifecycle.leg_ended(CARRIER, event.call_id, "session_unavailable", clean=False)
            say_goodbye(svc, control, event, GOODBYE_UNAVAILABLE, _called_number(svc, event))
        else:
            command(event, "hangup", lambda: control.hang_up(event.call_id, event.command_id("hangup")))
        return
    _put_on_session(svc, control, event, session_id, session.stream, speaker, transport, "streaming_start",
                    current_generation(svc, session_id, event.call_id))


def _put_on_session(svc: Services, control: TelnyxControl, event: CallEvent, session_id: str,
                    stream: StreamGrant | None, speaker: str, transport: str, label: str, generation: int) -> None:
    """The command that puts an answered leg on its session by its transport: ``start_streaming`` to our relay
    (relay token) or straight to Kallglot (its fresh stream token), as stream ``generation``; or ``transfer`` to
    the session's SIP URI."""
    command_id = event.command_id("streaming_start")
    if transport == TRANSPORT_SIP:
        uri = sip_uri(session_id, svc.settings.kallglot_sip_domain)
        command(event, "transfer (sip)", lambda: control.transfer_to_sip(event.call_id, sip_uri=uri,
                                                                        command_id=command_id))
        return
    assert stream is not None
    if transport == TRANSPORT_DIRECT:
        command(event, f"{label} (direct)", lambda: control.start_direct_streaming(
            event.call_id, stream_url=stream.url, parameters=direct_parameters(session_id, stream),
            generation=generation, command_id=command_id))
        return
    token = seal_relay_token(svc, session_id, event.call_id, stream, speaker=speaker)
    command(event, label, lambda: control.start_streaming(
        event.call_id, session_id=session_id, relay_token=token, generation=generation, command_id=command_id))


def _called_number(svc: Services, event: CallEvent) -> str:
    """The number the caller dialled (whose profile applies); the session's when the event does not say."""
    to_number = str(event.payload.get("to") or "")
    if to_number:
        return to_number
    session_id = svc.lifecycle.session_for_call(CARRIER, event.call_id)
    return svc.lifecycle.session_record(session_id).get("to", "") if session_id else ""


def streaming_stopped(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """The stream stopped: restore it if that was a loss with the caller still on (see the module docstring)."""
    _restore_if_lost(svc, control, event, "streaming stopped")


def streaming_failed(svc: Services, control: TelnyxControl, event: CallEvent) -> None:
    """Telnyx could not open (or keep) the stream: restore it, up to the limit, then the fallback."""
    log.warning("telnyx call=%s streaming failed: %s", event.call_id, str(event.payload.get("failure_reason"))[:200])
    _restore_if_lost(svc, control, event, "streaming failed")


def _settled(svc: Services, call_id: str, call: dict[str, str]) -> tuple[dict[str, str], str]:
    """The leg's record once its relay has recorded an end, is known gone, or had :data:`RELAY_SETTLE_SECONDS`;
    and why the wait stopped (``recorded``, ``worker gone``, ``settle over``).

    Telnyx reports the stop as the socket closes, while the relay may still be recording why (the caller's
    ``stop``, Kallglot's end). The relay recorded its worker on the leg when it took the socket
    (:mod:`app.calls.workers`): once that worker's liveness key is gone (killed: it renews nothing) the relay will
    never record anything, and the caller should not sit in silence for the rest of the settle. While the worker
    lives, or when no worker is recorded, the relay gets the full settle to have its say.
    """
    deadline = time.monotonic() + RELAY_SETTLE_SECONDS
    worker = call.get(RELAY_WORKER_FIELD, "")
    while call.get("state") != LEG_ENDED:
        if worker and not svc.workers.is_alive(worker):
            # Read once more: the relay may have recorded its end just before its worker went.
            call = svc.lifecycle.call_record(CARRIER, call_id)
            return call, "recorded" if call.get("state") == LEG_ENDED else "worker gone"
        if time.monotonic() >= deadline:
            return call, "settle over"
        time.sleep(SETTLE_POLL_SECONDS)
        call = svc.lifecycle.call_record(CARRIER, call_id)
    return call, "recorded"


def _hung_up(svc: Services, call_id: str) -> bool:
    """Telnyx said the call is over (``call.hangup`` recorded)."""
    return any(e.get("event") == "call.hangup" for e in svc.lifecycle.events(CARRIER, call_id))


def _restore_if_lost(svc: Services, control: TelnyxControl, event: CallEvent, why: str) -> None:
    call = svc.lifecycle.call_record(CARRIER, event.call_id)
    session_id = call.get("session_id")
    if not session_id or _hung_up(svc, event.call_id):
        return  # not ours, or the call is over
    newest = current_generation(svc, session_id, event.call_id)
    generation = generation_of(event)
    if generation is None:  # another command's client_state: about the newest stream (see stream_generations)
        generation = newest
    if generation < newest:  # checked before the settle wait: a stale event must not hold its webhook 3 s
        log.info("telnyx call=%s %s for stream generation %d, replaced by %d: nothing to restore", event.call_id,
                 why, generation, newest)
        return
    transport = call.get("transport") or TRANSPORT_RELAY
    settled = "recorded"
    if call.get("state") != LEG_ENDED and transport == TRANSPORT_RELAY:  # no relay to settle for a direct stream
        call, settled = _settled(svc, event.call_id, call)
    reason = call.get("end_reason", "") if call.get("state") == LEG_ENDED else ""
    if reason in NOT_RESTORED_ENDS or reason.startswith(("hangup_", "call_")):
        return
    if settled != "recorded" and _hung_up(svc, event.call_id):  # the caller's own hang-up came in meanwhile
        return
    speaker = call.get("speaker") or SPEAKER_CUSTOMER
    next_generation = claim_loss(svc, session_id, event.call_id, generation)
    if next_generation is None:  # a newer stream replaced this one meanwhile (another report of the same loss)
        log.info("telnyx call=%s %s for stream generation %d: already handled", event.call_id, why, generation)
        return
    if int(call.get("stream_restarts") or 0) >= MAX_STREAM_RESTARTS:
        log.error("telnyx call=%s %s after %d restores: fallback", event.call_id, why, MAX_STREAM_RESTARTS)
        svc.lifecycle.leg_ended(CARRIER, event.call_id, "stream_restarts_exhausted", clean=False)
        announce_fallback(svc.redis, svc.keys, session_id, carrier=CARRIER, call_id=event.call_id, speaker=speaker,
                          why="stream_restarts_exhausted")
        if speaker == SPEAKER_CUSTOMER:
            say_goodbye(svc, control, event, GOODBYE_UNAVAILABLE, _called_number(svc, event))
        else:
            command(event, "hangup", lambda: control.hang_up(event.call_id, event.command_id("hangup")))
        return
    try:
        stream = svc.kallglot.get_session(session_id).stream
    except KallglotError as exc:
        log.error("telnyx call=%s session=%s cannot be re-streamed: %s", event.call_id, session_id, exc)
        stream = None
    if stream is None or not svc.lifecycle.reattach_leg(CARRIER, event.call_id):
        svc.lifecycle.leg_ended(CARRIER, event.call_id, "session_unavailable", clean=False)
        if speaker == SPEAKER_CUSTOMER:
            say_goodbye(svc, control, event, GOODBYE_SESSION_OVER, _called_number(svc, event))
        return
    # Telnyx reported this (the newest) stream over: a killed worker's relay lease must not refuse the restored
    # stream as "another relay is live" (a stale event never gets here, so a live newer relay keeps its lease).
    svc.relay_guard.forget_leg(CARRIER, event.call_id)
    # The new stream's relay records its own worker; until then a stop of it waits the full settle.
    svc.workers.forget_relay(CARRIER, event.call_id)
    log.info("telnyx call=%s session=%s %s while the call is up (%s): restoring the stream", event.call_id,
             session_id, why, reason or f"relay gone: {settled}")
    _put_on_session(svc, control, event, session_id, stream, speaker, transport, "streaming_start (restore)",
                    next_generation)
