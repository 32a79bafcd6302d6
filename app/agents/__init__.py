"""Agents in the browser: the third kind of leg beside Twilio's and Telnyx's phone legs.

The admin's Agent page (:mod:`app.admin.agent_console`) captures the agent's microphone, turns it into 8 kHz μ-law
20 ms frames in an AudioWorklet and sends them over the WebSocket ``/agent/media`` (:mod:`app.agents.media`); this
package is the only code that knows that socket's frames (:mod:`app.agents.codec`, a
:class:`~app.carriers.contract.CarrierCodec`). The relay core serves the leg like a carrier leg, with the same
lifecycle: leg states, heartbeats, holds and exactly-once end.
"""
from app.calls.agent_queue import BROWSER_LEG

__all__ = ["BROWSER_LEG"]
