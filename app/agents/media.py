"""``WS /agent/media``: one agent page's microphone and speaker bridged into its call's Kallglot session.

The socket needs the admin session the page was loaded with (the cookie comes with the upgrade) and the leg
must be one this admin session took; then the page's ``start`` must carry the single-use relay token sealed for
that leg (:mod:`app.relay.tokens`, checked by :func:`app.relay.bridge.bridge_leg` like a carrier's). A page that
goes away without hanging up (tab closed, network gone) is a lost leg: the call is offered to agents again.
"""
from __future__ import annotations

import logging
import re
import threading

import redis
from flask import Blueprint, request
from simple_websocket import ConnectionClosed

from app.admin.auth import session_owner, signed_in
from app.agents.codec import BrowserAgentCodec
from app.background import spawn
from app.calls.agent import offer_again
from app.calls.agent_queue import BROWSER_LEG
from app.calls.states import LEG_ENDED
from app.extensions import Services, services, sock
from app.relay.bridge import MEDIA_START_TIMEOUT_SECONDS, bridge_leg
from app.relay.core import CarrierSocket, RelayEnd, close_quietly

log = logging.getLogger(__name__)

bp = Blueprint("agents", __name__)

LEG_ID = re.compile(r"^agt_[0-9a-f]{16}$")
#: How a page's leg may end without the agent hanging up: the call goes back on the agents' list.
LOST_ENDS = frozenset({RelayEnd.CARRIER_LOST, RelayEnd.PROTOCOL_ERROR, RelayEnd.WORKER_DRAINING})


@sock.route("/agent/media", bp=bp)
def agent_media(ws: CarrierSocket) -> None:
    """``ws(s)://…/agent/media?leg=<leg id>``: refused (policy close 1008) without the admin session that took
    the leg; otherwise relayed until the page hangs up, goes away, or the session ends."""
    svc = services()
    leg_id = request.args.get("leg", "")
    refusal = ""
    if not svc.settings.admin_password or not signed_in():
        refusal = "admin session required"
    else:
        call = svc.lifecycle.call_record(BROWSER_LEG, leg_id) if LEG_ID.match(leg_id) else {}
        if not call or call.get("agent_owner") != session_owner():
            log.warning("agent media socket refused: leg %.40s is not this admin session's", leg_id)
            refusal = "not your call"
    if refusal:
        _refuse(ws, refusal)
        return
    stopped = threading.Event()
    spawn(_close_when_ended_elsewhere, svc, ws, leg_id, stopped, name="agent-leg-watch")
    try:
        end = bridge_leg(ws, BrowserAgentCodec(leg_id), svc)
    finally:
        stopped.set()
    if end in LOST_ENDS:
        offer_again(svc, call.get("session_id", ""), leg_id)


def _close_when_ended_elsewhere(svc: Services, ws: CarrierSocket, leg_id: str, stopped: threading.Event) -> None:
    """A phone leg ends when its carrier hangs it up; a page has no carrier. When the lifecycle ends this leg
    while its page is connected (the customer hung up and the session is held for the profile's hang-up grace,
    say), close the page's socket within a heartbeat interval instead of leaving the agent on a call with nobody."""
    interval = max(1.0, svc.settings.heartbeat_timeout_seconds / 3)
    while not stopped.wait(interval):
        try:
            ended = svc.lifecycle.call_record(BROWSER_LEG, leg_id).get("state") == LEG_ENDED
        except redis.RedisError:
            continue
        if ended:
            log.info("browser agent leg %s was ended elsewhere: closing its page's socket", leg_id)
            close_quietly(ws, 1000, "call ended")
            return


def _refuse(ws: CarrierSocket, reason: str) -> None:
    """Close with 1008 once the page's first frame is in (or after :data:`MEDIA_START_TIMEOUT_SECONDS`): a close
    sent in the same instant as the upgrade's answer is lost by some clients, which then see no reason at all."""
    try:
        ws.receive(timeout=MEDIA_START_TIMEOUT_SECONDS)
    except ConnectionClosed:
        return
    close_quietly(ws, 1008, reason)
