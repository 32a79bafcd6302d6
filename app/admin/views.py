"""Admin pages: numbers (profiles, import/export, audit), connect a number, live calls, call log.

Every change goes through :func:`audit` so the audit page shows who did what and when. Forms follow
post/redirect/get; invalid input re-renders the form with the user's values and the errors next to fields.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Response, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import NotFound

from app.admin import presenters
from app.admin.actions import end_session_now
from app.admin.auth import admin_name
from app.admin.blueprint import bp
from app.admin.forms import CallFilterForm, ImportForm, ProfileForm
from app.audit import AuditLog, diff
from app.calls.lifecycle import EndOutcome
from app.carriers.contract import CarrierError
from app.carriers.registry import CARRIERS, carrier, carrier_names
from app.config import KALLGLOT_MODES
from app.extensions import services
from app.profiles.store import TRANSPORT_TRADE_OFFS, TRANSPORTS, NumberProfile, ProfileError
from app.profiles.transfer import ProfileImportError, export_profiles, import_profiles

#: Largest import accepted (a few thousand profiles).
MAX_IMPORT_BYTES = 2 * 1024 * 1024


def audit(action: str, target: str, changes: dict[str, Any] | None = None) -> None:
    """Record a change made by the signed-in admin."""
    svc = services()
    AuditLog(svc.redis, svc.keys).record(admin_name(), action, target, changes)


@bp.context_processor
def page_globals() -> dict[str, Any]:
    """Values every admin template uses."""
    return {"carriers": carrier_names(), "modes": KALLGLOT_MODES, "transports": TRANSPORTS,
            "transport_trade_offs": TRANSPORT_TRADE_OFFS, "when": presenters.when}


@bp.get("/")
def home() -> ResponseReturnValue:
    """The numbers page is the admin's home."""
    return redirect(url_for("admin.numbers"))


# -- numbers -------------------------------------------------------------------------------------------------

@bp.get("/numbers")
def numbers() -> ResponseReturnValue:
    """Numbers with their own profile, the default profile, and import/export."""
    store = services().profiles
    return render_template("admin/numbers.html", profiles=store.all(), default=store.default,
                           import_errors=None, import_text="")


def _render_form(form: ProfileForm, *, creating: bool, status: int = 200) -> ResponseReturnValue:
    return render_template("admin/number_form.html", form=form, creating=creating), status


@bp.route("/numbers/new", methods=["GET", "POST"])
def number_new() -> ResponseReturnValue:
    """Create a profile for a number (``?number=`` and ``?carrier=`` prefill it, e.g. from the connect page)."""
    store = services().profiles
    if request.method == "GET":
        form = ProfileForm.from_profile(request.args.get("number", ""), store.default)
        if request.args.get("carrier") in carrier_names():
            form.carrier.data = request.args["carrier"]
        return _render_form(form, creating=True)
    form = ProfileForm.from_request(request.form)
    if (profile := form.validated_profile(services().profiles.carriers)) is not None and store.for_number(form.number.data).own:
        form.problems["number"] = "already has a profile: edit it instead"
        profile = None
    return _save(form, profile, creating=True)


@bp.route("/numbers/<number>", methods=["GET", "POST"])
def number_edit(number: str) -> ResponseReturnValue:
    """Edit a number's own profile."""
    profile = services().profiles.for_number(number)
    if not profile.own:
        raise NotFound(f"{number} has no profile of its own")
    if request.method == "GET":
        return _render_form(ProfileForm.from_profile(number, profile), creating=False)
    form = ProfileForm.from_request(request.form, number=number)
    return _save(form, form.validated_profile(services().profiles.carriers), creating=False)


def _save(form: ProfileForm, profile: NumberProfile | None, *, creating: bool) -> ResponseReturnValue:
    store = services().profiles
    if profile is None:
        return _render_form(form, creating=creating, status=422)
    number = form.number.data
    before = store.for_number(number)
    try:
        saved = store.set(number, profile)
    except ProfileError as exc:  # the store's own checks (kept in case they grow beyond the form's)
        form.problems.update(exc.problems)
        return _render_form(form, creating=creating, status=422)
    audit("create profile" if creating else "update profile", number,
          diff(before.to_dict() if before.own else None, saved.to_dict()))
    flash(f"Saved {number}. The next call to it uses this profile.")
    return redirect(url_for("admin.numbers"))


@bp.post("/numbers/<number>/delete")
def number_delete(number: str) -> ResponseReturnValue:
    """Remove a number's own profile (calls to it get the default profile)."""
    store = services().profiles
    before = store.for_number(number)
    if store.delete(number):
        audit("delete profile", number, diff(before.to_dict(), None))
        flash(f"Deleted the profile of {number}; calls to it now get the default profile.")
    return redirect(url_for("admin.numbers"))


