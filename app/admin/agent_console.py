"""The Agent page: signed-in agents see calls waiting for a browser agent, take one (the first click wins, in
Redis), and talk on it from the browser (``static/agent.js``: microphone → AudioWorklet → 8 kHz μ-law 20 ms frames
→ ``WS /agent/media``; Kallglot's audio → jitter buffer → speaker; mute, hang up, live transcript).

Taking a call registers a browser leg (:data:`~app.calls.agent_queue.BROWSER_LEG`) in the session, bound to the
admin session that took it; the call page seals a single-use relay token for that leg each time it is opened, so
an agent whose tab closed rejoins by opening the page again while the session lives.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import Any

import redis
from flask import abort, flash, jsonify, redirect, render_template, url_for
from flask.typing import ResponseReturnValue

from app.admin.auth import admin_name, session_owner
from app.admin.blueprint import bp
from app.admin.live import valid_session_id
from app.calls.agent import customer_on_call, offer_again, other_agent_on_call
from app.calls.agent_queue import BROWSER_LEG, AgentQueue
from app.calls.leg_spec import LegSpec
from app.calls.legs import live_session
from app.calls.states import LEG_LIVE
from app.extensions import Services, services
from app.kallglot.client import KallglotError
from app.kallglot.stream_protocol import SPEAKER_AGENT

log = logging.getLogger(__name__)


def _queue(svc: Services) -> AgentQueue:
    return AgentQueue(svc.redis, svc.keys)


def _waiting(svc: Services) -> list[dict[str, Any]]:
    """The calls agents may take now. A call whose customer hung up stays in the queue until its wait runs out
    (the reaper's pass then gives it up); it is not shown meanwhile, so no agent reaches for a call that is over."""
    return [offer for offer in _queue(svc).waiting() if customer_on_call(svc, offer.get("session_id", ""))]


def _my_calls(svc: Services) -> list[dict[str, str]]:
    """Calls this admin session took that are still going (to rejoin after a closed tab)."""
    owner, mine = session_owner(), []
    for session_id in sorted(svc.lifecycle.live_session_ids()):
        for (carrier, call_id), state in svc.lifecycle.session_legs(session_id).items():
            if carrier == BROWSER_LEG and svc.lifecycle.call_record(carrier, call_id).get("agent_owner") == owner:
                mine.append({"session_id": session_id, "leg": call_id, "state": state})
    return mine


@bp.get("/agent")
def agent_page() -> ResponseReturnValue:
    """Calls waiting for an agent (the page refreshes the list by itself; without JavaScript, by reload)."""
    svc = services()
    return render_template("admin/agent.html", waiting=_waiting(svc), mine=_my_calls(svc),
                           agent=admin_name())


@bp.get("/agent/waiting.json")
def agent_waiting() -> ResponseReturnValue:
    """The waiting calls as JSON, for the page's own refresh."""
    offers = _waiting(services())
    return jsonify(waiting=[{k: o.get(k, "") for k in ("session_id", "from", "to", "source_language",
                                                        "target_language", "reason", "seconds_left")}
                            for o in offers])


@bp.post("/agent/take/<session_id>")
def agent_take(session_id: str) -> ResponseReturnValue:
    """Take a waiting call: the first agent wins (atomically in Redis); the others are told it is gone."""
    svc = services()
    valid_session_id(session_id)
    leg_id = f"agt_{secrets.token_hex(8)}"
    queue = _queue(svc)
    if not customer_on_call(svc, session_id):  # a page loaded before the customer hung up
        flash("That call has just ended.", "error")
        return redirect(url_for("admin.agent_page")), 303
    if not queue.take(session_id, agent=admin_name(), owner=session_owner(), leg_id=leg_id):
        taken_by = queue.offer_record(session_id).get("agent")
        flash(f"{taken_by} took that call first." if taken_by else "That call is no longer waiting.", "error")
        return redirect(url_for("admin.agent_page")), 303
    record = svc.lifecycle.session_record(session_id)
    # The page opens its media socket at once; a tab closed right after Take must not keep the call for the
    # lifecycle's 60 s stream-start grace: the reaper gives the leg up after the short bound and offers it again.
    leg = dataclasses.replace(
        LegSpec.joining(record, carrier=BROWSER_LEG, call_id=leg_id, speaker=SPEAKER_AGENT,
                        from_number=admin_name(), to_number=record.get("to", "")),
        start_grace_seconds=svc.settings.agent_socket_open_seconds)
    if record.get("status") == "ended" or not svc.lifecycle.register_leg(leg, session_id=session_id):
        flash("That call has just ended.", "error")
        return redirect(url_for("admin.agent_page")), 303
    svc.redis.hset(svc.keys.call(BROWSER_LEG, leg_id), mapping={"agent_owner": session_owner(),
                                                                "agent_name": admin_name()})
    log.info("session=%s taken by browser agent %r as leg %s", session_id, admin_name(), leg_id)
    return redirect(url_for("admin.agent_call", leg_id=leg_id)), 303


@bp.get("/agent/call/<leg_id>")
def agent_call(leg_id: str) -> ResponseReturnValue:
    """The call page: microphone, speaker, mute, hang up and the live transcript. Each visit seals a new
    single-use relay token; a lost leg (closed tab) is made live again when the session still runs."""
    svc = services()
    call = svc.lifecycle.call_record(BROWSER_LEG, leg_id)
    if not call or call.get("agent_owner") != session_owner():
        abort(404, description="no such call of yours")
    session_id = call["session_id"]
    record = svc.lifecycle.session_record(session_id)
    state = svc.lifecycle.session_legs(session_id).get((BROWSER_LEG, leg_id), "")
    token, problem = "", ""
    try:
        session = live_session(svc, session_id) if record.get("status") != "ended" else None
        if session is None:
            problem = "This call has ended."
        elif state != LEG_LIVE and not _rejoin(svc, session_id, leg_id):
            problem = "This call can no longer be rejoined."
        else:
            assert session.stream is not None  # live_session returns sessions with a stream only
            token = svc.relay_tokens.seal_stream(session.stream, session_id=session_id, carrier=BROWSER_LEG,
                                                 call_id=leg_id, speaker=SPEAKER_AGENT)
    except (KallglotError, redis.RedisError) as exc:
        log.error("session=%s agent call page: %s", session_id, exc)
        problem = "The translation service cannot be reached right now; reload to try again."
    return render_template("admin/agent_call.html", leg_id=leg_id, session_id=session_id, record=record,
                           token=token, problem=problem, opened_at=time.time())


@bp.post("/agent/call/<leg_id>/give-back")
def agent_give_back(leg_id: str) -> ResponseReturnValue:
    """The agent cannot take the call after all (no microphone, wrong call): their leg ends as lost — the
    customer is not hung up — and the call goes back on the waiting list."""
    svc = services()
    call = svc.lifecycle.call_record(BROWSER_LEG, leg_id)
    if not call or call.get("agent_owner") != session_owner():
        abort(404, description="no such call of yours")
    svc.lifecycle.leg_ended(BROWSER_LEG, leg_id, "agent_gave_back", clean=False)
    if offer_again(svc, call["session_id"], leg_id, reason="agent_gave_back"):
        flash("The call is back on the waiting list.", "ok")
    else:
        flash("That call has ended.", "error")
    return redirect(url_for("admin.agent_page")), 303


def _rejoin(svc: Services, session_id: str, leg_id: str) -> bool:
    """The agent came back to a call whose leg was lost: take it off the agents' list again (unless another
    agent already took it) and make the leg live again. Not once another agent is on the call (the agent number
    dialled when the wait ran out): the customer would have two agents."""
    if other_agent_on_call(svc, session_id, leg_id):
        return False
    queue = _queue(svc)
    offer = queue.offer_record(session_id)
    if offer.get("state") == "waiting" and not queue.withdraw(session_id, "rejoined"):
        return False
    if offer.get("state") == "taken" and offer.get("leg") not in ("", leg_id):
        return False
    if svc.lifecycle.reattach_leg(BROWSER_LEG, leg_id) is None:
        return False
    svc.relay_guard.forget_leg(BROWSER_LEG, leg_id)
    return True
