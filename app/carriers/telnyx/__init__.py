"""The Telnyx adapter: TeXML and Call Control webhooks (Ed25519-verified), the media-streaming codec and socket,
SDK call control and number provisioning. Only this package (and :mod:`app.carriers.twilio` for Twilio) knows a
carrier's wire format.

Importing the package loads nothing else: the routes are registered by :mod:`app.carriers.telnyx.adapter`
(through :mod:`app.carriers.registry`), so the codec or the call control can be imported alone.
"""

#: The carrier name in relay tokens, Redis keys, metrics labels and the lifecycle.
CARRIER = "telnyx"
