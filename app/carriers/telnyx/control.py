"""Call Control commands through the telnyx SDK: answer with streaming, start streaming, say-then-hang-up,
hang up and dial. Also :class:`TelnyxControl`, this carrier's :class:`app.carriers.contract.CarrierControl`.

Every command carries a ``command_id`` derived from the webhook that caused it, so a webhook Telnyx delivers
twice yields the same command_id and Telnyx ignores the repeat (within 60 s) even if Redis de-duplication is
unavailable. ``client_state`` (base64 JSON, echoed in later webhooks) carries only correlation: a session id,
a speaker, or which goodbye to say — never a token.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from typing import Any

import telnyx

from app.config import Settings
from app.carriers.contract import CarrierError, CarrierNotConfigured
from app.calls.prompts import AGENT_UNAVAILABLE_MESSAGE, SESSION_OVER_MESSAGE, UNAVAILABLE_MESSAGE
from app.profiles import NumberProfile
from app.kallglot.telephony import DIRECT_SESSION_PARAMETER, DIRECT_TOKEN_PARAMETER
from app.relay.tokens import RELAY_TOKEN_PARAMETER, SESSION_PARAMETER
from app.carriers.telnyx import CARRIER

log = logging.getLogger(__name__)

LABEL = "Telnyx"

#: Return audio as raw μ-law frames: without ``rtp`` Telnyx expects MP3 and silently drops what we send.
#: ``stream_codec`` PCMU asks Telnyx to transcode the caller's leg to μ-law where it can (PCMU↔PCMA only);
#: other codecs still arrive as negotiated and the media codec decodes or refuses them (see assumptions.py).
STREAM_PARAMS: dict[str, Any] = {"stream_track": "inbound_track", "stream_bidirectional_mode": "rtp",
                                 "stream_bidirectional_codec": "PCMU", "stream_codec": "PCMU"}
#: Webhooks sit inside Telnyx's webhook timeout: fail fast rather than hold the webhook.
API_TIMEOUT_SECONDS = 5.0
#: HTTP statuses meaning "that call is already gone" for hang-up purposes.
CALL_GONE_STATUSES = frozenset({404, 410, 422})
#: Goodbyes said through ``speak`` (keys travel in client_state, the text stays here).
GOODBYE_UNAVAILABLE = "unavailable"
GOODBYE_SESSION_OVER = "session_over"
#: Told to the customer when the agent leg we dialled did not answer, was busy or failed (the call goes on).
GOODBYE_AGENT_UNAVAILABLE = "agent_unavailable"
GOODBYE_KEY = "bye"
#: client_state key: the number called (the profile to apply when the goodbye has been said).
TO_KEY = "to"
#: client_state key: a greeting is due before streaming starts.
GREETING_KEY = "g"
#: client_state key of the leg a ``sip`` transfer creates: the call_control_id of the caller it serves.
SIP_FOR_KEY = "sipfor"
#: client_state key: the stream generation a command starts (which stream a ``streaming.stopped`` is about; see
#: :mod:`app.carriers.telnyx.stream_generations`).
GENERATION_KEY = "sg"


def encode_client_state(state: dict[str, str]) -> str:
    """``client_state`` must be base64; we put a small JSON object in it."""
    return base64.b64encode(json.dumps(state, separators=(",", ":")).encode()).decode("ascii")


def decode_client_state(value: Any) -> dict[str, str]:
    """The JSON object we put in ``client_state``, or ``{}`` for anything else (it is echoed back untrusted)."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return {}
    try:
        decoded = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return {}
    return {str(k): str(v) for k, v in decoded.items()} if isinstance(decoded, dict) else {}


def sdk_client(settings: Settings, timeout: float = API_TIMEOUT_SECONDS) -> telnyx.Telnyx:
    """A telnyx SDK client for the configured account, honouring ``TELNYX_API_URL``."""
    return telnyx.Telnyx(api_key=settings.telnyx_api_key or "unset", base_url=settings.telnyx_api_url,
                         timeout=timeout, max_retries=1)


