"""The one place test phone numbers come from: every call in every test gets numbers of its own.

A returning caller re-attaches to a session held for the same (to, from) pair, so two tests (or two calls in
one test) sharing numbers would see each other's held sessions. Numbers are in the fictional 555 range; the
random part (10^7 × 10^7 pairs) makes a collision within one run practically impossible, without shared state.
"""
from __future__ import annotations

import secrets
from typing import NamedTuple


class CallNumbers(NamedTuple):
    """The number called (``to``, ours) and the caller's number (``from_``), both E.164."""

    to: str
    from_: str


def new_numbers() -> CallNumbers:
    """A fresh (to, from) pair for one call."""
    return CallNumbers(to=f"+1555{secrets.randbelow(10**7):07d}", from_=f"+1556{secrets.randbelow(10**7):07d}")
