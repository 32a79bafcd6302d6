"""Profiles from untrusted plain data (a form, a JSON file) with per-field problems, and JSON export/import.

Shared by the admin UI and ``flask numbers export/import`` so both accept and refuse exactly the same input.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.profiles.store import E164, NumberProfile, ProfileError, ProfileStore

EXPORT_FORMAT = "kallglot-bridge/number-profiles"
EXPORT_VERSION = 1
INT_FIELDS = ("reconnect_window_seconds", "hangup_grace_seconds", "browser_agent_wait_seconds")


class ProfileImportError(ValueError):
    """The import document is unusable; ``problems`` maps a number (or ``"file"``) to field → message."""

    def __init__(self, problems: dict[str, dict[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{number}: {', '.join(f'{k} {v}' for k, v in fields.items())}"
                                   for number, fields in problems.items()))


def profile_from_data(data: Mapping[str, Any],
                      carriers: Collection[str]) -> tuple[NumberProfile | None, dict[str, str]]:
    """Build a profile from plain data; returns it (None when anything is wrong) and every problem by field.
    ``carriers``: the carrier names known (:attr:`ProfileStore.carriers`)."""
    problems: dict[str, str] = {}
    values = dict(data)
    for name in INT_FIELDS:
        value = values.get(name)
        if isinstance(value, str):
            value = value.strip()
        if value in (None, ""):
            values.pop(name, None)  # the model's default: the service window / no grace
        elif isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            problems[name] = "must be a whole number of seconds"
            values.pop(name)
    if not isinstance(values.get("metadata", {}), Mapping):
        problems["metadata"] = "must be an object of key/value pairs"
        values.pop("metadata")
    pin = values.pop("reattach_pin", None)
    profile = NumberProfile.from_dict(values)
    if pin not in (None, ""):  # a plain PIN is accepted on the way in and stored only as its salted hash
        try:
            profile = profile.with_reattach_pin(str(pin))
        except ProfileError as exc:
            problems.update(exc.problems)
    problems = {**profile.problems(carriers), **problems}
    return (None if problems else profile), problems


def export_profiles(store: ProfileStore) -> dict[str, Any]:
    """Every number's own profile as one JSON-ready document."""
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "profiles": {number: profile.to_dict() for number, profile in store.all().items()}}


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote: number → (profile before or None, profile after)."""

    applied: dict[str, tuple[NumberProfile | None, NumberProfile]] = field(default_factory=dict)


def import_profiles(store: ProfileStore, document: Any) -> ImportResult:
    """Validate every profile in ``document`` (an :func:`export_profiles` document), then store them all.

    All or nothing: if any profile is invalid nothing is written and :class:`ProfileImportError` lists every problem.
    Numbers absent from the document are left as they are.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("profiles"), Mapping):
        raise ProfileImportError({"file": {"profiles": 'missing: expected {"profiles": {"+1…": {…}}}'}})
    if document.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise ProfileImportError({"file": {"format": f"must be {EXPORT_FORMAT!r}"}})
    parsed: dict[str, NumberProfile] = {}
    problems: dict[str, dict[str, str]] = {}
    for number, data in document["profiles"].items():
        if not isinstance(data, Mapping):
            problems[number] = {"profile": "must be an object"}
            continue
        profile, found = profile_from_data(data, store.carriers)
        if not E164.match(str(number)):
            found = {"number": "must be in E.164 form like +14155551234", **found}
        if profile is not None and not found:
            found = store.problems(str(number), profile)  # the dialling rules too: all or nothing
        if found or profile is None:
            problems[number] = found
        else:
            parsed[number] = profile
    if problems:
        raise ProfileImportError(problems)
    applied: dict[str, tuple[NumberProfile | None, NumberProfile]] = {}
    for number, profile in parsed.items():
        before = store.for_number(number)
        applied[number] = (before if before.own else None, store.set(number, profile))
    return ImportResult(applied)