class TelnyxControl:
    """Call Control commands for one app (one SDK client, built from settings)."""

    carrier = CARRIER

    def __init__(self, settings: Settings, client: telnyx.Telnyx | None = None, *, connection_id: str = "") -> None:
        self.settings = settings
        self.connection_id = connection_id  # the Call Control application id; only dial() needs it
        self.client = client or sdk_client(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> TelnyxControl:
        """The app's control: the configured Call Control application id (``TELNYX_CONNECTION_ID``) dials."""
        return cls(settings, connection_id=settings.telnyx_connection_id)

    def answer_for_session(self, call_id: str, *, session_id: str, speaker: str, greeting: bool = False,
                           generation: int = 0, command_id: str) -> None:
        """Answer an incoming call for ``session_id``; its ``call.answered`` then starts streaming.

        ``answer`` does not define ``stream_auth_token`` or ``custom_parameters`` (only ``start_streaming`` and
        ``dial`` do, in the SDK's types), so the stream is not requested here: ``client_state`` carries the
        session and speaker (and whether a greeting is due) to ``call.answered``, which calls
        :meth:`start_streaming` with both fields. ``generation`` tags any stream event Telnyx relates to the answer
        with the leg's first stream generation.
        """
        state = {"s": session_id, "p": speaker, GENERATION_KEY: str(generation),
                 **({GREETING_KEY: "1"} if greeting else {})}
        self.client.calls.actions.answer(call_id, client_state=encode_client_state(state), command_id=command_id)

    def start_streaming(self, call_id: str, *, session_id: str, relay_token: str, generation: int,
                        command_id: str) -> None:
        """Start (or restore) streaming on an answered call into ``session_id``: the relay token goes both in
        ``stream_auth_token`` and in ``custom_parameters`` (the relay reads whichever arrives); ``client_state``
        names the stream's ``generation``, which Telnyx echoes on its ``streaming.*`` events."""
        self.client.calls.actions.start_streaming(
            call_id, stream_url=self.settings.public_ws("/telnyx/media"), **STREAM_PARAMS,
            stream_auth_token=relay_token, custom_parameters=self._parameters(session_id, relay_token),
            client_state=encode_client_state({"s": session_id, GENERATION_KEY: str(generation)}),
            command_id=command_id)

    def start_direct_streaming(self, call_id: str, *, stream_url: str, parameters: dict[str, str],
                               generation: int, command_id: str) -> None:
        """Stream an answered call straight to Kallglot (the ``direct`` transport): ``stream_url`` is the session's
        ``stream.url``, and Kallglot's stream token goes in ``stream_auth_token`` and, with the session id, in
        ``custom_parameters`` under the names of Kallglot's own example. PCMU both ways (Kallglot takes μ-law
        8 kHz only; Telnyx transcodes a PCMA leg)."""
        self.client.calls.actions.start_streaming(
            call_id, stream_url=stream_url, **STREAM_PARAMS,
            stream_auth_token=parameters.get(DIRECT_TOKEN_PARAMETER, ""),
            custom_parameters=[{"name": name, "value": value} for name, value in parameters.items()],
            client_state=encode_client_state({"s": parameters.get(DIRECT_SESSION_PARAMETER, ""),
                                              GENERATION_KEY: str(generation)}),
            command_id=command_id)

    def transfer_to_sip(self, call_id: str, *, sip_uri: str, command_id: str) -> None:
        """Transfer an answered call to its session's Kallglot SIP URI (the ``sip`` transport).

        ``target_leg_client_state`` marks the new leg with the call it serves, so that leg's ``call.hangup``
        before answering (Kallglot refused the dial) tells the caller instead of leaving them in silence.
        """
        self.client.calls.actions.transfer(
            call_id, to=sip_uri, command_id=command_id,
            target_leg_client_state=encode_client_state({SIP_FOR_KEY: call_id}))

    def answer_to_say_goodbye(self, call_id: str, goodbye: str, *, to_number: str, command_id: str) -> None:
        """Answer without streaming; ``call.answered`` then says ``goodbye`` (see :meth:`say_goodbye`)."""
        self.client.calls.actions.answer(
            call_id, client_state=encode_client_state({GOODBYE_KEY: goodbye, TO_KEY: to_number}),
            command_id=command_id)

    def say(self, call_id: str, text: str, language: str, *, state: dict[str, str], command_id: str) -> None:
        """Speak ``text``; its ``call.speak.ended`` carries ``state`` back (what to do next)."""
        self.client.calls.actions.speak(call_id, payload=text, voice="female", language=language,  # type: ignore[arg-type]
                                        client_state=encode_client_state(state), command_id=command_id)

    def say_goodbye(self, call_id: str, goodbye: str, profile: NumberProfile, *, to_number: str,
                    command_id: str) -> None:
        """Speak a goodbye in the profile's words and language; its ``call.speak.ended`` (carrying the same
        client_state) forwards the call to the profile's ``fallback_number`` or hangs up."""
        if goodbye == GOODBYE_SESSION_OVER:
            text, language = SESSION_OVER_MESSAGE, "en-US"
        elif goodbye == GOODBYE_AGENT_UNAVAILABLE:
            text, language = AGENT_UNAVAILABLE_MESSAGE, profile.fallback_language or "en-US"
        else:
            text, language = profile.fallback_message or UNAVAILABLE_MESSAGE, profile.fallback_language or "en-US"
        self.say(call_id, text, language, state={GOODBYE_KEY: goodbye, TO_KEY: to_number}, command_id=command_id)

    def transfer(self, call_id: str, to: str, *, from_: str, command_id: str) -> None:
        """Forward the call to ``to`` (the profile's fallback number)."""
        extra: dict[str, Any] = {"from_": from_} if from_ else {}
        self.client.calls.actions.transfer(call_id, to=to, command_id=command_id, **extra)

    def hang_up(self, call_id: str, command_id: str | None = None) -> None:
        """End a live call leg; a leg that already ended is not an error. Raises :class:`CarrierError`."""
        try:
            self.client.calls.actions.hangup(call_id, command_id=command_id or str(uuid.uuid4()))
        except telnyx.APIStatusError as exc:
            if exc.status_code not in CALL_GONE_STATUSES:
                raise CarrierError.of(LABEL, exc) from exc
            log.info("telnyx call=%s already gone at hang-up (HTTP %s)", call_id, exc.status_code)
        except telnyx.APIError as exc:
            raise CarrierError.of(LABEL, exc) from exc

    def dial(self, *, to: str, from_: str, session_id: str, speaker: str) -> str:
        """Place an outbound leg that will stream into ``session_id`` as ``speaker``; returns its call_control_id.

        The relay token is bound to the call_control_id, which only exists once the dial returns, so
        streaming starts on ``call.answered`` (``client_state`` carries the session and speaker there).
        Needs ``connection_id`` (the Call Control application id). Raises :class:`CarrierError`.
        """
        if not self.settings.telnyx_api_key or not self.connection_id:
            raise CarrierNotConfigured(f"{LABEL}: TELNYX_API_KEY and TELNYX_CONNECTION_ID (the Call Control "
                                       "application id) are needed to dial")
        try:
            response = self.client.calls.dial(
                connection_id=self.connection_id, from_=from_, to=to, command_id=str(uuid.uuid4()),
                webhook_url=self.settings.public("/telnyx/call-control"),
                client_state=encode_client_state({"s": session_id, "p": speaker}))
        except telnyx.APIError as exc:
            raise CarrierError.of(LABEL, exc) from exc
        if response.data is None or not response.data.call_control_id:
            raise CarrierError(f"{LABEL}: the dial response carries no call_control_id")
        return str(response.data.call_control_id)

    @staticmethod
    def _parameters(session_id: str, relay_token: str) -> list[dict[str, str]]:
        return [{"name": SESSION_PARAMETER, "value": session_id}, {"name": RELAY_TOKEN_PARAMETER, "value": relay_token}]


def telnyx_control() -> TelnyxControl:
    """The current app's :class:`TelnyxControl` (the one in ``services().carrier_controls``)."""
    from app.extensions import services

    control = services().carrier_controls[CARRIER]
    assert isinstance(control, TelnyxControl)
    return control
