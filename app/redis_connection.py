"""Which Redis the service talks to, read from ``REDIS_URL`` (+ ``REDIS_CLUSTER``, ``REDIS_TLS_*``,
``REDIS_MAX_CONNECTIONS``), and the client for it — redis-py's own classes for each deployment:

==============================================================  ==============================================
``REDIS_URL``                                                   client
==============================================================  ==============================================
``redis://[user:pass@]host:port[/db]``                          ``redis.Redis`` on a bounded, blocking pool
``rediss://…`` (TLS; managed Redis)                             the same over TLS (``REDIS_TLS_VERIFY``,
                                                                ``REDIS_TLS_CA`` for a private CA)
``redis[s]://[user:pass@]h1:p1[,h2:p2…]`` + ``REDIS_CLUSTER=true`` ``redis.cluster.RedisCluster`` (seed nodes;
                                                                it discovers the rest and follows failovers)
``redis+sentinel://[user:pass@]h1:p1[,h2:p2…]/service[/db]``     ``redis.sentinel.Sentinel(...).master_for``
``rediss+sentinel://…`` (TLS to the Sentinels and the master)    the same over TLS (``REDIS_TLS_*`` as above)
==============================================================  ==============================================

A malformed value is a configuration problem listed at start-up (:func:`redis_target_problems`, called from
:meth:`app.config.Settings.problems`), never a ``ValueError`` from deep inside the client. Every key layout the
service uses works on all three (see :mod:`app.redis_keys`: one hash slot per script and transaction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit


STANDALONE, CLUSTER, SENTINEL = "standalone", "cluster", "sentinel"
_SCHEMES = {"redis": False, "rediss": True}
#: Sentinel URL schemes → TLS: ``rediss+sentinel`` speaks TLS to the Sentinels and to the master they name
#: (a TLS-only Sentinel deployment: Redis' ``tls-port`` + ``tls-replication yes`` on servers and Sentinels).
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


class RedisUrlError(ValueError):
    """``REDIS_URL`` (with ``REDIS_CLUSTER``) does not describe a Redis deployment; the message says why."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``REDIS_URL``: what kind of deployment, where, and how to authenticate (never logged)."""

    kind: str
    #: Standalone: the one server; cluster: seed nodes; Sentinel: the sentinels.
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    db: int = 0
    #: Sentinel's name for the monitored master.
    service: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Where, without credentials (for logs and errors)."""
        where = ",".join(f"{host}:{port}" for host, port in self.nodes)
        return f"{self.kind} {where}" + (f" service {self.service}" if self.service else "") + (
            " (TLS)" if self.tls else "")


def _nodes(hosts: str, shown: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for part in hosts.split(","):
        part = part.strip()
        if part.endswith("]") or ":" not in part:  # no port: Redis' default
            host, port = part, "6379"
        else:
            host, _, port = part.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisUrlError(f"REDIS_URL has a malformed host:port {part!r} in {shown}")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{hosts}"


def parse_redis_target(url: str, *, cluster: bool = False) -> RedisTarget:
    """Parse ``REDIS_URL``; raises :class:`RedisUrlError` with a sentence naming what is wrong."""
    shown = _redacted(url)
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or (scheme not in _SCHEMES and scheme not in _SENTINEL_SCHEMES):
        raise RedisUrlError(f"REDIS_URL must start with redis://, rediss://, redis+sentinel:// or "
                            f"rediss+sentinel://, got {shown}")
    userinfo, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:  # redis://secret@host: the one part is the password (Redis' AUTH without a user)
            username, password = None, unquote(user) or None
    hosts, _, path = location.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise RedisUrlError(f"REDIS_URL takes no query options here (use the REDIS_* settings), got {shown}")
    if not hosts:
        raise RedisUrlError(f"REDIS_URL names no host, got {shown}")
    nodes = _nodes(hosts, shown)
    segments = [unquote(s) for s in path.split("/") if s]
    if scheme in _SENTINEL_SCHEMES:
        if cluster:
            raise RedisUrlError(f"REDIS_CLUSTER=true cannot be combined with a {scheme}:// URL")
        if not segments or len(segments) > 2:
            raise RedisUrlError(f"a Sentinel REDIS_URL is {scheme}://host:port[,host:port]/service[/db], "
                                f"got {shown}")
        db = _db(segments[1] if len(segments) == 2 else "0", shown)
        return RedisTarget(SENTINEL, nodes, tls=_SENTINEL_SCHEMES[scheme], db=db, service=segments[0],
                           username=username, password=password)
    if len(segments) > 1:
        raise RedisUrlError(f"REDIS_URL's path is a database number (/0), got {shown}")
    db = _db(segments[0] if segments else "0", shown)
    tls = _SCHEMES[scheme]
    if cluster:
        if db:
            raise RedisUrlError(f"Redis Cluster has only database 0; REDIS_URL asks for /{db}: {shown}")
        return RedisTarget(CLUSTER, nodes, tls=tls, username=username, password=password)
    if len(nodes) > 1:
        raise RedisUrlError(f"REDIS_URL lists several hosts; set REDIS_CLUSTER=true for a cluster's seed nodes, "
                            f"or use redis+sentinel:// for Sentinel: {shown}")
    return RedisTarget(STANDALONE, nodes, tls=tls, db=db, username=username, password=password)


def _db(text: str, shown: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"REDIS_URL's database must be a number, got {text!r} in {shown}")
    return int(text)


def redis_target_problems(url: str, *, cluster: bool, tls_ca: str) -> list[str]:
    """Every reason ``REDIS_URL`` / ``REDIS_CLUSTER`` / ``REDIS_TLS_CA`` cannot be used, one sentence each."""
    if not url:
        return []  # reported as "not set" by Settings
    try:
        target = parse_redis_target(url, cluster=cluster)
    except RedisUrlError as exc:
        return [str(exc)]
    if tls_ca and not target.tls:
        return ["REDIS_TLS_CA is set but REDIS_URL is not rediss:// or rediss+sentinel:// (the CA is only used "
                "over TLS)"]
    return []


def _tls_options(target: RedisTarget, verify: bool, ca_file: str) -> dict[str, Any]:
    if not target.tls:
        return {}
    # Heroku Redis serves a self-signed certificate, so verification is opt-in (REDIS_TLS_VERIFY); a CA file
    # (REDIS_TLS_CA, a managed service's private CA) means "verify against this".
    options: dict[str, Any] = {"ssl_cert_reqs": "required" if verify or ca_file else "none"}
    if ca_file:
        options["ssl_ca_certs"] = ca_file
    if not (verify or ca_file):
        options["ssl_check_hostname"] = False
    return options


def connect(target: RedisTarget, *, max_connections: int, timeout_seconds: float, tls_verify: bool = False,
            tls_ca: str = "") -> Any:
    """A client for ``target`` (``redis.Redis`` or ``RedisCluster``; both answer the same commands here).

    ``max_connections`` bounds the connections per worker process (per node on a cluster); ``timeout_seconds``
    bounds connecting, each command, and waiting for a free pooled connection.
    """
    # Imported here, not at the top: app.config imports this module for its URL checks, and gunicorn's master
    # runs those checks before the gevent worker monkey-patches; importing redis there imports ssl unpatched
    # (gevent's MonkeyPatchWarning, a non-JSON line in the log, and ssl left unpatched in the workers).
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.sentinel import Sentinel

    common: dict[str, Any] = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds,
                              "username": target.username, "password": target.password}
    if target.kind == CLUSTER:
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            max_connections=max_connections, ssl=target.tls,
                            **_tls_options(target, tls_verify, tls_ca), **common)
    if target.kind == SENTINEL:
        # Over TLS both hops are encrypted and verified alike: asking a Sentinel where the master is, and the
        # master itself (SentinelConnectionPool picks its SSL connection class from ``ssl=True``).
        tls = {"ssl": True, **_tls_options(target, tls_verify, tls_ca)} if target.tls else {}
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs={"socket_timeout": timeout_seconds,
                                                                 "socket_connect_timeout": timeout_seconds, **tls},
                            **common, **tls)
        return sentinel.master_for(target.service, db=target.db, max_connections=max_connections,
                                   health_check_interval=30)
    (host, port), = target.nodes
    # A bounded, blocking pool: a flood (e.g. of /metrics scrapes) waits up to the timeout for a connection
    # instead of opening one per concurrent request until Redis' maxclients locks every worker out.
    connection_class = redis.SSLConnection if target.tls else redis.Connection
    pool = redis.BlockingConnectionPool(
        host=host, port=port, db=target.db, max_connections=max_connections, timeout=timeout_seconds,
        health_check_interval=30, connection_class=connection_class,
        **_tls_options(target, tls_verify, tls_ca), **common)
    return redis.Redis(connection_pool=pool)


def limiter_storage(target: RedisTarget, *, tls_verify: bool = False,
                    tls_ca: str = "") -> tuple[str, dict[str, Any]]:
    """Flask-Limiter's (``limits``) storage URI and options for the same deployment."""
    auth = ""
    if target.password is not None:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    hosts = ",".join(f"{host}:{port}" for host, port in target.nodes)
    options: dict[str, Any] = dict(_tls_options(target, tls_verify, tls_ca))
    if target.kind == CLUSTER:
        if target.tls:
            options["ssl"] = True
        return f"redis+cluster://{auth}{hosts}", options
    if target.kind == SENTINEL:
        # Counters read from a replica could lag behind the master: read and write the master only.
        options["use_replicas"] = False
        if target.tls:  # TLS to the Sentinels (sentinel_kwargs) and to the master (the other options)
            tls = {"ssl": True, **_tls_options(target, tls_verify, tls_ca)}
            options.update(tls, sentinel_kwargs=tls)
        return f"redis+sentinel://{auth}{hosts}/{quote(target.service, safe='')}", options
    scheme = "rediss" if target.tls else "redis"
    return f"{scheme}://{auth}{hosts}/{target.db}", options
