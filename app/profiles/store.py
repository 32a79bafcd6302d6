"""Number profiles stored in Redis per E.164 number; the ``DEFAULT_*`` settings profile every other number."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from collections.abc import Callable, Collection
from typing import Any

import redis

from app.config import KALLGLOT_MODES, LANGUAGE_CODE, MAX_RECONNECT_WINDOW_SECONDS
from app.redis_keys import RedisKeys, as_text

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
#: TwiML/TeXML ``<Say language>`` codes look like ``en-US``; plain ``en`` is accepted too.
SAY_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?$")
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
MAX_TEXT = 500
MAX_METADATA_ITEMS = 20
MAX_HANGUP_GRACE_SECONDS = MAX_RECONNECT_WINDOW_SECONDS
REATTACH_POLICIES = ("off", "caller_id", "caller_id_pin")
PIN = re.compile(r"^\d{4,8}$")
PIN_HASH_SCHEME = "pbkdf2_sha256"
PIN_HASH_ITERATIONS = 100_000
#: How long a call waits for a browser agent by default, and the bounds a profile may set.
DEFAULT_BROWSER_AGENT_WAIT_SECONDS = 30
MIN_BROWSER_AGENT_WAIT_SECONDS, MAX_BROWSER_AGENT_WAIT_SECONDS = 5, 600
#: Profile fields naming a number the bridge dials out to (same toll-fraud rules as ``POST /api/calls``).
DIALLED_FIELDS = ("agent_number", "fallback_number")
#: How a number's calls reach Kallglot (README "Transports: relay, direct, sip"); the first is the default.
TRANSPORT_RELAY, TRANSPORT_DIRECT, TRANSPORT_SIP = "relay", "direct", "sip"
TRANSPORTS = (TRANSPORT_RELAY, TRANSPORT_DIRECT, TRANSPORT_SIP)
#: One line per transport on what it gives and costs (the admin form and ``flask numbers set --help`` show them).
TRANSPORT_TRADE_OFFS = {
    TRANSPORT_RELAY: "the bridge relays the audio: codec conversion, reconnect buffering, agent legs, live "
                     "transcripts and relay metrics; costs bridge CPU per call",
    TRANSPORT_DIRECT: "the carrier streams straight to Kallglot with the session's stream token: no bridge CPU "
                      "per call; no agent leg, live transcript or codec conversion",
    TRANSPORT_SIP: "the carrier dials Kallglot's SIP endpoint for the session: no bridge media, Kallglot's own "
                   "SIP leg; no agent leg or live transcript",
}
#: Modes whose value depends on the live transcript only the relay sees (assistive translation shows the agent
#: subtitles: Kallglot's session-modes page).
LIVE_TRANSCRIPT_MODES = ("assistive_translation",)


class ProfileError(ValueError):
    """A profile value is invalid; ``problems`` maps each field name to what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))


