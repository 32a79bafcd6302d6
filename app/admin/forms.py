"""The admin's forms (Flask-WTF): sign-in, and the number profile (what the user typed, kept verbatim to re-render,
and what is wrong with it).

CSRF is not checked per form: :func:`app.admin.auth.guard` runs Flask-WTF's ``CSRFProtect`` on every admin POST,
the button-only forms (delete, end, sign out) included, before any view sees the request.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from werkzeug.datastructures import FileStorage, MultiDict
from wtforms import BooleanField, Field, Form, HiddenField, PasswordField, StringField, TextAreaField
from wtforms.validators import Optional, Regexp, ValidationError

from app.profiles.store import E164, NumberProfile
from app.profiles.transfer import profile_from_data

TEXT_FIELDS = ("carrier", "transport", "mode", "source_language", "target_language", "greeting", "greeting_language",
               "agent_number", "fallback_message", "fallback_language", "fallback_number",
               "reconnect_window_seconds", "hangup_grace_seconds", "browser_agent_wait_seconds")
#: Blank metadata rows offered for new entries (no JavaScript needed to add one).
BLANK_METADATA_ROWS = 2
#: Sign-in names are labels for the audit log, not identities: kept short.
MAX_NAME_LENGTH = 60


class AdminForm(FlaskForm):
    """Base of the admin's forms: CSRF is checked once for every admin POST (see the module docstring)."""

    class Meta:
        csrf = False


def _clean_name(value: str | None) -> str:
    return (value or "").strip()[:MAX_NAME_LENGTH]


class SignInForm(AdminForm):
    """The sign-in form: a name for the audit log, the shared password, and where to go afterwards."""

    name = StringField("Your name", filters=[_clean_name])
    password = PasswordField("Admin password", filters=[lambda value: value or ""])
    next = HiddenField(filters=[lambda value: value or ""])


def _strip(value: object) -> str:
    return value.strip() if isinstance(value, str) else "" if value is None else str(value)


class ProfileForm(AdminForm):
    """A number profile as typed: field values as strings (re-rendered verbatim), metadata rows, and
    :attr:`problems` by field name. The rules themselves are the profile's own (:func:`profile_from_data`),
    shared with the JSON import and the CLI, so all three accept and refuse exactly the same input."""

    number = StringField("Phone number (E.164)", filters=[_strip])
    carrier = StringField("Carrier", filters=[_strip])
    transport = StringField("Transport", filters=[_strip])
    mode = StringField("Kallglot mode", filters=[_strip])
    source_language = StringField("Caller language", filters=[_strip])
    target_language = StringField("Agent language", filters=[_strip])
    greeting = TextAreaField("Greeting text", filters=[_strip])
    greeting_language = StringField("Greeting language", filters=[_strip])
    agent_number = StringField("Agent number (E.164)", filters=[_strip])
    agent_hangup_ends_call = BooleanField("When the agent hangs up, end the whole call")
    browser_agents = BooleanField("Offer calls to agents in the browser first (the Agent page)")
    browser_agent_wait_seconds = StringField("Wait for a browser agent (seconds)", filters=[_strip])
    fallback_message = TextAreaField("Fallback message", filters=[_strip])
    fallback_language = StringField("Fallback message language", filters=[_strip])
    fallback_number = StringField("Fallback number (E.164)", filters=[_strip])
    reconnect_window_seconds = StringField("Reconnect window (seconds)", filters=[_strip])
    hangup_grace_seconds = StringField("Hang-up grace (seconds)", filters=[_strip])

    def __init__(self, formdata: MultiDict[str, str] | None = None, *,
                 metadata: list[tuple[str, str]] | None = None, **data: Any) -> None:
        super().__init__(formdata=formdata, data=data)
        if formdata is not None:
            # Metadata rows repeat the same two names (no JavaScript needed to add a row): read them as lists.
            rows = zip(formdata.getlist("metadata_key"), formdata.getlist("metadata_value"), strict=False)
            metadata = [(k.strip(), v.strip()) for k, v in rows if k.strip() or v.strip()]
        self.metadata: list[tuple[str, str]] = list(metadata or [])
        self.problems: dict[str, str] = {}
        self._profile: NumberProfile | None = None
        self._carriers: tuple[str, ...] = ()

    @classmethod
    def from_profile(cls, number: str, profile: NumberProfile) -> ProfileForm:
        """The form showing ``profile`` (an existing one, or the defaults for a new number)."""
        data = profile.to_dict()
        values = {name: "" if data[name] is None else str(data[name]) for name in TEXT_FIELDS}
        return cls(None, metadata=list(profile.metadata.items()), number=number,
                   agent_hangup_ends_call=profile.agent_hangup_ends_call, browser_agents=profile.browser_agents,
                   **values)

    @classmethod
    def from_request(cls, formdata: MultiDict[str, str], number: str | None = None) -> ProfileForm:
        """The form as submitted; ``number`` is fixed when editing (a posted ``number`` is ignored)."""
        form = cls(formdata)
        if number is not None:
            form.number.data = number.strip()
        return form

    @property
    def values(self) -> dict[str, str]:
        """The text fields as typed (stripped), by name."""
        return {name: self[name].data or "" for name in TEXT_FIELDS}

    def metadata_rows(self) -> list[tuple[str, str]]:
        """Rows to render: the entered ones plus blanks for new entries."""
        return self.metadata + [("", "")] * BLANK_METADATA_ROWS

    def validated_profile(self, carriers: Collection[str]) -> NumberProfile | None:
        """The profile the form describes, or None with :attr:`problems` filled in (``carriers``: the names
        known, :attr:`ProfileStore.carriers`)."""
        self._carriers = tuple(carriers)
        self.validate()
        return None if self.problems else self._profile

    def validate(self, extra_validators: Mapping[str, Sequence[Any]] | None = None) -> bool:
        """WTForms' validation, then the profile's own rules; :attr:`problems` holds one message per field."""
        super().validate(extra_validators)
        problems = {name: messages[0] for name, messages in self.errors.items() if messages}
        if not E164.match(self.number.data or ""):
            problems["number"] = "must be in E.164 form like +14155551234 (a +, the country code, no spaces)"
        metadata: dict[str, str] = {}
        for key, value in self.metadata:
            if not key:
                problems["metadata"] = f"the value {value!r} has no key"
            elif key in metadata:
                problems["metadata"] = f"the key {key!r} appears twice"
            metadata[key] = value
        data: dict[str, Any] = {**self.values, "metadata": metadata,
                                "agent_hangup_ends_call": bool(self.agent_hangup_ends_call.data),
                                "browser_agents": bool(self.browser_agents.data)}
        self._profile, found = profile_from_data(data, self._carriers)
        self.problems = {**found, **problems}
        return not self.problems


