"""When a new call may join a held session ("returning caller"), the same for every carrier.

Caller ID is not authentication: it is spoofable, and withheld callers all share one placeholder, so re-attach
by caller ID alone let a second anonymous caller — or a spoofer — join someone else's live session. The rules:

- a withheld or anonymous caller never re-attaches (the placeholders carriers use: Twilio's keypad spellings
  ``+266696687`` "ANONYMOUS", ``+7378742833`` "RESTRICTED", ``+2562533`` "BLOCKED", ``+86282452253``
  "UNAVAILABLE", words like ``anonymous``/``private``, an empty value, or anything not E.164);
- each number's profile chooses ``reattach``: ``off``, ``caller_id`` (same caller ID, the default), or
  ``caller_id_pin`` (same caller ID *and* the profile's PIN, keyed in as DTMF before the stream connects; only its
  salted hash is stored).

Every decision that denies or asks is logged by the caller of :func:`reattach_decision`.
"""
from __future__ import annotations

from enum import Enum

from app.profiles import E164
#: Caller IDs carriers put in ``From`` when the caller withheld theirs (keypad spellings and words).
WITHHELD_CALLER_IDS = frozenset({
    "+266696687", "+7378742833", "+2562533", "+86282452253", "+8656696",
    "anonymous", "restricted", "blocked", "private", "unavailable", "unknown", "withheld",
})


class Reattach(str, Enum):
    """What a new inbound call does about a held session from the same caller to the same number."""

    NEW_SESSION = "new_session"  # no held session, or re-attach not allowed: start a fresh session
    REATTACH = "reattach"  # join the held session
    ASK_PIN = "ask_pin"  # ask for the number's PIN first (DTMF), then re-attach only if it matches


def caller_id_withheld(from_number: str) -> bool:
    """True when ``from_number`` identifies nobody: empty, a withheld placeholder, or not E.164."""
    value = (from_number or "").strip()
    return not value or value.lower() in WITHHELD_CALLER_IDS or not E164.match(value)


def reattach_decision(policy: str, from_number: str, held_session_id: str | None) -> Reattach:
    """The decision for a new call from ``from_number`` under ``policy`` when ``held_session_id`` is held."""
    if not held_session_id or policy == "off" or caller_id_withheld(from_number):
        return Reattach.NEW_SESSION
    return Reattach.ASK_PIN if policy == "caller_id_pin" else Reattach.REATTACH

