"""Settings read from the environment, validated once at start-up.

The variable names are the product's public interface (README documents each one); keep them exactly.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from app.redis_connection import redis_target_problems

KALLGLOT_MODES = ("bidirectional_translation", "assistive_translation", "ai_agent", "help_chat_voice")
DEFAULT_KALLGLOT_API_URL = "https://api.kallglot.com/v1"
DEFAULT_TWILIO_API_URL = "https://api.twilio.com"
DEFAULT_TELNYX_API_URL = "https://api.telnyx.com/v2"
#: Kallglot keeps a disconnected session re-attachable for at most 5 minutes (Kallglot's sessions-vs-calls guide).
MAX_RECONNECT_WINDOW_SECONDS = 300
#: Uplink chunk bounds: Kallglot asks for a chunk every 100–200 ms; 20 ms is one carrier frame.
MIN_CHUNK_MS, MAX_CHUNK_MS = 20, 200
#: Longest quiet time before a half-full uplink batch is sent; beyond a chunk's length it would only add delay.
MAX_QUIET_FLUSH_MS = 200
#: The WebSocket layer under the media routes (app/websocket.py): flask-sock's simple-websocket, or websockets'
#: sans-I/O protocol read in the handler's greenlet.
WEBSOCKET_LAYERS = ("simple-websocket", "sansio")
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
#: The admin password is the only thing between the internet and the admin UI: refuse short ones at start-up.
MIN_ADMIN_PASSWORD_LENGTH = 12
#: More proxies than this in front of one service is a misconfiguration, not a deployment.
MAX_TRUSTED_PROXY_HOPS = 5

# The demo token the simulator signs with when neither side was given a real Twilio auth token.
DEMO_TWILIO_AUTH_TOKEN = "demo-twilio-auth-token"
DEMO_SECRET_KEY = "demo-secret-key-not-for-production"
#: Values published in this repository: fine for the demo, a hole anywhere else (anyone could mint relay tokens
#: or sign Twilio webhooks with them).
PUBLISHED_DEMO_SECRETS = {"secret_key": DEMO_SECRET_KEY, "twilio_auth_token": DEMO_TWILIO_AUTH_TOKEN}
#: Request bodies (webhooks, the call API, admin forms and imports) are refused above this size, chunked ones too.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
ISO_COUNTRY = re.compile(r"^[A-Z]{2}$")
#: Kallglot's SIP domain (its SIP guide); ``sip`` numbers dial ``sip:{session_id}@{KALLGLOT_SIP_DOMAIN}``.
DEFAULT_KALLGLOT_SIP_DOMAIN = "sip.kallglot.com"
#: A host name, optionally with a port: what may follow the ``@`` of a SIP URI we put in TwiML/TeXML.
SIP_DOMAIN = re.compile(r"^(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:\d{1,5})?$")


class ConfigError(RuntimeError):
    """Raised at start-up with every configuration problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with. Built by :meth:`from_env` or from a test's mapping."""

    kallglot_api_url: str = DEFAULT_KALLGLOT_API_URL
    kallglot_api_key: str = ""
    kallglot_webhook_secret: str = ""
    #: The SIP domain ``sip`` numbers dial (README "Transports"); the demo points it at the emulator's.
    kallglot_sip_domain: str = DEFAULT_KALLGLOT_SIP_DOMAIN
    redis_url: str = ""
    public_url: str = ""
    secret_key: str = ""
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    telnyx_api_key: str = ""
    telnyx_public_key: str = ""
    #: The Call Control application id outbound Telnyx legs (agent, callbacks) are dialled through.
    telnyx_connection_id: str = ""
    admin_password: str = ""
    #: Proxies in front of the service whose ``X-Forwarded-For`` entry is trusted (0: the socket peer is the
    #: client; Heroku's and Render's routers are 1). More than the real count lets clients pick their address.
    trusted_proxy_hops: int = 0
    #: Bearer token of the outbound-call API (``POST /api/calls``); the API is off without one.
    api_token: str = ""
    #: REST base URLs of the carriers (the admin's "connect a number" calls them); tests point them at fakes.
    twilio_api_url: str = DEFAULT_TWILIO_API_URL
    telnyx_api_url: str = DEFAULT_TELNYX_API_URL
    default_mode: str = "bidirectional_translation"
    default_source_language: str = ""
    default_target_language: str = ""
    reconnect_window_seconds: int = MAX_RECONNECT_WINDOW_SECONDS
    #: Milliseconds of caller audio batched into one Kallglot ``audio.input`` (README, Configuration).
    uplink_chunk_ms: int = 100
    #: Milliseconds without a carrier frame after which a half-full batch is sent (0: wait for the next frame).
    uplink_quiet_flush_ms: int = 40
    #: ``simple-websocket`` or ``sansio`` (README, Capacity).
    websocket_layer: str = "sansio"
    #: A leg whose relay has not beaten its heartbeat for this long is treated as lost (worker died).
    heartbeat_timeout_seconds: int = 15
    #: A browser agent who took a call must open its media socket within this long, else the call is offered again.
    agent_socket_open_seconds: int = 15
    redis_namespace: str = "kb"
    #: Waits (ms, comma-separated) between attempts to reopen a dropped Kallglot stream; tests shorten them.
    kallglot_reconnect_backoff_ms: str = "200,500,1000,2000,4000"
    #: How often the relay sends Kallglot's application-level ``ping`` on a quiet stream.
    kallglot_ping_interval_seconds: int = 20
    #: Heroku Redis serves ``rediss://`` with a self-signed certificate, so verification is opt-in.
    redis_tls_verify: bool = False
    #: A CA bundle (PEM file) to verify a ``rediss://`` server against (a managed service's private CA);
    #: setting it turns verification on.
    redis_tls_ca: str = ""
    #: ``REDIS_URL`` names seed nodes of a Redis Cluster (comma-separated host:port allowed).
    redis_cluster: bool = False
    #: Largest request body accepted (bytes); Werkzeug enforces it on chunked bodies as well.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Redis connections per worker process; a flood waits for a free one instead of opening more.
    redis_max_connections: int = 50
    #: Bearer token ``/metrics`` requires (empty: open, for a scraper on a private network or port).
    metrics_token: str = ""
    #: ISO country codes outbound calls (``POST /api/calls``, agent legs) may reach, comma-separated.
    allowed_destination_countries: str = "US,CA"
    #: Outbound calls one API token may start per minute, and may have live at once.
    api_calls_per_minute: int = 10
    api_max_concurrent_calls: int = 20
    #: Milliseconds the live-event writer waits after an event for others to share its Redis pipeline
    #: (README, Supervisor console); 0 writes each at once, at more relay CPU.
    live_events_linger_ms: int = 40
    #: Forward Kallglot's transcript lines to the live console (README, Supervisor console). Off: the relay still
    #: receives and parses them (Kallglot sends them on the stream regardless) but keeps no transcript in Redis;
    #: leg changes and relay health are still forwarded. Also the load benchmark's "not forwarded" arm.
    live_transcripts: bool = True
    #: Set by the demo launcher: the emulator and demo secrets are in use, and the log says so loudly.
    demo_mode: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``); variable names are the field names upper-cased."""
        env = os.environ if environ is None else environ
        return cls.from_mapping({f.name: env[f.name.upper()] for f in fields(cls) if f.name.upper() in env})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping whose keys are field names (any case); unknown keys are ignored."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        problems: list[str] = []
        for key, raw in values.items():
            name = key.lower()
            if name not in known:
                continue
            if known[name].type in ("int", int):
                try:
                    kwargs[name] = int(raw)
                except (TypeError, ValueError):
                    problems.append(f"{name.upper()} must be a whole number, got {raw!r}")
            elif known[name].type in ("bool", bool):
                kwargs[name] = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
            else:
                kwargs[name] = str(raw).strip()
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    def problems(self) -> list[str]:
        """Every reason this configuration cannot serve real calls, one clear sentence each."""
        found: list[str] = []
        if not self.kallglot_api_key:
            found.append("KALLGLOT_API_KEY is not set (use an sk_live_ or sk_test_ key from the Kallglot portal)")
        for name in ("kallglot_api_url", "public_url"):
            value = getattr(self, name)
            parts = urlsplit(value)
            if not value:
                found.append(f"{name.upper()} is not set (the public https:// base URL carriers reach this service at)")
            elif parts.scheme not in ("http", "https") or not parts.netloc:
                found.append(f"{name.upper()} must be an http(s) URL, got {value!r}")
        if not SIP_DOMAIN.match(self.kallglot_sip_domain):
            found.append(f"KALLGLOT_SIP_DOMAIN must be a host name like sip.kallglot.com, got {self.kallglot_sip_domain!r}")
        if not self.redis_url:
            found.append("REDIS_URL is not set (e.g. redis://localhost:6379/0)")
        found += redis_target_problems(self.redis_url, cluster=self.redis_cluster, tls_ca=self.redis_tls_ca)
        if not self.secret_key or len(self.secret_key) < 16:
            found.append("SECRET_KEY must be set to a random string of at least 16 characters")
        if self.default_mode not in KALLGLOT_MODES:
            found.append(f"DEFAULT_MODE must be one of {', '.join(KALLGLOT_MODES)}, got {self.default_mode!r}")
        for name in ("default_source_language", "default_target_language"):
            value = getattr(self, name)
            if value and not LANGUAGE_CODE.match(value):
                found.append(f"{name.upper()} must be a language code like 'en' or 'es', got {value!r}")
        if not 0 <= self.live_events_linger_ms <= 500:
            found.append("LIVE_EVENTS_LINGER_MS must be between 0 and 500 (the live console shows lines within 1 s), "
                         f"got {self.live_events_linger_ms}")
        if not 0 <= self.reconnect_window_seconds <= MAX_RECONNECT_WINDOW_SECONDS:
            found.append(
                f"RECONNECT_WINDOW_SECONDS must be between 0 and {MAX_RECONNECT_WINDOW_SECONDS} "
                f"(Kallglot's own limit), got {self.reconnect_window_seconds}"
            )
        if not MIN_CHUNK_MS <= self.uplink_chunk_ms <= MAX_CHUNK_MS or self.uplink_chunk_ms % 20:
            found.append(
                f"UPLINK_CHUNK_MS must be a multiple of 20 between {MIN_CHUNK_MS} and {MAX_CHUNK_MS}, "
                f"got {self.uplink_chunk_ms}"
            )
        if not 0 <= self.uplink_quiet_flush_ms <= MAX_QUIET_FLUSH_MS:
            found.append(f"UPLINK_QUIET_FLUSH_MS must be between 0 (off) and {MAX_QUIET_FLUSH_MS}, "
                         f"got {self.uplink_quiet_flush_ms}")
        if self.websocket_layer not in WEBSOCKET_LAYERS:
            found.append(f"WEBSOCKET_LAYER must be one of {', '.join(WEBSOCKET_LAYERS)}, got {self.websocket_layer!r}")
        if not 3 <= self.heartbeat_timeout_seconds <= 120:
            found.append(f"HEARTBEAT_TIMEOUT_SECONDS must be between 3 and 120, got {self.heartbeat_timeout_seconds}")
        if not 3 <= self.agent_socket_open_seconds <= 120:
            found.append(f"AGENT_SOCKET_OPEN_SECONDS must be between 3 and 120, got {self.agent_socket_open_seconds}")
        try:
            backoff = self.kallglot_reconnect_backoff_seconds
            if not backoff or any(not 0 < wait <= 60 for wait in backoff):
                raise ValueError
        except ValueError:
            found.append("KALLGLOT_RECONNECT_BACKOFF_MS must be a comma-separated list of waits between 1 and 60000 "
                         f"milliseconds, got {self.kallglot_reconnect_backoff_ms!r}")
        if not 1 <= self.kallglot_ping_interval_seconds <= 300:
            found.append("KALLGLOT_PING_INTERVAL_SECONDS must be between 1 and 300, "
                         f"got {self.kallglot_ping_interval_seconds}")
        if not self.demo_mode:
            for name, value in PUBLISHED_DEMO_SECRETS.items():
                if getattr(self, name) == value:
                    found.append(f"{name.upper()} is the published demo value: set a secret of your own "
                                 "(or run the demo launcher, which sets DEMO_MODE)")
        if not 64 * 1024 <= self.max_body_bytes <= 64 * 1024 * 1024:
            found.append(f"MAX_BODY_BYTES must be between 65536 and 67108864, got {self.max_body_bytes}")
        if not 5 <= self.redis_max_connections <= 10_000:
            found.append(f"REDIS_MAX_CONNECTIONS must be between 5 and 10000, got {self.redis_max_connections}")
        bad_countries = [c for c in self.destination_countries if not ISO_COUNTRY.match(c)]
        if bad_countries:
            found.append("ALLOWED_DESTINATION_COUNTRIES must be ISO country codes like US,GB, "
                         f"got {', '.join(bad_countries)}")
        if self.api_calls_per_minute < 1 or self.api_max_concurrent_calls < 1:
            found.append("API_CALLS_PER_MINUTE and API_MAX_CONCURRENT_CALLS must be at least 1")
        if self.admin_password and len(self.admin_password) < MIN_ADMIN_PASSWORD_LENGTH:
            found.append(f"ADMIN_PASSWORD must be at least {MIN_ADMIN_PASSWORD_LENGTH} characters "
                         f"(got {len(self.admin_password)}); unset it to disable the admin UI")
        if not 0 <= self.trusted_proxy_hops <= MAX_TRUSTED_PROXY_HOPS:
            found.append(f"TRUSTED_PROXY_HOPS must be between 0 (nothing in front) and {MAX_TRUSTED_PROXY_HOPS}, "
                         f"got {self.trusted_proxy_hops}")
        if not self.twilio_auth_token and not self.telnyx_public_key:
            found.append("neither TWILIO_AUTH_TOKEN nor TELNYX_PUBLIC_KEY is set: no carrier webhook could be verified")
        return found

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every problem, or return quietly."""
        found = self.problems()
        if found:
            raise ConfigError(found)

    @property
    def kallglot_reconnect_backoff_seconds(self) -> tuple[float, ...]:
        """``KALLGLOT_RECONNECT_BACKOFF_MS`` in seconds; raises ``ValueError`` if it is not a list of numbers."""
        return tuple(int(part) / 1000 for part in self.kallglot_reconnect_backoff_ms.split(",") if part.strip())

    @property
    def destination_countries(self) -> frozenset[str]:
        """``ALLOWED_DESTINATION_COUNTRIES`` as a set of upper-case ISO codes."""
        return frozenset(c.strip().upper() for c in self.allowed_destination_countries.split(",") if c.strip())

    @property
    def public_ws_url(self) -> str:
        """``PUBLIC_URL`` with its scheme swapped to the WebSocket one (http→ws, https→wss), no trailing slash."""
        base = self.public_url.rstrip("/")
        if base.startswith("https://"):
            return "wss://" + base[len("https://"):]
        if base.startswith("http://"):
            return "ws://" + base[len("http://"):]
        return base

    def public(self, path: str) -> str:
        """Absolute public http(s) URL for ``path`` (which starts with ``/``)."""
        return self.public_url.rstrip("/") + path

    def public_ws(self, path: str) -> str:
        """Absolute public ws(s) URL for ``path`` (which starts with ``/``)."""
        return self.public_ws_url + path
