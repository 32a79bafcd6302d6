"""The per-app service objects (Redis, Kallglot client, profiles, lifecycle, relay tokens, carrier controls),
built once by :func:`init_services` and reached through :func:`services`. No module-level mutable state:
everything hangs off ``app.extensions``.

This module knows no carrier: the composition root (:mod:`app.factory`) builds each carrier's control from
:mod:`app.carriers.registry` and hands them in.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
from flask import Flask, current_app

from app.carriers.contract import CarrierControl
from app.calls.destinations import DestinationRules
from app.calls.lifecycle import SessionLifecycle
from app.calls.workers import WorkerLiveness
from app.config import Settings
from app.kallglot.client import KallglotClient
from app.profiles import NumberProfile, ProfileStore
from app.redis_connection import connect, parse_redis_target
from app.redis_keys import RedisKeys
from app.relay.tokens import RelayGuard, RelayTokenSealer
from app.websocket import LAYERS, MediaSock

EXTENSION_KEY = "kallglot_bridge"
#: The flask-sock extension object, the usual Flask-extension pattern (like ``db = SQLAlchemy()``): it holds
#: no state of its own; WebSocket routes are declared with ``sock.route(path, bp=blueprint)``.
sock = MediaSock()
#: Redis calls sit on the webhook path, inside the carrier's 15 s budget: fail fast when Redis is gone.
REDIS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Services:
    """Everything request handlers and relays need, built from :class:`Settings`."""

    settings: Settings
    redis: redis.Redis
    keys: RedisKeys
    kallglot: KallglotClient
    profiles: ProfileStore
    lifecycle: SessionLifecycle
    relay_tokens: RelayTokenSealer
    #: Single use of relay tokens and one relay per leg.
    relay_guard: RelayGuard
    #: Call control per carrier name (hang up, dial), for the vendor-free lifecycle.
    carrier_controls: Mapping[str, CarrierControl]
    #: This worker's liveness key, and whether a relay's worker is still alive (app/calls/workers.py).
    workers: WorkerLiveness


def init_services(app: Flask, settings: Settings, controls: Mapping[str, CarrierControl],
                  other_legs: Mapping[str, CarrierControl] | None = None) -> Services:
    """Build the services for ``app`` (``controls``: each carrier's call control by name; ``other_legs``: the
    control of legs that are not a carrier's, e.g. browser agents, which the lifecycle may hang up too) and store
    them on ``app.extensions``."""
    leg_controls = {**controls, **(other_legs or {})}
    # Standalone, TLS, Cluster or Sentinel, as REDIS_URL says (validated with the settings).
    client = connect_redis(settings)
    keys = RedisKeys(settings.redis_namespace)
    kallglot = KallglotClient(settings.kallglot_api_url, settings.kallglot_api_key)
    default_profile = NumberProfile(mode=settings.default_mode, source_language=settings.default_source_language,
                                    target_language=settings.default_target_language)
    built = Services(
        settings=settings, redis=client, keys=keys, kallglot=kallglot,
        profiles=ProfileStore(client, keys, default_profile, carriers=tuple(controls),
                              destination_problem=DestinationRules.of(settings.destination_countries).problem),
        lifecycle=SessionLifecycle(client, keys, kallglot,
                                   heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds,
                                   hang_up=lambda carrier, call_id: leg_controls[carrier].hang_up(call_id)),
        carrier_controls=controls,
        relay_tokens=RelayTokenSealer(settings.secret_key),
        relay_guard=RelayGuard(client, keys, lease_seconds=settings.heartbeat_timeout_seconds),
        workers=WorkerLiveness(client, keys),
    )
    app.extensions[EXTENSION_KEY] = built
    return built


def connect_redis(settings: Settings, timeout_seconds: float = REDIS_TIMEOUT_SECONDS) -> redis.Redis:
    """The Redis client ``settings`` describe (:mod:`app.redis_connection`), ``REDIS_MAX_CONNECTIONS`` per
    worker (per node on a cluster)."""
    target = parse_redis_target(settings.redis_url, cluster=settings.redis_cluster)
    return connect(target, max_connections=settings.redis_max_connections, timeout_seconds=timeout_seconds,
                   tls_verify=settings.redis_tls_verify, tls_ca=settings.redis_tls_ca)


def services() -> Services:
    """The current app's services (inside a request, a WebSocket handler or a CLI command)."""
    return current_app.extensions[EXTENSION_KEY]


def init_sock(app: Flask, layer: str = "simple-websocket") -> None:
    """Attach flask-sock to ``app`` with limits that suit carrier media sockets, on the ``WEBSOCKET_LAYER``."""
    # Carrier frames are small (a 20 ms frame is ~300 B of JSON); refuse anything absurd.
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"max_message_size": 256 * 1024})
    app.config.setdefault("SOCK_SERVER_CLASS", LAYERS[layer])
    sock.init_app(app)
