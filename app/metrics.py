"""Prometheus metrics and the ``GET /metrics`` endpoint.

The metric objects are module-level because that is how prometheus-client is built: each metric registers
itself once per process in the library's registry, and under gunicorn (``PROMETHEUS_MULTIPROC_DIR``, set up
by ``gunicorn.conf.py``) writes its values to a per-process file that ``/metrics`` aggregates across
workers. They are the only module-level mutable state of the project.

Hot-path rule: the media relay never touches these per frame (each ``inc()`` takes a lock). It counts in
plain integers (:class:`app.relay.core.RelayStats`) and adds the deltas here every few seconds and at the
relay's end (:func:`add_relay_counts`); the hop-latency histogram is sampled.
"""
from __future__ import annotations

import hmac
import logging
import os
from typing import Any

import redis
from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

#: Seconds; the relay hop is sub-millisecond when healthy, the Kallglot API tens to hundreds of ms.
HOP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PLAYBACK_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CALLS = Counter("kallglot_bridge_calls_total",
                "Carrier calls answered by the voice webhook, by how (answered, reattached, restored, fallback).",
                ["carrier", "outcome"])
FALLBACKS = Counter("kallglot_bridge_fallbacks_total",
                    "Calls answered with the apology fallback instead of Kallglot, by reason.", ["carrier", "reason"])
WEBHOOK_REJECTIONS = Counter("kallglot_bridge_webhook_rejections_total",
                             "Carrier webhook or media-upgrade requests refused, by reason.", ["carrier", "reason"])
API_CALLS_REFUSED = Counter("kallglot_bridge_api_calls_refused_total",
                            "POST /api/calls refused by the toll-fraud rules or limits, by reason (alert on it).",
                            ["reason"])
RELAYS_LIVE = Gauge("kallglot_bridge_relays_live", "Media relays running now (live calls with audio flowing).",
                    ["carrier"], multiprocess_mode="livesum")
RELAYS_ENDED = Counter("kallglot_bridge_relays_ended_total", "Media relays ended, by why.", ["carrier", "reason"])
MEDIA_FRAMES = Counter("kallglot_bridge_media_frames_total",
                       "Carrier media frames relayed: uplink = from the caller, downlink = to the caller.",
                       ["carrier", "direction"])
MEDIA_BYTES = Counter("kallglot_bridge_media_bytes_total", "μ-law audio bytes relayed, by direction.",
                      ["carrier", "direction"])
KALLGLOT_AUDIO_MESSAGES = Counter("kallglot_bridge_kallglot_audio_input_total",
                                  "audio.input messages sent to Kallglot.", ["carrier"])
MEDIA_DROPPED = Counter("kallglot_bridge_media_dropped_total",
                        "Audio dropped: malformed carrier frames, or chunks lost while Kallglot reconnected.",
                        ["carrier", "reason"])
KALLGLOT_STREAM_RECONNECTS = Counter("kallglot_bridge_kallglot_stream_reconnects_total",
                                     "Kallglot stream sockets reopened after a drop.", ["carrier"])
RELAY_HOP_SECONDS = Histogram("kallglot_bridge_relay_hop_seconds",
                              "Time a message spends inside the relay (sampled): uplink = last carrier frame of a "
                              "chunk in → audio.input sent; downlink = audio.output in → carrier frame sent.",
                              ["direction"], buckets=HOP_BUCKETS)
PLAYBACK_LAG_SECONDS = Histogram("kallglot_bridge_playback_lag_seconds",
                                 "Playback lag: a mark sent to the carrier at the end of an utterance of return audio "
                                 "→ the carrier's echo that it played everything before it.", ["carrier"],
                                 buckets=PLAYBACK_BUCKETS)
KALLGLOT_API_SECONDS = Histogram("kallglot_bridge_kallglot_api_seconds",
                                 "Kallglot REST request latency, per attempt.", ["operation"], buckets=API_BUCKETS)
KALLGLOT_API_ERRORS = Counter("kallglot_bridge_kallglot_api_errors_total",
                              "Failed Kallglot REST attempts, by error code.", ["operation", "code"])
SESSIONS_ENDED = Counter("kallglot_bridge_sessions_ended_total", "Sessions ended, by who ended them.", ["by"])
SESSION_END_RETRIES = Counter("kallglot_bridge_session_end_retries_total",
                              "Kallglot end calls that failed and were scheduled for a retry.")
SESSIONS_HELD = Counter("kallglot_bridge_sessions_held_total",
                        "Sessions held for a reconnect or the hang-up grace after their last leg ended.")
SESSIONS_REATTACHED = Counter("kallglot_bridge_sessions_reattached_total",
                              "Legs re-attached to a held session (returning caller, restored stream).", ["how"])


