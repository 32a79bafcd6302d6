"""A small Kallglot REST client over ``requests`` (Kallglot ships no SDK).

Timeouts and retries are sized for a carrier webhook: Twilio gives the whole voice webhook 15 s
(error 31408), so every call here finishes, retries included, within ``total_budget_seconds``.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import requests

from app import metrics

log = logging.getLogger(__name__)


class KallglotError(Exception):
    """A failed Kallglot call; ``code`` is the API's ``error.code`` (or ours for transport failures)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "", error_type: str = "",
                 request_id: str = "", retry_after: float | None = None) -> None:
        self.status = status
        self.code = code
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after = retry_after
        #: True when an earlier attempt of the same request got no answer (it may have been processed).
        self.maybe_processed = False
        where = f"HTTP {status}" if status else "request failed"
        super().__init__(f"Kallglot {where} ({code or 'no code'}): {message}")


class KallglotUnavailable(KallglotError):
    """Kallglot could not be reached, timed out, or answered 5xx after the retries."""


class KallglotAuthenticationError(KallglotError):
    """401: the API key is wrong, expired or revoked."""


class KallglotInsufficientCredits(KallglotError):
    """402: the organization has no API credits left."""


class KallglotPermissionDenied(KallglotError):
    """403: missing scope, or the organization is inactive or suspended."""


class KallglotValidationError(KallglotError):
    """400/422: the request was refused as invalid (``param`` names the field when Kallglot says)."""


class KallglotNotFound(KallglotError):
    """404: no such session."""


class KallglotRateLimited(KallglotError):
    """429 after the retries: too many requests."""


class KallglotConflict(KallglotError):
    """409: e.g. an idempotent request with the same key is still running."""


