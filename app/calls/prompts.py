"""What the caller hears when no translation can happen: the same words whichever carrier says them."""
from __future__ import annotations

#: Said when Kallglot cannot take the call and the profile has no message of its own.
UNAVAILABLE_MESSAGE = ("We're sorry, the translation service is not available right now. "
                       "Please try your call again later. Goodbye.")
#: Said when the session ended (or could not be restored) while the caller is still on the line.
SESSION_OVER_MESSAGE = "The translation session has ended. Goodbye."
#: Told to the customer when the agent leg we dialled did not answer, was busy or failed (the call goes on,
#: or is forwarded to the profile's fallback number), in the profile's fallback language.
AGENT_UNAVAILABLE_MESSAGE = "The agent is not available right now."
