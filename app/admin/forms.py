"""The number-profile form: what the user typed (kept verbatim to re-render) and what is wrong with it."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import MultiDict

from app.profiles.store import E164, NumberProfile
from app.profiles.transfer import profile_from_data

TEXT_FIELDS = ("carrier", "mode", "source_language", "target_language", "greeting", "greeting_language",
               "agent_number", "fallback_message", "fallback_language", "fallback_number",
               "reconnect_window_seconds", "hangup_grace_seconds")
#: Blank metadata rows offered for new entries (no JavaScript needed to add one).
BLANK_METADATA_ROWS = 2


@dataclass
class ProfileForm:
    """Form state: ``values`` are strings as typed, ``metadata`` rows as typed, ``errors`` by field name."""

    number: str
    values: dict[str, str]
    metadata: list[tuple[str, str]]
    agent_hangup_ends_call: bool
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_profile(cls, number: str, profile: NumberProfile) -> ProfileForm:
        """The form showing ``profile`` (an existing one, or the defaults for a new number)."""
        data = profile.to_dict()
        values = {name: "" if data[name] is None else str(data[name]) for name in TEXT_FIELDS}
        return cls(number=number, values=values, metadata=list(profile.metadata.items()),
                   agent_hangup_ends_call=profile.agent_hangup_ends_call)

    @classmethod
    def from_request(cls, form: MultiDict[str, str], number: str | None = None) -> ProfileForm:
        """The form as submitted; ``number`` is fixed when editing, else read from the form."""
        rows = list(zip(form.getlist("metadata_key"), form.getlist("metadata_value"), strict=False))
        return cls(number=(number if number is not None else form.get("number", "")).strip(),
                   values={name: form.get(name, "").strip() for name in TEXT_FIELDS},
                   metadata=[(k.strip(), v.strip()) for k, v in rows if k.strip() or v.strip()],
                   agent_hangup_ends_call=form.get("agent_hangup_ends_call") == "on")

    def metadata_rows(self) -> list[tuple[str, str]]:
        """Rows to render: the entered ones plus blanks for new entries."""
        return self.metadata + [("", "")] * BLANK_METADATA_ROWS

    def validate(self, carriers: Collection[str]) -> NumberProfile | None:
        """The profile the form describes, or None with :attr:`errors` filled in (``carriers``: the names known)."""
        self.errors = {}
        if not E164.match(self.number):
            self.errors["number"] = "must be in E.164 form like +14155551234 (a +, the country code, no spaces)"
        metadata: dict[str, str] = {}
        for key, value in self.metadata:
            if not key:
                self.errors["metadata"] = f"the value {value!r} has no key"
            elif key in metadata:
                self.errors["metadata"] = f"the key {key!r} appears twice"
            metadata[key] = value
        data: dict[str, Any] = {**self.values, "metadata": metadata,
                                "agent_hangup_ends_call": self.agent_hangup_ends_call}
        profile, problems = profile_from_data(data, carriers)
        self.errors = {**problems, **self.errors}
        return None if self.errors else profile