class ImportForm(AdminForm):
    """Profiles to import: an uploaded JSON file, or JSON pasted into the text box."""

    file = FileField("JSON file")
    json = TextAreaField("…or paste JSON", filters=[lambda value: value or ""])

    def raw_document(self, max_bytes: int) -> bytes:
        """The uploaded file (read up to ``max_bytes`` + 1, so an oversized one is detected, not stored), else
        the pasted text."""
        upload = self.file.data
        if isinstance(upload, FileStorage) and upload.filename:
            return upload.read(max_bytes + 1)
        return str(self.json.data).encode()


def _utc_day(value: str, *, end: bool) -> float:
    # A date input's YYYY-MM-DD, as the first (or, for an end date, last) second of that UTC day.
    day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    return (day + timedelta(days=1) if end else day).timestamp() - (0.001 if end else 0)


def _is_day(_form: Form, field: Field) -> None:
    try:
        _utc_day(field.data, end=False)
    except ValueError:
        raise ValidationError("must be a date like 2025-01-31") from None


class CallFilterForm(AdminForm):
    """The call log's filters (a GET form): a number and a date range in UTC, each optional."""

    number = StringField("Number", filters=[_strip],
                         validators=[Optional(), Regexp(E164, message="must be in E.164 form like +14155551234")])
    since = StringField("From date (UTC)", name="from", filters=[_strip], validators=[Optional(), _is_day])
    until = StringField("To date (UTC)", name="to", filters=[_strip], validators=[Optional(), _is_day])

    def validate(self, extra_validators: Mapping[str, Sequence[Any]] | None = None) -> bool:
        """Each field's rules, then: the range must not end before it starts."""
        if super().validate(extra_validators):
            since, until = self.bounds()
            if since is not None and until is not None and since > until:
                self.until.errors = ["must not be before the start date"]
        return not self.problems

    @property
    def values(self) -> dict[str, str]:
        """The filters as typed, by their query-parameter names."""
        return {field.name: field.data or "" for field in (self.number, self.since, self.until)}

    @property
    def problems(self) -> dict[str, str]:
        """One message per query parameter that is wrong."""
        return {field.name: field.errors[0] for field in (self.number, self.since, self.until) if field.errors}

    def bounds(self) -> tuple[float | None, float | None]:
        """The range as epoch seconds (first second of the start day, last of the end day); call after validate."""
        return (_utc_day(self.since.data, end=False) if self.since.data else None,
                _utc_day(self.until.data, end=True) if self.until.data else None)
