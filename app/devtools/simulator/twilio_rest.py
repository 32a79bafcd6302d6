"""A fake of Twilio's REST API: the ``Calls`` resource really "places" the calls it is asked for, and the
``IncomingPhoneNumbers`` resource (from :mod:`~app.devtools.simulator.number_apis`, seeded with the demo's
numbers) lets the admin's "Connect a number" run end to end.

``calls.create`` (POST …/Calls.json) answers like Twilio and, after a short ring, has the
:class:`~app.devtools.simulator.twilio.TwilioCallSimulator` answer the call: it requests the ``Url`` given, follows
the TwiML, streams audio as the far end and posts the ``StatusCallback``. ``calls(sid).update(
status="completed")`` hangs such a call up; ``update(twiml=…)`` redirects it (its stream stops, the new TwiML
runs). Tests and the demo point ``TWILIO_API_URL`` here.

Control endpoints: ``POST /_fake/numbers`` (``{number: behaviour}``: calls placed to that number ring, then end
``busy``, ``no-answer`` or ``failed`` without being answered — the status callback says so — or, for
``hangs-up``, answer, talk and hang up by themselves a moment later), ``POST /_fake/inbound``
(``{to, from, audio_byte, audio_seconds, listen_seconds}``: an inbound call to the service that this fake runs,
so ``update`` can reach it as it reaches Twilio's own calls; answers its ``sid``), ``GET /_fake/calls``,
``POST /_fake/reset``.

Run it as ONE process (state is in memory): ``gunicorn -k gevent -w 1 'app.devtools.simulator.twilio_rest:create_fake_twilio_rest()'``.
Settings (env, or the ``config`` mapping): ``FAKE_TWILIO_BRIDGE_URL`` (where the service really listens),
``FAKE_TWILIO_PUBLIC_URL`` (its PUBLIC_URL; default the same), ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``,
``FAKE_TWILIO_ANSWER_AUDIO`` (bytes value repeated as the far end's speech, default 0x07),
``FAKE_TWILIO_ANSWER_SECONDS`` (how long the far end talks, default 1), ``FAKE_TWILIO_MAX_CALL_SECONDS`` (60).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue

from app.devtools.simulator.number_apis import add_twilio_number_routes, demo_twilio_numbers
from app.devtools.simulator.twilio import CallResult, SimulatedStream, TwilioCallSimulator, new_sid
from app.devtools.simulator.twilio_contract import create_call_parameters, unknown_parameters, update_call_parameters

RING_SECONDS = 0.3
#: Final statuses of a call that was never answered.
UNANSWERED_STATUSES = frozenset({"busy", "no-answer", "failed"})
#: A party set to ``hangs-up`` stays on this long after talking, then hangs up by itself.
HANGS_UP_AFTER_SECONDS = 1.5


@dataclass
class PlacedCall:
    """One outbound call the fake placed, and what happened on it."""

    sid: str
    to: str
    from_: str
    url: str
    status_callback: str | None
    status: str = "queued"
    hang_up: threading.Event = field(default_factory=threading.Event)
    redirects: list[str] = field(default_factory=list)  # TwiML documents put in place by update(twiml=…)
    redirected: threading.Event = field(default_factory=threading.Event)
    hung_up_by_api: bool = False
    result: CallResult | None = None

    def view(self) -> dict[str, Any]:
        """JSON for the control endpoint."""
        r = self.result
        return {"sid": self.sid, "to": self.to, "from": self.from_, "status": self.status,
                "hung_up_by_api": self.hung_up_by_api,
                "sent_bytes": len(r.sent_audio) if r else 0, "heard_bytes": len(r.heard_audio) if r else 0,
                "streams": r.streams if r else 0, "said": r.said if r else [], "redirects": self.redirects,
                "dialled": r.dialled if r else [],
                "protocol_errors": r.protocol_errors if r else [], "errors": r.errors if r else []}


def create_fake_twilio_rest(config: dict[str, str] | None = None) -> Flask:
    """The fake's Flask app (state in ``app.extensions["fake_twilio_calls"]``)."""
    env = {**os.environ, **(config or {})}
    account_sid, auth_token = env.get("TWILIO_ACCOUNT_SID", ""), env.get("TWILIO_AUTH_TOKEN", "")
    bridge_url = env.get("FAKE_TWILIO_BRIDGE_URL", "http://127.0.0.1:5000")
    simulator = TwilioCallSimulator(bridge_url, auth_token, public_url=env.get("FAKE_TWILIO_PUBLIC_URL") or None,
                                    account_sid=account_sid)
    answer_audio = bytes([int(env.get("FAKE_TWILIO_ANSWER_AUDIO", "7"))]) * int(
        8000 * float(env.get("FAKE_TWILIO_ANSWER_SECONDS", "1")))
    max_call = float(env.get("FAKE_TWILIO_MAX_CALL_SECONDS", "60"))
    app = Flask(__name__)
    calls: dict[str, PlacedCall] = {}
    app.extensions["fake_twilio_calls"] = calls
    lock = threading.Lock()
    behaviours: dict[str, str] = {}
    add_twilio_number_routes(app, {"seed": {"account_sid": account_sid, "auth_token": auth_token,
                                            "numbers": demo_twilio_numbers()}})

    def require_auth(account: str) -> None:
        auth = request.authorization
        if account != account_sid or not auth or (auth.username, auth.password) != (account_sid, auth_token):
            abort(401)

    def until_hung_up(call: PlacedCall, seconds: float) -> Callable[[SimulatedStream], None]:
        def hold(stream: SimulatedStream) -> None:
            # The party stays on until the service hangs it up or redirects the call, the service closes the
            # stream, or time runs out.
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not call.hang_up.is_set() and not stream.server_closed:
                if call.redirected.wait(0.1):
                    stream.redirect(call.redirects[-1])
                    return
            if call.hang_up.is_set() and not stream.server_closed:
                stream.hang_up()  # hung up through the API: the call is over at once, nothing more is heard
        return hold

    def run_call(call: PlacedCall) -> None:
        time.sleep(RING_SECONDS)  # ringing: the service registers the leg meanwhile, as with real Twilio
        behaviour = behaviours.get(call.to, "")
        never = behaviour if behaviour in UNANSWERED_STATUSES else ""
        if never:  # rang out, busy or failed: only the final status callback, as Twilio sends it
            call.status = never
            if call.status_callback:
                params = {**simulator.base_params(call.to, call.from_, call.sid, never), "CallDuration": "0",
                          "Direction": "outbound-api", "CallbackSource": "call-progress-events",
                          "SequenceNumber": "0"}
                try:
                    simulator.signed_request(call.status_callback, params)
                except requests.RequestException:
                    pass
            return
        call.status = "in-progress"
        call.result = simulator.answer_outbound_call(call.url, to=call.to, from_=call.from_, call_sid=call.sid,
                                                     audio=answer_audio, status_callback=call.status_callback,
                                                     hold_open=until_hung_up(call, HANGS_UP_AFTER_SECONDS
                                                                             if behaviour == "hangs-up" else max_call),
                                                     listen_seconds=0)
        call.status = "completed"

    def run_inbound(call: PlacedCall, audio: bytes, listen_seconds: float) -> None:
        call.status = "in-progress"
        call.result = simulator.place_call(call.to, call.from_, audio, pace=False, call_sid=call.sid,
                                           listen_seconds=listen_seconds,
                                           hold_open=until_hung_up(call, listen_seconds))
        call.status = "completed"

    @app.post("/2010-04-01/Accounts/<account>/Calls.json")
    def create_call(account: str) -> ResponseReturnValue:
        require_auth(account)
        form = request.form
        unknown = unknown_parameters(form.keys(), create_call_parameters())
        if unknown:  # the twilio library's CallList.create has no such parameter: Twilio would refuse it
            return jsonify(code=21200, message=f"unknown parameters: {', '.join(unknown)}", status=400), 400
        if not form.get("To") or not form.get("From") or not form.get("Url"):  # this fake runs Url calls only
            return jsonify(code=21205, message="To, From and Url are required", status=400), 400
        call = PlacedCall(sid=new_sid("CA"), to=form["To"], from_=form["From"], url=form["Url"],
                          status_callback=form.get("StatusCallback"))
        with lock:
            calls[call.sid] = call
        threading.Thread(target=run_call, args=(call,), daemon=True).start()
        return jsonify(_call_json(account, call)), 201

    @app.post("/2010-04-01/Accounts/<account>/Calls/<sid>.json")
    def update_call(account: str, sid: str) -> ResponseReturnValue:
        require_auth(account)
        unknown = unknown_parameters(request.form.keys(), update_call_parameters())
        if unknown:
            return jsonify(code=21200, message=f"unknown parameters: {', '.join(unknown)}", status=400), 400
        call = calls.get(sid)
        if call is None:
            return jsonify(code=20404, message="The requested resource was not found", status=404), 404
        if request.form.get("Status") in ("completed", "canceled"):
            if call.status == "completed":
                return jsonify(code=21220, message="Call is not in-progress. Cannot redirect.", status=400), 400
            call.hung_up_by_api = True
            call.hang_up.set()
        elif request.form.get("Twiml"):
            if call.status != "in-progress" or call.redirected.is_set():
                return jsonify(code=21220, message="Call is not in-progress. Cannot redirect.", status=400), 400
            call.redirects.append(request.form["Twiml"])
            call.redirected.set()
        return jsonify(_call_json(account, call)), 200

    @app.post("/_fake/numbers")
    def set_behaviours() -> ResponseReturnValue:
        numbers = request.get_json(force=True)
        if not isinstance(numbers, dict) or set(map(str, numbers.values())) - {*UNANSWERED_STATUSES, "hangs-up"}:
            abort(400)
        behaviours.update({str(k): str(v) for k, v in numbers.items()})
        return jsonify(numbers=behaviours)

    @app.post("/_fake/inbound")
    def inbound() -> ResponseReturnValue:
        body = request.get_json(force=True)
        audio = bytes([int(body.get("audio_byte", 255))]) * int(8000 * float(body.get("audio_seconds", 0.2)))
        call = PlacedCall(sid=new_sid("CA"), to=str(body["to"]), from_=str(body["from"]), url="",
                          status_callback=None)
        with lock:
            calls[call.sid] = call
        threading.Thread(target=run_inbound, args=(call, audio, float(body.get("listen_seconds", 10))),
                         daemon=True).start()
        return jsonify(sid=call.sid), 201

    @app.get("/_fake/calls")
    def list_calls() -> ResponseReturnValue:
        return jsonify(calls=[c.view() for c in calls.values()])

    @app.post("/_fake/reset")
    def reset() -> ResponseReturnValue:
        with lock:
            for call in calls.values():
                call.hang_up.set()
            calls.clear()
            behaviours.clear()
        return jsonify(status="ok")

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok")

    return app


def _call_json(account: str, call: PlacedCall) -> dict[str, Any]:
    return {"sid": call.sid, "account_sid": account, "to": call.to, "from": call.from_, "status": call.status,
            "direction": "outbound-api", "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{account}/Calls/{call.sid}.json"}
