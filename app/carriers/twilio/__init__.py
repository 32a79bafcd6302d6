"""The Twilio adapter: voice and status webhooks, TwiML, signatures, the Media Streams codec and socket, call
control and number provisioning. Only this package (and :mod:`app.carriers.telnyx` for Telnyx) knows a carrier's
wire format.

Importing the package loads nothing else: the routes are registered by :mod:`app.carriers.twilio.adapter`
(through :mod:`app.carriers.registry`), so the codec or the call control can be imported alone.
"""

#: The carrier name in relay tokens, Redis keys, metrics labels and the lifecycle.
CARRIER = "twilio"
