"""Which numbers the bridge may dial out to (toll-fraud rules), vendor-free.

Every outbound leg — a callback through ``POST /api/calls``, a profile's agent leg, a fallback forward — costs
money per minute, and premium-rate, shared-cost, personal and satellite numbers are how a stolen API token is
turned into cash. The rules here are applied to every such number:

- it must be a valid, dialable number (Google's libphonenumber metadata, via ``phonenumbers``);
- its country must be in ``ALLOWED_DESTINATION_COUNTRIES`` (the deployment's allow-list, e.g. ``US,CA``);
- its number type must not be premium-rate, shared-cost, personal (``+1 500``…), UAN, pager or voicemail, and
  never a non-geographic "country" (``+881`` satellite, ``+882``/``+883`` international networks, ``+979``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

#: Number types nobody needs to reach from a translation bridge, and the usual toll-fraud destinations.
DENIED_TYPES = {
    PhoneNumberType.PREMIUM_RATE: "premium-rate",
    PhoneNumberType.SHARED_COST: "shared-cost",
    PhoneNumberType.PERSONAL_NUMBER: "personal-number",
    PhoneNumberType.UAN: "universal-access",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.VOICEMAIL: "voicemail",
}
#: libphonenumber's region for numbers that belong to no country (satellite, international networks).
NON_GEOGRAPHIC_REGION = "001"


class DestinationDenied(ValueError):
    """A number the bridge must not dial; ``reason`` is a short metric label, ``str()`` a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class DestinationRules:
    """The deployment's outbound-dialling rules (built once from settings)."""

    allowed_countries: frozenset[str]

    @classmethod
    def of(cls, countries: Iterable[str]) -> DestinationRules:
        """Rules allowing ``countries`` (ISO 3166 alpha-2 codes, any case)."""
        return cls(frozenset(c.strip().upper() for c in countries if c.strip()))

    def check(self, number: str) -> None:
        """Return quietly if ``number`` (E.164) may be dialled; raise :class:`DestinationDenied` otherwise."""
        try:
            parsed = phonenumbers.parse(number, None)
        except NumberParseException as exc:
            raise DestinationDenied("invalid", f"{number!r} is not a phone number") from exc
        if not phonenumbers.is_valid_number(parsed):
            raise DestinationDenied("invalid", "is not a valid, dialable phone number")
        region = phonenumbers.region_code_for_number(parsed) or ""
        if region == NON_GEOGRAPHIC_REGION:
            raise DestinationDenied("non-geographic", "satellite and international-network numbers are not dialled")
        denied_type = DENIED_TYPES.get(phonenumbers.number_type(parsed))
        if denied_type:
            raise DestinationDenied(denied_type, f"{denied_type} numbers are not dialled")
        if region not in self.allowed_countries:
            allowed = ", ".join(sorted(self.allowed_countries)) or "none"
            raise DestinationDenied("country", f"calls to {region or 'that country'} are not allowed "
                                               f"(ALLOWED_DESTINATION_COUNTRIES: {allowed})")

    def problem(self, number: str) -> str:
        """Why ``number`` may not be dialled ("" when it may)."""
        try:
            self.check(number)
        except DestinationDenied as exc:
            return str(exc)
        return ""