@bp.get("/numbers/export")
def numbers_export() -> ResponseReturnValue:
    """Every profile as a JSON file (the format ``flask numbers import`` and the import form read)."""
    body = json.dumps(export_profiles(services().profiles), indent=2, sort_keys=True)
    return Response(body, mimetype="application/json",
                    headers={"Content-Disposition": 'attachment; filename="number-profiles.json"'})


@bp.post("/numbers/import")
def numbers_import() -> ResponseReturnValue:
    """Import profiles from an uploaded file or pasted JSON: all valid, or nothing is written."""
    raw = ImportForm().raw_document(MAX_IMPORT_BYTES)
    text = raw.decode("utf-8", errors="replace")
    store = services().profiles
    try:
        if len(raw) > MAX_IMPORT_BYTES:
            raise ProfileImportError({"file": {"size": f"must be at most {MAX_IMPORT_BYTES // 1024} KiB"}})
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileImportError({"file": {"json": f"is not valid JSON ({exc.msg}, line {exc.lineno})"}}) from None
        result = import_profiles(store, document)
    except ProfileImportError as exc:
        return render_template("admin/numbers.html", profiles=store.all(), default=store.default,
                               import_errors=exc.problems, import_text=text[:20000]), 422
    for number, (before, after) in result.applied.items():
        audit("import profile", number, diff(before.to_dict() if before else None, after.to_dict()))
    flash(f"Imported {len(result.applied)} profile(s).")
    return redirect(url_for("admin.numbers"))


@bp.get("/audit")
def audit_page() -> ResponseReturnValue:
    """Who changed what and when."""
    svc = services()
    return render_template("admin/audit.html", entries=AuditLog(svc.redis, svc.keys).entries())


# -- connect a number ----------------------------------------------------------------------------------------

@bp.get("/connect")
def connect() -> ResponseReturnValue:
    """The numbers in each carrier account and whether each points here."""
    settings = services().settings
    accounts = []
    for entry in CARRIERS:
        provisioner = entry.numbers(settings)
        numbers, error = [], None
        if not provisioner.configured():
            error = f"Not configured: set {provisioner.missing_settings} to list this account's numbers."
        else:
            try:
                numbers = provisioner.numbers()
            except CarrierError as exc:
                error = str(exc)
        accounts.append({"name": entry.label, "numbers": numbers, "error": error})
    profiles = services().profiles.all()
    return render_template("admin/connect.html", accounts=accounts, profiles=profiles)


@bp.post("/connect/<carrier_name>/<path:target>")
def connect_number(carrier_name: str, target: str) -> ResponseReturnValue:
    """Point a number (Twilio: the number's voice URLs; Telnyx: its TeXML or Call Control application) here."""
    try:
        provisioner = carrier(carrier_name).numbers(services().settings)
    except KeyError:
        raise NotFound(f"no carrier {carrier_name!r}") from None
    label = request.form.get("number", target)
    try:
        written = provisioner.connect(target)
    except CarrierError as exc:
        flash(f"Could not connect {label}: {exc}", "error")
    else:
        audit(f"connect {carrier_name} number", label, {name: [None, value] for name, value in written.items()})
        flash(f"{label} now points at this service.")
    return redirect(url_for("admin.connect"))


# -- live calls and call log ---------------------------------------------------------------------------------

@bp.get("/live")
def live() -> ResponseReturnValue:
    """Sessions in progress across all instances, with their legs."""
    return render_template("admin/live.html", sessions=presenters.live_sessions(services()))


@bp.post("/live/<session_id>/end")
def live_end(session_id: str) -> ResponseReturnValue:
    """End a session now (at Kallglot, and its carrier legs)."""
    outcome = end_session_now(session_id)
    audit("end session", session_id, {"outcome": [None, outcome.value]})
    messages = {EndOutcome.ENDED: ("Ended session {}.", "message"),
                EndOutcome.ALREADY: ("Session {} was already ended or ending.", "message"),
                EndOutcome.FAILED: ("Kallglot did not end session {}; it will be retried.", "error")}
    text, category = messages.get(outcome, ("Session {}: " + outcome.value, "message"))
    flash(text.format(session_id), category)
    return redirect(url_for("admin.live"))


@bp.get("/calls")
def calls() -> ResponseReturnValue:
    """Recent calls, filterable by number and by a date range (UTC)."""
    form = CallFilterForm(request.args)
    if not form.validate():
        return render_template("admin/calls.html", rows=[], filters=form.values, errors=form.problems), 422
    since, until = form.bounds()
    rows = presenters.call_log(services().lifecycle, number=form.number.data, since=since, until=until)
    return render_template("admin/calls.html", rows=rows, filters=form.values, errors={})
