"""Log configuration: one JSON object per line, to stderr (Heroku and Render collect it).

Every line of a call carries what is known of it — ``request_id``, ``carrier``, ``call_id``, ``session_id``,
``number`` — from a context variable: each thread (a greenlet under gevent, see :mod:`app.background`) has
its own, so concurrent calls never mix their fields. Secrets are kept out twice over: the code never formats them, and
:func:`redact` scrubs the shapes they come in (``token=…`` query parameters, ``Bearer …``, Kallglot keys)
from every rendered line as a safety net.

``LOG_FORMAT=text`` switches to one human-readable line per event (local debugging); JSON is the default.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

#: The fields a call's log lines carry, in the order they are written.
LOG_CONTEXT_FIELDS = ("request_id", "carrier", "call_id", "session_id", "number")
#: Python's docs ask for context variables to be created once, at module level (they are keys into each
#: thread's or task's own context, not state). Values are read-only mappings, replaced never mutated.
_LOG_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("kallglot_bridge_log_context",
                                                         default=MappingProxyType({}))

_SECRET_PATTERNS = (
    # key=value pairs that carry credentials (Kallglot stream URLs end in ?token=…).
    (re.compile(r"(?i)(\b[a-z_]*(?:token|key|secret|password|signature)=)[^&\s'\"]+"), r"\1***"),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"\bsk_(?:live|test)_[A-Za-z0-9_-]+"), "sk_***"),
    (re.compile(r"(?i)(\brelay_token[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/=-]+"), r"\1***"),
)


def redact(text: str) -> str:
    """``text`` with anything shaped like a credential replaced by ``***``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def bind_log_context(**fields: str | None) -> None:
    """Add ``fields`` (empty values are skipped) to every later log line of the current thread."""
    current = _LOG_CONTEXT.get()
    merged = {**current, **{k: str(v) for k, v in fields.items() if v}}
    _LOG_CONTEXT.set(MappingProxyType(merged))


def reset_log_context(**fields: str | None) -> None:
    """Replace the current thread's log context with exactly ``fields`` (empty values skipped).

    A keep-alive connection serves many requests in one thread, so each request starts from scratch.
    """
    _LOG_CONTEXT.set(MappingProxyType({k: str(v) for k, v in fields.items() if v}))


def log_context() -> dict[str, str]:
    """The current thread's log context (a copy)."""
    return dict(_LOG_CONTEXT.get())


class JsonFormatter(OrjsonFormatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, ``pid``, the call's context
    fields, any ``extra=`` fields, and ``exc`` (the traceback) when there is one. Every string is passed
    through :func:`redact`.

    The rendering is python-json-logger's (with orjson, already a dependency); this class only chooses the
    field names, adds the timestamp and the context, and scrubs the result.
    """

    def __init__(self) -> None:
        super().__init__(["levelname", "name", "message", "process"],
                         rename_fields={"levelname": "level", "name": "logger", "process": "pid", "exc_info": "exc"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        """The library's fields, preceded by a UTC millisecond timestamp and followed by the call's context."""
        log_data["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        super().add_fields(log_data, record, message_dict)
        log_data.update(_LOG_CONTEXT.get())

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        """Scrub every string value (message, traceback, extras) of credential shapes."""
        return {key: redact(value) if isinstance(value, str) else value for key, value in log_data.items()}


class TextFormatter(logging.Formatter):
    """The human-readable alternative (``LOG_FORMAT=text``): context fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line (plus a traceback), secrets redacted."""
        context = " ".join(f"{k}={v}" for k, v in _LOG_CONTEXT.get().items())
        return redact(super().format(record) + (f" [{context}]" if context else ""))


def make_formatter(log_format: str | None = None) -> logging.Formatter:
    """The formatter for ``log_format`` (default ``LOG_FORMAT``, else JSON)."""
    chosen = (log_format or os.environ.get("LOG_FORMAT") or "json").strip().lower()
    return TextFormatter() if chosen == "text" else JsonFormatter()


def configure_logging(level: str | None = None, log_format: str | None = None) -> None:
    """Configure the ``app`` logger once per process; ``LOG_LEVEL`` (default INFO) and ``LOG_FORMAT``
    (``json``, the default, or ``text``) choose the level and the line format."""
    logger = logging.getLogger("app")
    if getattr(logger, "_kallglot_bridge_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    logger.addHandler(handler)
    logger.setLevel((level or os.environ.get("LOG_LEVEL") or "INFO").upper())
    logger.propagate = False
    logger._kallglot_bridge_configured = True  # type: ignore[attr-defined]


#: Headers that carry a request ID set upstream: Heroku's router, Render's proxy (a carrier's blueprint may
#: name its own, after these: see :func:`request_log_fields`).
REQUEST_ID_HEADERS = ("X-Request-ID", "Rndr-Id")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")


def request_log_fields(headers: Mapping[str, str], extra_id_headers: Sequence[str] = ()) -> dict[str, str]:
    """The log context every HTTP request starts with: a request ID (upstream's from :data:`REQUEST_ID_HEADERS`
    or ``extra_id_headers``, or a new one). Carrier routes add the carrier, its call ID and the called number
    themselves (each carrier's ``blueprint.py``)."""
    names = (*REQUEST_ID_HEADERS, *extra_id_headers)
    request_id = next((headers[h] for h in names if headers.get(h)), "") or os.urandom(8).hex()
    return {"request_id": _SAFE_ID.sub("", request_id)[:64]}


def register_request_log_context(app: Any) -> None:
    """Give every request's log lines its request ID (carrier blueprints then bind the call's fields)."""
    from flask import request

    @app.before_request
    def _bind_request_context() -> None:
        # Cache the raw body first: signature checks (Telnyx) need it after the form is parsed. Only for a
        # request some route will handle (a 404/405 is never read), and never beyond MAX_CONTENT_LENGTH (413).
        if request.routing_exception is None:
            request.get_data(cache=True)
        reset_log_context(**request_log_fields(request.headers))

    @app.teardown_request
    def _clear_request_context(_exc: BaseException | None) -> None:
        reset_log_context()