_ERRORS_BY_STATUS: dict[int, type[KallglotError]] = {
    400: KallglotValidationError, 401: KallglotAuthenticationError, 402: KallglotInsufficientCredits,
    403: KallglotPermissionDenied, 404: KallglotNotFound, 409: KallglotConflict,
    422: KallglotValidationError, 429: KallglotRateLimited,
}
_RETRYABLE = {409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class StreamGrant:
    """Where and how to open a session's stream socket. The token is a secret: never log or store it."""

    url: str
    token: str
    expires_at: datetime | None

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"StreamGrant(url={self.url!r}, token='***', expires_at={self.expires_at!r})"


@dataclass(frozen=True)
class KallglotSession:
    """The fields of a Kallglot session this service uses."""

    id: str
    status: str
    stream: StreamGrant | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> KallglotSession:
        """Parse a session object from the API."""
        stream = body.get("stream") or None
        grant = None
        if isinstance(stream, dict) and stream.get("url") and stream.get("token"):
            grant = StreamGrant(url=str(stream["url"]), token=str(stream["token"]),
                                expires_at=_parse_time(stream.get("expires_at")))
        return cls(id=str(body["id"]), status=str(body.get("status", "")), stream=grant)


#: Kallglot session ids (``sess_`` + base32); anything else never reaches a URL path.
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def session_path_id(session_id: str) -> str:
    """``session_id`` validated and quoted for a URL path segment (a ``?`` or ``/`` would change the request)."""
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise KallglotValidationError(f"invalid session id {str(session_id)[:40]!r}", code="invalid_session_id")
    return quote(session_id, safe="")


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class KallglotClient:
    """Create, get and end Kallglot sessions.

    Every POST carries an ``Idempotency-Key`` chosen by the caller from the carrier's call ID, so a
    retried carrier webhook can never create a second session.
    """

    def __init__(self, base_url: str, api_key: str, *, connect_timeout: float = 3.0, read_timeout: float = 5.0,
                 total_budget_seconds: float = 10.0, max_attempts: int = 3,
                 session: requests.Session | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        # The budget's clock and the backoff's sleep: tests pass a virtual pair, so the budget is checked on
        # what the client planned rather than on how fast a loaded machine ran it.
        self._clock = clock
        self._sleep = sleep
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_budget_seconds = total_budget_seconds
        self.max_attempts = max_attempts
        self._http = session or requests.Session()

    def __repr__(self) -> str:
        return f"KallglotClient(base_url={self.base_url!r})"

    def create_session(self, *, mode: str, idempotency_key: str, phone_number: str | None = None,
                       source_language: str | None = None, target_language: str | None = None,
                       metadata: dict[str, str] | None = None,
                       participants: list[dict[str, str]] | None = None,
                       sip_routing: bool = False) -> KallglotSession:
        """``POST /v1/sessions`` with phone-number routing (or, with ``sip_routing``, ``routing.type = "sip"`` as
        Kallglot's SIP guide asks: one routing method only); returns the new (or idempotently replayed) session.

        ``participants`` (sessions that will have an agent): see :func:`customer_and_agent`.
        """
        body: dict[str, Any] = {"mode": mode}
        if source_language:
            body["source_language"] = source_language
        if target_language:
            body["target_language"] = target_language
        if sip_routing:
            body["routing"] = {"type": "sip"}
        elif phone_number:
            body["routing"] = {"phone_number": phone_number}
        if metadata:
            body["metadata"] = metadata
        if participants:
            body["participants"] = participants
        return KallglotSession.from_json(self._request("POST", "/sessions", json=body, idempotency_key=idempotency_key))

    def request_analysis(self, session_id: str, analysis_type: str = "default") -> dict[str, Any]:
        """``POST /v1/sessions/{id}/analysis`` (202, usually ``processing``; costs a credit, so keyed per session
        and type: a double click does not pay twice)."""
        return self._request("POST", f"/sessions/{session_path_id(session_id)}/analysis", json={"type": analysis_type},
                             idempotency_key=f"analysis-{session_id}-{analysis_type}")

    def get_analysis(self, analysis_id: str) -> dict[str, Any]:
        """``GET /v1/analyses/{id}``: the analysis object (``status``, and its result once complete)."""
        return self._request("GET", f"/analyses/{_path_id(analysis_id)}")

    def get_session(self, session_id: str) -> KallglotSession:
        """``GET /v1/sessions/{id}`` — also the way to a fresh stream token (assumption 4 in
        :mod:`app.kallglot.stream_protocol`)."""
        return KallglotSession.from_json(self._request("GET", f"/sessions/{session_path_id(session_id)}"))

    def end_session(self, session_id: str) -> dict[str, Any]:
        """``POST /v1/sessions/{id}/end``; idempotent at Kallglot, and keyed so our own retries are too."""
        return self._request("POST", f"/sessions/{session_path_id(session_id)}/end",
                             idempotency_key=f"end-{session_id}")

    # -- after the call (assumption 7 in app/kallglot/stream_protocol.py) ----------------------------------
    def get_transcript(self, session_id: str) -> dict[str, Any]:
        """``GET /v1/sessions/{id}/transcript``: ``status`` and ``turns[]`` (speaker, language, text, translation)."""
        return self._request("GET", f"/sessions/{_path_id(session_id)}/transcript")

    def list_recordings(self, session_id: str) -> list[dict[str, Any]]:
        """``GET /v1/sessions/{id}/recordings``: the session's recordings (``data`` of a list object)."""
        body = self._request("GET", f"/sessions/{_path_id(session_id)}/recordings")
        data = body.get("data")
        return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []

    def open_recording_audio(self, recording_id: str, *, range_header: str | None = None) -> requests.Response:
        """``GET /v1/recordings/{id}/audio`` as a streamed response (MP3); the caller must close it.

        The API key stays here: the admin streams the body on to the browser. Raises :class:`KallglotError`
        for an error answer.
        """
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "audio/mpeg"}
        if range_header:
            headers["Range"] = range_header
        try:
            response = self._http.get(f"{self.base_url}/recordings/{_path_id(recording_id)}/audio", headers=headers,
                                      timeout=(self.connect_timeout, self.read_timeout), stream=True)
        except requests.RequestException as exc:
            raise KallglotUnavailable(type(exc).__name__, code="unreachable") from None
        if response.status_code >= 400:
            error = _error_from_response(response)
            response.close()
            raise error
        return response

    def _request(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        deadline = self._clock() + self.total_budget_seconds
        attempt = 0
        unanswered = False  # an attempt went out and got no answer: Kallglot may have processed it
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            timeout = (min(self.connect_timeout, max(remaining, 0.1)), min(self.read_timeout, max(remaining, 0.1)))
            started = time.monotonic()
            try:
                response = self._http.request(method, self.base_url + path, json=json, headers=headers, timeout=timeout)
            except requests.RequestException as exc:
                error: KallglotError = KallglotUnavailable(type(exc).__name__, code="unreachable")
                unanswered = unanswered or not isinstance(exc, requests.ConnectTimeout)
                metrics.observe_kallglot_api(method, path, time.monotonic() - started, "unreachable")
            else:
                log.debug("kallglot %s %s -> %s in %.0f ms", method, path, response.status_code,
                          (time.monotonic() - started) * 1000)
                metrics.observe_kallglot_api(method, path, time.monotonic() - started, None)
                if response.status_code < 400:
                    try:
                        return dict(response.json())
                    except ValueError:
                        error = KallglotUnavailable("response was not JSON", status=response.status_code,
                                                    code="invalid_response")
                else:
                    error = _error_from_response(response)
                metrics.count_kallglot_api_error(method, path, error.code or f"http_{error.status}")
            retryable = isinstance(error, KallglotUnavailable) or error.status in _RETRYABLE
            wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** (attempt - 1)
            if not retryable or attempt >= self.max_attempts or self._clock() + wait >= deadline:
                error.maybe_processed = unanswered
                raise error
            log.warning("kallglot %s %s failed (%s), retry %d in %.2fs", method, path, error, attempt, wait)
            self._sleep(wait)


def _path_id(value: str) -> str:
    """An id safe to put in a URL path (Kallglot ids are ``prefix_`` plus letters and digits)."""
    if not value or not all(c.isalnum() or c in "_-" for c in value) or len(value) > 128:
        raise KallglotValidationError(f"invalid id {value[:40]!r}", code="invalid_id")
    return value


def _error_from_response(response: requests.Response) -> KallglotError:
    try:
        payload = response.json().get("error") or {}
    except (ValueError, AttributeError):
        payload = {}
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header:
        try:
            retry_after = max(0.0, float(header))
        except ValueError:
            retry_after = None
    status = response.status_code
    cls = _ERRORS_BY_STATUS.get(status, KallglotUnavailable if status >= 500 else KallglotError)
    return cls(str(payload.get("message") or response.reason or "error"), status=status,
               code=str(payload.get("code") or ""), error_type=str(payload.get("type") or ""),
               request_id=str(payload.get("request_id") or response.headers.get("X-Request-ID") or ""),
               retry_after=retry_after)


def customer_and_agent(source_language: str | None, target_language: str | None) -> list[dict[str, str]]:
    """The ``participants`` of a session with a customer and an agent, in the shape of Kallglot's own
    multi-participant example (customer on the phone, agent in a browser): ``[{"type": "customer", "language":
    <source>}, {"type": "agent", "language": <target>}]``. A language left to auto-detection is omitted.

    Assumption 8 in :mod:`app.kallglot.stream_protocol`: the team's API notes found no participant API; the shape
    is the example's, as the issue quotes it.
    """
    customer: dict[str, str] = {"type": "customer"}
    agent: dict[str, str] = {"type": "agent"}
    if source_language:
        customer["language"] = source_language
    if target_language:
        agent["language"] = target_language
    return [customer, agent]
