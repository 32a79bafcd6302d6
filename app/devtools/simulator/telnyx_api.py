"""A fake Telnyx Call Control (long: REST API, call side and control API share one in-memory state) for tests and
the demo: the REST API our SDK client talks to, plus Telnyx's side of the call — signed webhooks to the bridge
and the media-streaming socket the ``answer`` asks for.

Run as ONE process (state is in memory): ``gunicorn -k gevent -w 1 'app.devtools.simulator.telnyx_api:create_fake_call_control_app()'``
with ``FAKE_TELNYX_WEBHOOK_URL`` (where the bridge's ``/telnyx/call-control`` really listens),
``FAKE_TELNYX_SIGNING_SEED`` (base64 Ed25519 seed; the bridge gets its public key) and ``FAKE_TELNYX_API_KEY``.

Control API (tests, the CLI and the chaos run): ``POST /_fake/calls`` places an inbound call (``to``, ``from``,
``encoding``, ``sample_rate``, ``payload`` base64 in that codec, ``pace`` (in real time), ``listen_seconds``,
``reorder_media``,
``duplicate_webhooks``, ``reverse_final_webhooks`` (``call.hangup`` before the ``streaming.stopped`` it follows),
``fail_first_stream``, ``vanish`` (after talking, the caller's side drops the media socket without ``stop`` and
no further webhook comes), ``webhook_url`` (this call's webhooks go there instead of
``FAKE_TELNYX_WEBHOOK_URL``), ``patience_seconds`` (after talking, the caller waits that long for an answer before
listening: app.devtools.simulator.caller), ``restore_payload`` (what the caller says on a restored stream)), ``GET /_fake/calls/<id>`` reports it (commands, webhooks, what the caller heard),
``GET /_fake/commands``, ``POST /_fake/unanswered`` (``{number: hangup_cause}``: calls dialled to that number
ring and end with that cause — ``no_answer``, ``user_busy``, ``call_rejected`` — instead of answering),
``POST /_fake/reset``.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue

from app.devtools.simulator.sip import SipDialer
from app.devtools.simulator.telnyx import TelnyxMediaLeg, TelnyxSigner, new_call_control_id
from app.devtools.simulator.telnyx_contract import command_body_errors, payload_field_names, webhook_errors

EXTENSION_KEY = "fake_telnyx"
WEBHOOK_TIMEOUT_SECONDS = 10.0
#: Attempts per webhook (Telnyx redelivers a webhook that failed or got a 5xx), and the wait before the second
#: (doubling: 1, 2, 4, 8, 16 s — past the bridge's 20 s handling lease, as Telnyx's own retries reach further).
WEBHOOK_ATTEMPTS, WEBHOOK_RETRY_SECONDS = 6, 1.0
DIAL_RING_SECONDS = 0.3
#: A vanishing caller waits at most this long to hear something before its side drops.
VANISH_AFTER_SECONDS = 10.0


@dataclass
class FakeCall:
    """One call as the fake Telnyx sees it."""

    call_control_id: str
    to: str
    from_: str
    scenario: dict[str, Any]
    call_session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    call_leg_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    commands: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)  # {"event", "status"}
    spoken: list[str] = field(default_factory=list)
    heard: bytearray = field(default_factory=bytearray)
    protocol_errors: list[str] = field(default_factory=list)
    streams: int = 0
    close_codes: list[int | None] = field(default_factory=list)
    hung_up: bool = False
    transferred_to: str = ""
    sip_dials: list[dict[str, Any]] = field(default_factory=list)  # a transfer to a SIP URI: how each dial went
    leg: TelnyxMediaLeg | None = None
    #: Each stream as the caller waited on it (StreamWait.as_dict, app.devtools.simulator.caller), in order.
    waits: list[dict[str, Any]] = field(default_factory=list)
    #: Every stream's events, wall-clock stamped (the chaos run's timeline of the call).
    events: list[tuple[float, str]] = field(default_factory=list)
    #: Wall-clock times (``time.time()``): each media socket opened, each returned media message heard.
    stream_opened_at: list[float] = field(default_factory=list)
    heard_at: list[float] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """JSON for the control API (command bodies included: they hold no real secrets here)."""
        return {"call_control_id": self.call_control_id, "commands": self.commands, "webhooks": self.webhooks,
                "spoken": self.spoken, "heard": base64.b64encode(bytes(self.heard)).decode(),
                "protocol_errors": self.protocol_errors, "streams": self.streams, "close_codes": self.close_codes,
                "hung_up": self.hung_up, "transferred_to": self.transferred_to, "sip_dials": self.sip_dials,
                "waits": self.waits, "events": self.events,
                "stream_opened_at": self.stream_opened_at,
                # With the live stream's, so far: a test can wait until the caller hears Kallglot mid-call.
                "heard_at": self.heard_at + (list(self.leg.result.heard_at) if self.leg is not None else [])}


class FakeTelnyx:
    """The fake's state and behaviour; one per app."""

    def __init__(self, webhook_url: str, signer: TelnyxSigner, api_key: str) -> None:
        self.webhook_url, self.signer, self.api_key = webhook_url, signer, api_key
        self.lock = threading.Lock()
        self.calls: dict[str, FakeCall] = {}
        self.commands: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []  # commands answered 422 (fields the SDK's types do not define)
        self.unanswered: dict[str, str] = {}  # dialled number -> the hangup_cause it ends with, unanswered

    # ----- webhooks to the bridge -----
    def webhook(self, call: FakeCall, event_type: str, **payload: Any) -> None:
        """Deliver one signed Call Control event (twice, concurrently, when the scenario says so).

        The common ids go only into events whose SDK type defines them (``call.speak.ended`` has no ``to``);
        a field the SDK's event type does not define raises: the fake never sends what Telnyx does not.
        """
        common = {"call_control_id": call.call_control_id, "call_leg_id": call.call_leg_id,
                  "call_session_id": call.call_session_id, "connection_id": "1494404757140276705",
                  "from": call.from_, "to": call.to}
        defined = payload_field_names(event_type)
        message = {"data": {
            "record_type": "event", "event_type": event_type, "id": str(uuid.uuid4()),
            "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "payload": {**{k: v for k, v in common.items() if k in defined}, **payload}},
            "meta": {"attempt": 1, "delivered_to": self._webhook_url(call)}}
        errors = webhook_errors(message)
        if errors:
            raise ValueError(f"the fake would send what Telnyx does not define: {errors}")
        body = json.dumps(message)
        copies = 2 if call.scenario.get("duplicate_webhooks") else 1
        threads = [threading.Thread(target=self._deliver, args=(call, event_type, body), daemon=True)
                   for _ in range(copies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WEBHOOK_TIMEOUT_SECONDS + 1)

    def _webhook_url(self, call: FakeCall) -> str:
        return str(call.scenario.get("webhook_url") or self.webhook_url)

    def _deliver(self, call: FakeCall, event_type: str, body: str) -> None:
        """POST one event; as Telnyx delivers at least once, an attempt that fails or gets a 5xx is made again
        (``meta.attempt`` counting up, signed anew) up to :data:`WEBHOOK_ATTEMPTS` times."""
        message = json.loads(body)
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            if attempt > 1:
                time.sleep(WEBHOOK_RETRY_SECONDS * 2 ** (attempt - 2))
                message["meta"]["attempt"] = attempt
                body = json.dumps(message)
            try:
                status: int | str = requests.post(
                    self._webhook_url(call), data=body.encode(), timeout=WEBHOOK_TIMEOUT_SECONDS,
                    headers={"Content-Type": "application/json", **self.signer.headers(body)}).status_code
            except requests.RequestException as exc:
                status = f"failed: {exc}"
            with self.lock:
                call.webhooks.append({"event": event_type, "status": status, "attempt": attempt, "at": time.time()})
            if isinstance(status, int) and status < 500:
                return

    # ----- Telnyx's side of a call -----
    def place(self, call: FakeCall) -> None:
        """An inbound call arrives: ``call.initiated`` (parked) and wait for commands."""
        self.webhook(call, "call.initiated", direction="incoming", state="parked", client_state=None,
                     offered_codecs="PCMA,PCMU", start_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def answer_dialled(self, call: FakeCall, client_state: Any) -> None:
        """A call the bridge dialled rings, then is answered: ``call.initiated`` and ``call.answered`` (outgoing);
        or, for a number set up as unanswered, ends with its cause without ever being answered."""
        self.webhook(call, "call.initiated", direction="outgoing", state="bridging", client_state=client_state)
        time.sleep(DIAL_RING_SECONDS)
        cause = self.unanswered.get(call.to)
        if cause:
            self.hang_up(call, cause, source="callee")
            return
        self.webhook(call, "call.answered", state="answered", client_state=client_state)  # no direction (SDK)

    def command(self, call: FakeCall, action: str, body: dict[str, Any]) -> None:
        """React to a command as Telnyx would (runs after the HTTP response, in its own thread)."""
        state = body.get("client_state")
        if action == "answer":
            self.webhook(call, "call.answered", state="answered", client_state=state)
            if body.get("stream_url"):
                self.stream(call, body, state)
        elif action == "streaming_start":
            self.stream(call, body, state)
        elif action == "speak":
            call.spoken.append(str(body.get("payload", "")))
            self.webhook(call, "call.speak.started", client_state=state)
            self.webhook(call, "call.speak.ended", client_state=state, status="completed")
        elif action == "hangup":
            self.hang_up(call, "normal_clearing", source="callee")
        elif action == "transfer" and str(body.get("to", "")).startswith("sip:"):
            call.transferred_to = str(body["to"])
            self.transfer_to_sip(call, body)
        elif action == "transfer":  # the caller now talks to the transfer target; our leg's part is over
            call.transferred_to = str(body.get("to", ""))
            self.hang_up(call, "normal_clearing", source="callee")

    def stream(self, call: FakeCall, body: dict[str, Any], state: Any) -> None:
        """Open the media socket like Telnyx, stream the caller's audio, listen, then the caller hangs up."""
        scenario, first = call.scenario, call.streams == 0
        call.streams += 1
        if first and scenario.get("fail_first_stream"):
            self.webhook(call, "streaming.failed", client_state=state, failure_reason="connection_failed",
                         stream_id=str(uuid.uuid4()), stream_type="websocket",
                         stream_params={"stream_url": body.get("stream_url"), "track": body.get("stream_track")})
            return
        params = {p["name"]: p["value"] for p in body.get("custom_parameters") or []
                  if isinstance(p, dict) and "name" in p and "value" in p}
        try:
            leg = TelnyxMediaLeg(str(body.get("stream_url")), call_control_id=call.call_control_id,
                                 custom_parameters=params, auth_token=body.get("stream_auth_token"),
                                 encoding=scenario.get("encoding", "PCMU"),
                                 sample_rate=int(scenario.get("sample_rate", 8000)))
        except Exception as exc:  # noqa: BLE001 — a failed handshake is what streaming.failed reports
            call.protocol_errors.append(f"media handshake failed: {exc!r}")
            self.webhook(call, "streaming.failed", client_state=state, failure_reason=repr(exc)[:100])
            return
        call.leg = leg
        call.stream_opened_at.append(leg.result.opened_at)
        # Telnyx opens the stream with connected/start at once and reports streaming.started on its own
        # schedule: the media never waits for our webhook to be answered (a slow answer would otherwise hold
        # ``start`` back past the relay's 2 s limit and the stream would be refused — a fake's artifact).
        leg.begin(call.from_, call.to)
        _spawn(self.webhook, call, "streaming.started", client_state=state, stream_url=body.get("stream_url"))
        # The caller talks; on a restored stream (the line went quiet) they say "hello?" (``restore_payload``).
        talk = scenario.get("payload", "") if first else scenario.get("restore_payload", "")
        leg.stream(base64.b64decode(talk), pace=bool(scenario.get("pace")),
                   reorder=bool(scenario.get("reorder_media")), duplicate=bool(scenario.get("reorder_media")))
        # The patient caller (app.devtools.simulator.caller): audio, a spoken message or the stream's end answers.
        patience, spoken_before = float(scenario.get("patience_seconds") or 0), len(call.spoken)
        wait = leg.await_answer(time.time(), patience, lambda: len(call.spoken) > spoken_before)
        wait.restored = not first
        if first and scenario.get("vanish") and not leg.result.server_closed_first:
            # The caller's side is lost: heard something (or gave up waiting), then the socket drops; Telnyx
            # never reports anything more about this call. (A stream the bridge closed first — its worker was
            # killed, or it refused the socket — is not the caller vanishing: the caller is still on the line,
            # and Telnyx reports ``streaming.stopped`` as for any call, below.)
            if not patience:
                leg.wait_for(lambda r: bool(r.heard) or r.server_closed_first, VANISH_AFTER_SECONDS)
            leg.close_abruptly()
            call.leg, call.hung_up = None, True
            call.heard += leg.result.heard
            call.heard_at += leg.result.heard_at
            call.protocol_errors += leg.result.protocol_errors
            call.waits.append(wait.as_dict())
            call.events += leg.result.events
            return
        result = leg.finish(float(scenario.get("listen_seconds", 0.5)))
        call.leg = None
        call.heard += result.heard
        call.heard_at += result.heard_at
        call.protocol_errors += result.protocol_errors
        call.waits.append(wait.as_dict())
        call.events += result.events
        call.close_codes.append(result.close_code)
        caller_hung_up = not result.server_closed_first
        if caller_hung_up and scenario.get("reverse_final_webhooks"):  # delivered out of order
            self.hang_up(call, "normal_clearing", source="caller")
        self.webhook(call, "streaming.stopped", client_state=state, stream_url=body.get("stream_url"))
        if caller_hung_up:
            self.hang_up(call, "normal_clearing", source="caller")
        # Otherwise our side closed the stream while the caller is still on: wait for speak/hangup commands.

    def transfer_to_sip(self, call: FakeCall, body: dict[str, Any]) -> None:
        """Dial the SIP URI as the transfer's new leg (the emulator's SIP endpoint) and bridge the caller to it.

        Refused: the new leg's ``call.hangup`` (carrying ``target_leg_client_state``) and the caller stays on,
        waiting for commands, as Telnyx keeps the original call when a transfer fails. Answered: the caller talks,
        then one side hangs up and the caller's ``call.hangup`` follows (the far end first if the session ended).
        """
        scenario = call.scenario
        dial = SipDialer().dial(call.transferred_to, from_=call.from_,
                                audio=base64.b64decode(scenario.get("payload", "")))
        call.sip_dials.append({"uri": dial.uri, "sip_status": dial.sip_status, "reason": dial.reason})
        if not dial.answered:
            target = FakeCall(new_call_control_id(), to=call.transferred_to, from_=call.from_, scenario={})
            self.webhook(target, "call.hangup", hangup_cause="call_rejected", hangup_source="callee",
                         sip_hangup_cause=str(dial.sip_status), state="hangup",
                         client_state=body.get("target_leg_client_state"))
            return
        call.heard += dial.heard
        time.sleep(float(scenario.get("listen_seconds", 0.5)))
        ended_first = SipDialer().hang_up(dial)
        self.hang_up(call, "normal_clearing", source="callee" if ended_first else "caller")

    def hang_up(self, call: FakeCall, cause: str, *, source: str) -> None:
        """The call ends (once): ``call.hangup`` with a cause."""
        with self.lock:
            if call.hung_up:
                return
            call.hung_up = True
        if call.leg is not None:
            call.leg.hang_up()
        self.webhook(call, "call.hangup", hangup_cause=cause, hangup_source=source, sip_hangup_cause="200",
                     state="hangup", client_state=None)


def _spawn(target: Any, *args: Any, **kwargs: Any) -> None:
    # A greenlet under gunicorn's gevent worker.
    threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True).start()


def create_fake_call_control_app(config: dict[str, str] | None = None) -> Flask:
    """Build the fake Telnyx app from ``config`` or the ``FAKE_TELNYX_*`` environment variables."""
    settings = {name: os.environ.get(name, "") for name in
                ("FAKE_TELNYX_WEBHOOK_URL", "FAKE_TELNYX_SIGNING_SEED", "FAKE_TELNYX_API_KEY")}
    settings.update(config or {})
    signer = TelnyxSigner.from_seed_b64(settings["FAKE_TELNYX_SIGNING_SEED"]) \
        if settings["FAKE_TELNYX_SIGNING_SEED"] else TelnyxSigner()
    fake = FakeTelnyx(settings["FAKE_TELNYX_WEBHOOK_URL"], signer, settings["FAKE_TELNYX_API_KEY"])
    dialled_seconds = float(settings.get("FAKE_TELNYX_DIALLED_AUDIO_SECONDS") or 1)
    app = Flask(__name__)
    app.extensions[EXTENSION_KEY] = fake

    def authorised() -> None:
        if fake.api_key and request.headers.get("Authorization") != f"Bearer {fake.api_key}":
            abort(401)

    @app.post("/v2/calls/<call_control_id>/actions/<action>")
    def call_action(call_control_id: str, action: str) -> ResponseReturnValue:
        authorised()
        body = request.get_json(silent=True)
        errors = command_body_errors(action, body)
        if errors:  # as the real API: a field the command does not define is refused
            with fake.lock:
                fake.refused.append({"call_control_id": call_control_id, "action": action, "errors": errors})
            return jsonify(errors=[{"code": "10015", "title": "Invalid parameter", "detail": e} for e in errors]), 422
        entry = {"call_control_id": call_control_id, "action": action, "body": body, "at": time.time()}
        with fake.lock:
            fake.commands.append(entry)
            call = fake.calls.get(call_control_id)
            if call is not None:
                call.commands.append(entry)
        if call is not None and call.hung_up:
            return jsonify(errors=[{"code": "90018", "title": "Call has already ended"}]), 422
        if call is not None:  # a call placed through /_fake/calls: Telnyx's side reacts; others are only recorded
            _spawn(fake.command, call, action, body)
        return jsonify(data={"result": "ok"})

    @app.post("/v2/calls")
    def dial() -> ResponseReturnValue:
        authorised()
        body = request.get_json(silent=True)
        errors = command_body_errors("dial", body)
        if errors:
            with fake.lock:
                fake.refused.append({"call_control_id": None, "action": "dial", "errors": errors})
            return jsonify(errors=[{"code": "10015", "title": "Invalid parameter", "detail": e} for e in errors]), 422
        call_control_id = new_call_control_id()
        # The far end answers after a short ring and talks (dialled_audio_seconds of 0x07), then stays on
        # until hung up: like an agent picking up.
        call = FakeCall(call_control_id=call_control_id, to=str(body.get("to", "")), from_=str(body.get("from", "")),
                        scenario={"payload": base64.b64encode(b"\x07" * int(8000 * dialled_seconds)).decode(),
                                  "listen_seconds": 30})
        with fake.lock:
            fake.commands.append({"call_control_id": call_control_id, "action": "dial", "body": body})
            fake.calls[call_control_id] = call
        _spawn(fake.answer_dialled, call, body.get("client_state"))
        return jsonify(data={"call_control_id": call_control_id, "call_leg_id": str(uuid.uuid4()),
                             "call_session_id": str(uuid.uuid4()), "is_alive": False, "record_type": "call"})

    @app.post("/_fake/calls")
    def place_call() -> ResponseReturnValue:
        scenario = request.get_json(force=True)
        call = FakeCall(call_control_id=new_call_control_id(), to=scenario.get("to", "+15005550006"),
                        from_=scenario.get("from", "+15551230000"), scenario=scenario)
        with fake.lock:
            fake.calls[call.call_control_id] = call
        _spawn(fake.place, call)
        return jsonify(call_control_id=call.call_control_id)

    @app.get("/_fake/calls/<call_control_id>")
    def call_view(call_control_id: str) -> ResponseReturnValue:
        call = fake.calls.get(call_control_id) or abort(404)
        return jsonify(call.view())

    @app.post("/_fake/unanswered")
    def unanswered() -> ResponseReturnValue:
        numbers = request.get_json(force=True)
        if not isinstance(numbers, dict):
            abort(400)
        with fake.lock:
            fake.unanswered.update({str(k): str(v) for k, v in numbers.items()})
        return jsonify(unanswered=fake.unanswered)

    @app.get("/_fake/commands")
    def commands() -> ResponseReturnValue:
        return jsonify(commands=fake.commands, refused=fake.refused)

    @app.post("/_fake/reset")
    def reset() -> ResponseReturnValue:
        with fake.lock:
            fake.calls.clear()
            fake.commands.clear()
            fake.refused.clear()
            fake.unanswered.clear()
        return jsonify(status="reset")

    @app.get("/_fake/health")
    def health() -> ResponseReturnValue:
        return jsonify(status="ok", public_key=signer.public_key)

    return app
