"""TwiML answers, built with the twilio library's ``VoiceResponse``."""
from __future__ import annotations

from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

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


def connect_direct(settings: Settings, *, stream_url: str, parameters: dict[str, str], greeting: str = "",
                   greeting_language: str = "en-US") -> str:
    """(Greeting, then) ``<Connect><Stream>`` straight to Kallglot's ``stream.url`` with Kallglot's own
    ``<Parameter>`` pair (token, session id) — the ``direct`` transport; the bridge carries no media.

    Kallglot's example also sets ``track="both_tracks"``, which Twilio accepts only on ``<Start><Stream>``:
    ``<Connect><Stream>`` is bidirectional and carries the inbound track, so it is left out. ``<Connect action>``
    and the stream status callback are kept: a dropped stream is restored (fresh token) and never leaves silence.
    """
    response = VoiceResponse()
    if greeting:
        response.say(greeting, language=greeting_language)
    connect = Connect(action=settings.public("/twilio/connect-action"), method="POST")
    stream = connect.stream(url=stream_url, status_callback=settings.public("/twilio/stream-status"),
                            status_callback_method="POST")
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def dial_sip(settings: Settings, *, sip_uri: str, greeting: str = "", greeting_language: str = "en-US") -> str:
    """(Greeting, then) ``<Dial><Sip>`` to the session's Kallglot SIP URI — the ``sip`` transport.

    ``<Dial action>`` reports how the dial ended (``DialCallStatus``), which ends the leg; its answer never
    leaves the caller in silence.
    """
    response = VoiceResponse()
    if greeting:
        response.say(greeting, language=greeting_language)
    dial = Dial(action=settings.public("/twilio/dial-action"), method="POST")
    dial.sip(sip_uri)
    response.append(dial)
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