def count_call(carrier: str, outcome: str) -> None:
    """One call answered by a voice webhook with ``outcome``."""
    CALLS.labels(carrier, outcome).inc()


def count_fallback(carrier: str, reason: str) -> None:
    """One call answered with the fallback (and counted as a call with outcome ``fallback``)."""
    FALLBACKS.labels(carrier, reason).inc()
    CALLS.labels(carrier, "fallback").inc()


def kallglot_operation(method: str, path: str) -> str:
    """A low-cardinality name for a Kallglot REST call (session IDs left out)."""
    if path == "/sessions":
        return "create_session" if method == "POST" else "list_sessions"
    if path.endswith("/end"):
        return "end_session"
    if path.startswith("/sessions/"):
        return "get_session"
    return "other"


def observe_kallglot_api(method: str, path: str, seconds: float, error_code: str | None) -> None:
    """One Kallglot REST attempt took ``seconds`` and failed with ``error_code`` (None: it succeeded)."""
    operation = kallglot_operation(method, path)
    KALLGLOT_API_SECONDS.labels(operation).observe(seconds)
    if error_code is not None:
        count_kallglot_api_error(method, path, error_code)


def count_kallglot_api_error(method: str, path: str, error_code: str) -> None:
    """One failed Kallglot REST attempt, by the API's ``error.code`` (or ours for transport failures)."""
    KALLGLOT_API_ERRORS.labels(kallglot_operation(method, path), error_code or "unknown").inc()


#: Which Prometheus series each :class:`~app.relay.core.RelayStats` counter feeds: (metric, labels after carrier).
_RELAY_COUNTERS: dict[str, tuple[Counter, tuple[str, ...]]] = {
    "frames_in": (MEDIA_FRAMES, ("uplink",)),
    "bytes_in": (MEDIA_BYTES, ("uplink",)),
    "frames_to_carrier": (MEDIA_FRAMES, ("downlink",)),
    "bytes_to_carrier": (MEDIA_BYTES, ("downlink",)),
    "chunks_to_kallglot": (KALLGLOT_AUDIO_MESSAGES, ()),
    "frames_dropped": (MEDIA_DROPPED, ("malformed_frame",)),
    "chunks_dropped_while_reconnecting": (MEDIA_DROPPED, ("kallglot_reconnecting",)),
    "kallglot_reconnects": (KALLGLOT_STREAM_RECONNECTS, ()),
}


def add_relay_counts(carrier: str, counts: dict[str, int]) -> None:
    """Add one relay's counter deltas (see :meth:`app.relay.core.RelayStats.take_deltas`)."""
    for name, value in counts.items():
        if value and name in _RELAY_COUNTERS:
            metric, labels = _RELAY_COUNTERS[name]
            metric.labels(carrier, *labels).inc(value)


#: HTTP statuses of carrier routes that mean "refused", and the reason they are counted under.
REJECTION_REASONS = {400: "malformed", 403: "signature", 404: "not_found", 405: "method", 503: "unavailable"}


def count_rejections(blueprint: Blueprint, carrier: str) -> None:
    """Count ``blueprint``'s refused requests once, whatever refused them (signature check, validation, state),
    under the label ``carrier``: each carrier's blueprint declares its own label."""

    @blueprint.after_request
    def _count_rejection(response: Response) -> Response:
        if response.status_code in REJECTION_REASONS:
            WEBHOOK_REJECTIONS.labels(carrier, REJECTION_REASONS[response.status_code]).inc()
        return response


def _live_sessions_exposition() -> bytes:
    """``kallglot_bridge_live_sessions``: sessions not yet ended, fleet-wide (one pipelined ZCARD per shard)."""
    svc = current_app.extensions.get("kallglot_bridge")
    if svc is None:
        return b""
    try:
        count = svc.lifecycle.live_session_count()
    except redis.RedisError as exc:
        log.warning("metrics: live sessions not counted, Redis unreachable: %s", type(exc).__name__)
        return b""
    return (b"# HELP kallglot_bridge_live_sessions Kallglot sessions not yet ended (all instances, from Redis).\n"
            b"# TYPE kallglot_bridge_live_sessions gauge\n"
            b"kallglot_bridge_live_sessions %d\n" % count)


def exposition() -> bytes:
    """Every metric in Prometheus text format: all workers' values under gunicorn, this process's otherwise."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry: Any = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry) + _live_sessions_exposition()


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus scrape endpoint; with ``METRICS_TOKEN`` set it needs ``Authorization: Bearer <token>``."""
    svc = current_app.extensions.get("kallglot_bridge")
    token = svc.settings.metrics_token if svc is not None else ""
    if token:
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            return Response("missing or invalid bearer token\n", status=401, mimetype="text/plain",
                            headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    return Response(exposition(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
