"""Real Redis deployments on loopback for the test-suite and the chaos run: a Redis Cluster (masters with
replicas, built by ``redis-cli --cluster create``), a master + replica watched by Sentinels, and a TLS server.

Each yields a :class:`RedisDeployment`: the bridge's environment for it (``REDIS_URL``, ``REDIS_CLUSTER``…),
a client for the test's own reads, and the node processes, so a test can kill the master holding a key's slot
(or the Sentinel master) mid-call and watch the failover.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis as redis_lib
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from app.devtools.localstack import port_is_free, run_redis

#: Cluster nodes give up on a silent master after this long; a replica is promoted shortly after.
CLUSTER_NODE_TIMEOUT_MS = 1500
#: Sentinels call a master down after this long without an answer, then fail over.
SENTINEL_DOWN_AFTER_MS = 1500
SENTINEL_SERVICE = "kbmaster"


@dataclass
class RedisNode:
    """One redis-server (or redis-sentinel) process on a loopback port."""

    port: int
    process: subprocess.Popen
    workdir: Path

    def kill(self) -> None:
        """SIGKILL: the node vanishes as a crashed host would, without a goodbye to its peers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None


@dataclass
class RedisDeployment:
    """A running deployment: how the bridge reaches it, and its processes."""

    kind: str
    env: dict[str, str]
    nodes: list[RedisNode]
    sentinels: list[RedisNode] = field(default_factory=list)
    #: A fresh client on the deployment (RedisCluster / Sentinel master / plain), for the test's own reads.
    client_factory: Callable[[], Any] | None = None
    #: redis-py's TLS options for a node of a TLS deployment (empty: plain TCP).
    tls: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` the bridge is given."""
        return self.env["REDIS_URL"]

    def client(self, **options: Any) -> Any:
        """A client on the deployment (follows failovers like the bridge's own); ``options`` such as
        ``decode_responses=True`` go to it."""
        assert self.client_factory is not None
        return self.client_factory(**options)

    def node_on(self, port: int) -> RedisNode:
        """The node listening on ``port``."""
        return next(node for node in self.nodes if node.port == port)


@contextlib.contextmanager
def run_redis_deployment(kind: str) -> Iterator[RedisDeployment]:
    """``standalone`` (a private redis-server, or ``REDIS_URL``), ``cluster`` or ``sentinel``."""
    if kind == "cluster":
        with run_redis_cluster() as deployment:
            yield deployment
    elif kind == "sentinel":
        with run_redis_sentinel() as deployment:
            yield deployment
    elif kind == "standalone":
        with run_redis() as url:
            yield RedisDeployment("standalone", {"REDIS_URL": url}, [],
                                  client_factory=lambda **options: redis_lib.Redis.from_url(url, **options))
    else:
        raise ValueError(f"unknown Redis deployment {kind!r}: standalone, cluster or sentinel")


def _pair_ports(count: int, offset: int = 10000) -> list[int]:
    """``count`` ports P whose P+``offset`` (a cluster node's bus port) is free too, all below 55536."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20000, 45000)
        if port not in ports and port_is_free(port) and port_is_free(port + offset):
            ports.append(port)
    return ports


def _free_ports(count: int) -> list[int]:
    return _pair_ports(count, offset=0)


def _start(binary: str, args: list[str], port: int, workdir: Path) -> RedisNode:
    proc = subprocess.Popen([binary, *args], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return RedisNode(port, proc, workdir)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{binary} on port {port} did not start") from None
            time.sleep(0.05)


def _server_args(port: int) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def _stop(nodes: list[RedisNode]) -> None:
    for node in nodes:
        if node.process.poll() is None:
            node.process.terminate()
    for node in nodes:
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=5)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (Debian: apt-get install redis-server redis-sentinel)")
    return found


def _tls_server_args(port: int, tls: tuple[Path, Path, Path]) -> list[str]:
    """A redis-server speaking TLS only (clients, and replication: ``tls-replication``), no client certificate."""
    cert, key, ca = tls
    return ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no", "--tls-replication", "yes"]


@contextlib.contextmanager
def run_redis_cluster(masters: int = 3, replicas_per_master: int = 1, tls: tuple[Path, Path, Path] | None = None
                      ) -> Iterator[RedisDeployment]:
    """A Redis Cluster of ``masters`` masters (each with ``replicas_per_master`` replicas) on loopback. With
    ``tls`` (the certificate, key and CA files), clients, replication and the cluster bus speak TLS only, as a
    managed cluster with in-transit encryption does: ``rediss://`` seeds + ``REDIS_CLUSTER=true``."""
    server, cli = _binary("redis-server"), _binary("redis-cli")
    workdir = Path(tempfile.mkdtemp(prefix="kb-redis-cluster-"))
    ports = _pair_ports(masters * (1 + replicas_per_master))
    nodes: list[RedisNode] = []
    client_tls: dict[str, Any] = {}
    args: Callable[[int], list[str]] = _server_args
    cli_tls: list[str] = []
    if tls is not None:
        client_tls = {"ssl": True, "ssl_ca_certs": str(tls[2]), "ssl_cert_reqs": "required"}
        args = partial(_tls_server_args, tls=tls)
        cli_tls = ["--tls", "--cacert", str(tls[2])]
    try:
        for port in ports:
            nodes.append(_start(server, [*args(port), "--cluster-enabled", "yes",
                                         "--cluster-config-file", f"nodes-{port}.conf",
                                         "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                                         *(["--tls-cluster", "yes"] if tls else [])], port, workdir))
        subprocess.run([cli, *cli_tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", str(replicas_per_master), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)

        def cluster_ok() -> bool:
            for port in ports:
                node = redis_lib.Redis(host="127.0.0.1", port=port, socket_timeout=2, **client_tls)
                if node.cluster("INFO").get("cluster_state") != "ok":
                    return False
            return True

        _wait(cluster_ok, 60, "cluster_state:ok on every node")
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports[:masters])
        env = {"REDIS_URL": f"{'rediss' if tls else 'redis'}://{seeds}", "REDIS_CLUSTER": "true"}
        if tls is not None:
            env["REDIS_TLS_CA"] = str(tls[2])
        deployment = RedisDeployment(
            "cluster", env, nodes, tls=client_tls,
            client_factory=lambda **options: RedisCluster(
                startup_nodes=[ClusterNode("127.0.0.1", p) for p in ports], socket_timeout=5,
                **client_tls, **options))
        # Replicas must know their master's data before a test kills it: wait until each is in sync.
        _wait(lambda: all(_replica_in_sync(port, **client_tls) for port in ports), 60, "replicas in sync")
        yield deployment
    finally:
        _stop(nodes)
        shutil.rmtree(workdir, ignore_errors=True)


def _replica_in_sync(port: int, **tls: Any) -> bool:
    info = redis_lib.Redis(host="127.0.0.1", port=port, socket_timeout=2, **tls).info("replication")
    return info.get("role") != "slave" or info.get("master_link_status") == "up"


def master_port_for_key(deployment: RedisDeployment, key: str) -> int:
    """The port of the cluster master serving ``key``'s slot now."""
    slot = redis_lib.crc.key_slot(key.encode())
    for node in deployment.nodes:
        if not node.alive:
            continue
        for start, end, *holders in redis_lib.Redis(host="127.0.0.1", port=node.port, socket_timeout=2,
                                                    **deployment.tls).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(holders[0][1])
    raise RuntimeError(f"no live node serves slot {slot}")


@contextlib.contextmanager
def run_redis_sentinel(sentinels: int = 3, tls: tuple[Path, Path, Path] | None = None
                       ) -> Iterator[RedisDeployment]:
    """A master and one replica, watched by ``sentinels`` Sentinels (quorum: a majority). With ``tls`` (the
    certificate, key and CA files), every server and Sentinel speaks TLS only: ``rediss+sentinel://``."""
    server, sentinel_binary = _binary("redis-server"), _binary("redis-sentinel")
    workdir = Path(tempfile.mkdtemp(prefix="kb-redis-sentinel-"))
    master_port, replica_port, *sentinel_ports = _free_ports(2 + sentinels)
    nodes: list[RedisNode] = []
    watchers: list[RedisNode] = []
    # The test's own clients: TLS verified against the deployment's CA, like the bridge with REDIS_TLS_CA.
    client_tls: dict[str, Any] = {}
    args: Callable[[int], list[str]] = _server_args
    if tls is not None:
        client_tls = {"ssl": True, "ssl_ca_certs": str(tls[2]), "ssl_cert_reqs": "required"}
        args = partial(_tls_server_args, tls=tls)
    try:
        nodes.append(_start(server, args(master_port), master_port, workdir))
        nodes.append(_start(server, [*args(replica_port), "--replicaof", "127.0.0.1", str(master_port)],
                            replica_port, workdir))
        _wait(lambda: _replica_in_sync(replica_port, **client_tls), 30, "the replica in sync")
        listen = "port {port}\n"
        if tls is not None:  # TLS only, to clients and (tls-replication) to the servers and other Sentinels
            listen = (f"port 0\ntls-port {{port}}\ntls-cert-file {tls[0]}\ntls-key-file {tls[1]}\n"
                      f"tls-ca-cert-file {tls[2]}\ntls-auth-clients no\ntls-replication yes\n")
        for port in sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(
                listen.format(port=port) + f"bind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} {sentinels // 2 + 1}\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} 10000\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n")
            watchers.append(_start(sentinel_binary, [str(conf)], port, workdir))
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinel_ports)
        sentinel_nodes = [("127.0.0.1", p) for p in sentinel_ports]

        def sentinels_see_replica() -> bool:
            return all(redis_lib.Redis(host="127.0.0.1", port=p, socket_timeout=2,
                                       **client_tls).sentinel_slaves(SENTINEL_SERVICE) for p in sentinel_ports)

        _wait(sentinels_see_replica, 30, "every Sentinel to know the replica")
        env = {"REDIS_URL": f"rediss+sentinel://{hosts}/{SENTINEL_SERVICE}", "REDIS_TLS_CA": str(tls[2])} if tls \
            else {"REDIS_URL": f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}"}
        yield RedisDeployment(
            "sentinel", env, nodes, watchers, tls=client_tls,
            client_factory=lambda **options: Sentinel(
                sentinel_nodes, socket_timeout=5, sentinel_kwargs={"socket_timeout": 5, **client_tls},
                **client_tls).master_for(SENTINEL_SERVICE, **options))
    finally:
        _stop(watchers + nodes)
        shutil.rmtree(workdir, ignore_errors=True)


def sentinel_master_port(deployment: RedisDeployment) -> int:
    """The port the Sentinels currently name as master."""
    for watcher in deployment.sentinels:
        if watcher.alive:
            _, port = redis_lib.Redis(host="127.0.0.1", port=watcher.port, socket_timeout=2,
                                      **deployment.tls).sentinel_get_master_addr_by_name(
                SENTINEL_SERVICE)
            return int(port)
    raise RuntimeError("no Sentinel is running")


@contextlib.contextmanager
def run_redis_tls(cert_file: Path, key_file: Path, ca_file: Path) -> Iterator[RedisDeployment]:
    """A redis-server serving only TLS (``rediss://``) with the given certificate; clients need not present one."""
    server = _binary("redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="kb-redis-tls-"))
    port, = _free_ports(1)
    nodes: list[RedisNode] = []
    try:
        nodes.append(_start(server, ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--tls-cert-file", str(cert_file),
                                     "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
                                     "--tls-auth-clients", "no"], port, workdir))
        yield RedisDeployment(
            "tls", {"REDIS_URL": f"rediss://127.0.0.1:{port}/0", "REDIS_TLS_CA": str(ca_file)}, nodes,
            client_factory=lambda **options: redis_lib.Redis(
                host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca_file), ssl_cert_reqs="required",
                socket_timeout=5, **options))
    finally:
        _stop(nodes)
        shutil.rmtree(workdir, ignore_errors=True)
