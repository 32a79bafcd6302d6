"""Every point where Twilio's own definitions are silent or ambiguous, what the bridge assumes, and on what basis.

The Twilio counterpart of ``app/carriers/telnyx/assumptions.py``; the README lists these. *documented*: a
Twilio page or the twilio library says so; *inferred*: nothing official says so. Sources: the twilio library
9.x (``twilio/twiml/voice_response.py``, ``twilio/rest/api/v2010/account/call/__init__.py``,
``twilio/request_validator.py``); https://www.twilio.com/docs/voice/media-streams/websocket-messages ;
https://www.twilio.com/docs/voice/twiml/stream ; https://www.twilio.com/docs/voice/twiml/connect .
"""
from __future__ import annotations

from app.carriers.contract import Assumption

ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption(
        "stream URL query",
        "Twilio drops the query string of a <Stream url>; custom data goes in <Parameter> → start.customParameters.",
        "Stream page; error 31922 page", True, "The relay token travels as a <Parameter> (twiml.py)."),
    Assumption(
        "inbound frame size",
        "Inbound media arrives as 20 ms (160-byte) μ-law frames.",
        "Observed by implementers; the Media Streams page gives no size", False,
        "The relay batches any frame size into its own uplink chunks."),
    Assumption(
        "return audio size",
        "Return media may be any size and is buffered by Twilio.",
        "Media Streams WebSocket messages page", True, "Sent as Kallglot delivers it; no padding."),
    Assumption(
        "<Connect action> after the call ended",
        "Twilio may request the <Connect action> URL as the call completes (CallStatus=completed).",
        "Connect page (action is requested when <Connect> ends)", False,
        "A completed call (by the request or its recorded status callback) is never re-attached."),
    Assumption(
        "status callback answer",
        "Twilio accepts any 2xx for status callbacks; 204 is used.",
        "Webhooks pages (2xx)", False, "Status and stream-status routes answer 204."),
    Assumption(
        "REST parameters",
        "The fake Twilio REST API accepts exactly the form fields the twilio library's CallList.create and "
        "CallContext.update send.",
        "twilio/rest/api/v2010/account/call/__init__.py", True,
        "app/devtools/simulator/twilio_contract.py reads them from the library."),
    Assumption(
        "redirecting a streaming call",
        "Updating a live call's TwiML (`calls(sid).update(twiml=…)`) ends its <Connect><Stream> (a `stop` "
        "message, then the socket closes) without requesting the <Connect action>, and runs the new TwiML.",
        "Call resource page (update with Twiml/Url); how the stream ends is not stated", False,
        "Agent unavailable: the customer's leg is re-attached before the redirect, so the old stream's end, "
        "whichever way it comes, is stale and ends nothing (agent_unavailable.py)."),
)