@dataclass(frozen=True)
class NumberProfile:
    """How calls to one number are put on Kallglot, greeted, connected to an agent and rescued on failure."""

    carrier: str = "twilio"
    mode: str = "bidirectional_translation"
    source_language: str = ""
    target_language: str = ""
    #: Said to the caller before the stream connects (empty: no greeting).
    greeting: str = ""
    greeting_language: str = "en-US"
    #: E.164 number dialled as the agent leg once the customer's stream starts (empty: no agent leg).
    agent_number: str = ""
    #: When the agent hangs up, hang up the customer too (else the customer stays with Kallglot).
    agent_hangup_ends_call: bool = True
    #: Offer calls to agents signed in to the admin's agent page first (a browser leg); if none takes the call
    #: within :attr:`browser_agent_wait_seconds`, :attr:`agent_number` is dialled (or, without one, the
    #: :attr:`fallback_number`).
    browser_agents: bool = False
    browser_agent_wait_seconds: int = DEFAULT_BROWSER_AGENT_WAIT_SECONDS
    #: Said when Kallglot cannot take the call (empty: the built-in apology).
    fallback_message: str = ""
    fallback_language: str = "en-US"
    #: Calls are forwarded here when Kallglot cannot take them (empty: hang up after the message).
    fallback_number: str = ""
    #: Seconds a session whose leg was lost abnormally is held for a reconnect (None: RECONNECT_WINDOW_SECONDS).
    reconnect_window_seconds: int | None = None
    #: Seconds a session is held after a clean hang-up too.
    hangup_grace_seconds: int = 0
    #: Whether a new call from the caller of a held session re-attaches to it: ``off``, ``caller_id`` (same caller
    #: ID; never for withheld callers) or ``caller_id_pin`` (same caller ID and :attr:`reattach_pin_hash`).
    reattach: str = "caller_id"
    #: ``pbkdf2_sha256$iterations$salt$hash`` of the DTMF PIN for ``caller_id_pin`` (the PIN itself is never stored).
    reattach_pin_hash: str = ""
    #: Extra key/values sent as Kallglot session metadata.
    metadata: dict[str, str] = field(default_factory=dict)
    #: How calls reach Kallglot: ``relay`` (through the bridge), ``direct`` (carrier → Kallglot stream) or ``sip``.
    transport: str = TRANSPORT_RELAY
    #: Whether this profile belongs to the number itself (False: the DEFAULT_* profile applied).
    own: bool = False

    def problems(self, carriers: Collection[str]) -> dict[str, str]:
        """Every invalid value, keyed by field name, one sentence each; ``carriers``: the carrier names known."""
        found: dict[str, str] = {}
        if self.carrier not in carriers:
            found["carrier"] = f"must be one of {', '.join(carriers)}"
        if self.mode not in KALLGLOT_MODES:
            found["mode"] = f"must be one of {', '.join(KALLGLOT_MODES)}"
        for name in ("source_language", "target_language"):
            value = getattr(self, name)
            if value and not LANGUAGE_CODE.match(value):
                found[name] = f"must be a language code like 'en' or 'es', not {value!r}"
        for name in ("greeting_language", "fallback_language"):
            if not SAY_LANGUAGE.match(getattr(self, name)):
                found[name] = "must be a language like en-US"
        for name in ("greeting", "fallback_message"):
            if len(getattr(self, name)) > MAX_TEXT:
                found[name] = f"must be at most {MAX_TEXT} characters"
        for name in ("agent_number", "fallback_number"):
            value = getattr(self, name)
            if value and not E164.match(value):
                found[name] = f"must be an E.164 number like +14155551234, not {value!r}"
        if self.reattach not in REATTACH_POLICIES:
            found["reattach"] = f"must be one of {', '.join(REATTACH_POLICIES)}"
        elif self.reattach == "caller_id_pin" and not self.reattach_pin_hash.startswith(PIN_HASH_SCHEME + "$"):
            found["reattach_pin"] = "caller_id_pin needs a PIN of 4 to 8 digits"
        window = self.reconnect_window_seconds
        if window is not None and not 0 <= window <= MAX_RECONNECT_WINDOW_SECONDS:
            found["reconnect_window_seconds"] = f"must be between 0 and {MAX_RECONNECT_WINDOW_SECONDS} seconds"
        if not MIN_BROWSER_AGENT_WAIT_SECONDS <= self.browser_agent_wait_seconds <= MAX_BROWSER_AGENT_WAIT_SECONDS:
            found["browser_agent_wait_seconds"] = (f"must be between {MIN_BROWSER_AGENT_WAIT_SECONDS} and "
                                                   f"{MAX_BROWSER_AGENT_WAIT_SECONDS} seconds")
        if not 0 <= self.hangup_grace_seconds <= MAX_HANGUP_GRACE_SECONDS:
            found["hangup_grace_seconds"] = f"must be between 0 and {MAX_HANGUP_GRACE_SECONDS} seconds"
        found.update(self.transport_problems())
        if len(self.metadata) > MAX_METADATA_ITEMS:
            found["metadata"] = f"must have at most {MAX_METADATA_ITEMS} entries"
        elif any(not METADATA_KEY.match(k) or len(v) > 200 for k, v in self.metadata.items()):
            found["metadata"] = "keys must be letters, digits, '_', '.', '-' (≤ 40) and values ≤ 200 characters"
        return found

    def transport_problems(self) -> dict[str, str]:
        """Why this profile's ``transport`` cannot carry its calls as configured (empty when it can).

        ``direct`` and ``sip`` keep the audio off the bridge, so whatever needs the audio in the bridge is refused
        rather than accepted and silently broken: an agent leg (the relay dials it and mixes it into the session)
        and a live transcript (only the relay's stream socket receives Kallglot's transcript messages).
        """
        if self.transport not in TRANSPORTS:
            return {"transport": f"must be one of {', '.join(TRANSPORTS)}"}
        if self.transport == TRANSPORT_RELAY:
            return {}
        found = {}
        if self.agent_number:
            found["agent_number"] = (f"an agent leg needs the relay: with transport {self.transport} the bridge "
                                     "carries no audio to connect an agent to; clear the agent number or use relay")
        if self.browser_agents:
            found["browser_agents"] = (f"browser agents need the relay: with transport {self.transport} the bridge "
                                       "carries no audio to offer them; turn browser agents off or use relay")
        if self.mode in LIVE_TRANSCRIPT_MODES:
            found["mode"] = (f"{self.mode} gives the agent live subtitles from the transcript only the relay "
                             f"receives; with transport {self.transport} use another mode, or relay")
        return found

    def with_reattach_pin(self, pin: str) -> NumberProfile:
        """This profile with ``pin`` (4–8 digits) as its re-attach PIN, stored only as a salted hash."""
        if not PIN.match(pin or ""):
            raise ProfileError({"reattach_pin": "must be 4 to 8 digits"})
        salt = secrets.token_hex(8)
        digest = hashlib.pbkdf2_hmac("sha256", pin.encode(), salt.encode(), PIN_HASH_ITERATIONS).hex()
        return replace(self, reattach_pin_hash=f"{PIN_HASH_SCHEME}${PIN_HASH_ITERATIONS}${salt}${digest}")

    def reattach_pin_matches(self, given: str) -> bool:
        """Whether ``given`` (the caller's DTMF digits) is this profile's PIN; an unset PIN never matches."""
        scheme, _, rest = self.reattach_pin_hash.partition("$")
        iterations, _, rest = rest.partition("$")
        salt, _, expected = rest.partition("$")
        if scheme != PIN_HASH_SCHEME or not expected or not iterations.isdigit() or not PIN.match(given or ""):
            return False
        actual = hashlib.pbkdf2_hmac("sha256", given.encode(), salt.encode(), int(iterations)).hex()
        return hmac.compare_digest(actual, expected)

    @property
    def has_agent(self) -> bool:
        """Whether calls to this number will have an agent (a browser agent or a dialled agent number)."""
        return self.browser_agents or bool(self.agent_number)

    def effective_reconnect_window(self, default_seconds: int) -> int:
        """The reconnect window for this number: its own, else the service default."""
        return default_seconds if self.reconnect_window_seconds is None else self.reconnect_window_seconds

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON export and storage), without ``own``."""
        data = asdict(self)
        data.pop("own")
        return data

    def to_json(self) -> str:
        """Serialized form stored in Redis."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, own: bool = True) -> NumberProfile:
        """Build a profile from plain data, coercing types and ignoring unknown keys; validate separately."""
        known = {f.name: f for f in fields(cls) if f.name != "own"}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known or value is None and name != "reconnect_window_seconds":
                continue
            if name == "transport" and not str(value).strip():
                continue  # not chosen (an older export, a form without the field): the default, relay
            if name == "metadata":
                values[name] = {str(k): str(v) for k, v in dict(value).items()}
            elif name in ("reconnect_window_seconds", "hangup_grace_seconds"):
                values[name] = None if value in (None, "") else int(value)
            elif name == "browser_agent_wait_seconds":
                if value not in (None, ""):
                    values[name] = int(value)
            elif name in ("agent_hangup_ends_call", "browser_agents"):
                values[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            else:
                values[name] = str(value).strip()
        return cls(**values, own=own)

    @classmethod
    def from_json(cls, raw: str | bytes) -> NumberProfile:
        """Parse a stored profile."""
        return cls.from_dict(json.loads(raw))


class ProfileStore:
    """Reads and writes number profiles; any number without its own gets ``default``."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, default: NumberProfile, *,
                 carriers: Collection[str], destination_problem: Callable[[str], str] | None = None) -> None:
        self._redis = client
        self._keys = keys
        self.default = default
        #: The carrier names a profile may name (the composition root passes the registry's).
        self.carriers = tuple(carriers)
        #: Why a number a profile makes the bridge dial is refused ("" when allowed; None: E.164 form only):
        #: the toll-fraud rules of :mod:`app.calls.destinations`, passed in so profiles do not import calls.
        self.destination_problem = destination_problem

    def for_number(self, number: str) -> NumberProfile:
        """The profile that applies to calls to ``number`` (its own, else the default)."""
        raw = self._redis.get(self._keys.profile(number)) if number else None
        return NumberProfile.from_json(raw) if raw else self.default

    def problems(self, number: str, profile: NumberProfile) -> dict[str, str]:
        """Every reason ``profile`` cannot be stored as ``number``'s, the deployment's dialling rules included."""
        problems = {}
        if not E164.match(number or ""):
            problems["number"] = f"must be in E.164 form like +14155551234, not {number!r}"
        problems.update(profile.problems(self.carriers))
        if self.destination_problem is not None:
            for name in DIALLED_FIELDS:
                value = getattr(profile, name)
                if value and name not in problems and (why := self.destination_problem(value)):
                    problems[name] = why
        return problems

    def set(self, number: str, profile: NumberProfile) -> NumberProfile:
        """Validate and store ``profile`` as ``number``'s own; raises :class:`ProfileError`."""
        problems = self.problems(number, profile)
        if problems:
            raise ProfileError(problems)
        # Two keys in two hash slots (Redis Cluster), so two ordered steps instead of a MULTI: the index first,
        # so a profile is never stored unlisted; a listed number without a profile is skipped by :meth:`all`.
        self._redis.sadd(self._keys.profiles_index(), number)
        self._redis.set(self._keys.profile(number), profile.to_json())
        return replace(profile, own=True)

    def delete(self, number: str) -> bool:
        """Remove ``number``'s own profile (it falls back to the default); True if there was one."""
        removed = self._redis.delete(self._keys.profile(number))  # profile first: see :meth:`set`
        self._redis.srem(self._keys.profiles_index(), number)
        return bool(removed)

    def all(self) -> dict[str, NumberProfile]:
        """Every number with its own profile, sorted by number."""
        numbers = sorted(as_text(n) for n in self._redis.smembers(self._keys.profiles_index()))
        return {n: p for n in numbers if (p := self.for_number(n)).own}
