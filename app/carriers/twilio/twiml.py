"""TwiML answers, built with the twilio library's ``VoiceResponse``."""
from __future__ import annotations

from twilio.twiml.voice_response import Connect, VoiceResponse

from app.config import Settings
from app.profiles import NumberProfile
from app.calls.prompts import AGENT_UNAVAILABLE_MESSAGE, UNAVAILABLE_MESSAGE
from app.relay.tokens import RELAY_TOKEN_PARAMETER, SESSION_PARAMETER


def connect_stream(settings: Settings, *, session_id: str, relay_token: str, greeting: str = "",
                   greeting_language: str = "en-US") -> str:
    """(Greeting, then) ``<Connect><Stream>`` to our relay, carrying the session and the sealed relay token.

    Twilio drops query strings from stream URLs, hence ``<Parameter>``. ``<Connect action>`` is requested
    when the stream ends while the call is still up, so the call never sits in silence.
    """
    response = VoiceResponse()
    if greeting:
        response.say(greeting, language=greeting_language)
    response.append(_connect(settings, session_id, relay_token))
    return str(response)


def _connect(settings: Settings, session_id: str, relay_token: str) -> Connect:
    connect = Connect(action=settings.public("/twilio/connect-action"), method="POST")
    stream = connect.stream(url=settings.public_ws("/twilio/media"),
                            status_callback=settings.public("/twilio/stream-status"),
                            status_callback_method="POST")
    stream.parameter(name=SESSION_PARAMETER, value=session_id)
    stream.parameter(name=RELAY_TOKEN_PARAMETER, value=relay_token)
    return connect


def agent_unavailable(settings: Settings, profile: NumberProfile, *, session_id: str = "",
                      relay_token: str = "") -> str:
    """The agent did not answer (busy, failed): say so in the profile's language, then ``<Dial>`` its fallback
    number or — without one — go back to the session (a new ``<Connect><Stream>`` with ``relay_token``)."""
    response = VoiceResponse()
    response.say(AGENT_UNAVAILABLE_MESSAGE, language=profile.fallback_language or "en-US")
    if profile.fallback_number:
        response.dial(profile.fallback_number)
    else:
        response.append(_connect(settings, session_id, relay_token))
    return str(response)


REATTACH_PIN_PROMPT = "Welcome back. To rejoin your call, please enter your PIN."


def ask_reattach_pin(settings: Settings, pin_digits: int = 8) -> str:
    """Ask a returning caller for the number's re-attach PIN; the digits (or none) go to ``/twilio/reattach-pin``."""
    response = VoiceResponse()
    gather = response.gather(action=settings.public("/twilio/reattach-pin"), method="POST", input="dtmf",
                             num_digits=pin_digits, finish_on_key="#", timeout=6, action_on_empty_result=True)
    gather.say(REATTACH_PIN_PROMPT)
    response.redirect(settings.public("/twilio/reattach-pin"), method="POST")  # no digits at all: new session
    return str(response)


def fallback(profile: NumberProfile) -> str:
    """Kallglot cannot take the call: the profile's message, then its fallback number or a hang-up."""
    response = VoiceResponse()
    response.say(profile.fallback_message or UNAVAILABLE_MESSAGE, language=profile.fallback_language)
    if profile.fallback_number:
        response.dial(profile.fallback_number)
    else:
        response.hangup()
    return str(response)


def say_and_hang_up(message: str, language: str = "en-US") -> str:
    """Tell the caller something useful, then hang up."""
    response = VoiceResponse()
    response.say(message, language=language)
    response.hangup()
    return str(response)
