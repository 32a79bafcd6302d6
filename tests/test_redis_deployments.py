"""The bridge on the Redis deployments people run: a Redis Cluster (3 masters, each with a replica), a master +
replica under Sentinel, and a TLS server with a private CA — real servers started here on loopback ports.

Whole calls run end to end on each (gunicorn + gevent bridge, the Twilio simulator, the Kallglot emulator), and
a master is killed mid-call: audio keeps flowing, the session ends exactly once, nothing is left behind.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from app import create_app
from app.admin.throttle import MAX_FAILURES_PER_CLIENT
from app.calls import usage
from app.calls.agent_queue import AgentQueue
from app.calls.leg_spec import LegSpec
from app.calls.states import EndOutcome
from app.config import ConfigError, Settings
from app.devtools.redis_topologies import (
    RedisDeployment, master_port_for_key, run_redis_cluster, run_redis_sentinel, run_redis_tls,
    sentinel_master_port,
)
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from app.extensions import services
from app.profiles import NumberProfile
from app.redis_connection import CLUSTER, SENTINEL, STANDALONE, limiter_storage, parse_redis_target
from app.redis_keys import RedisKeys
from tests.support.admin import admin_sign_in
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import (
    ADMIN_PASSWORD, E2E_GRACEFUL_TIMEOUT_SECONDS, PUBLIC_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config, e2e_bridge_env,
)
from tests.support.waiting import only_session, wait_until

FRAME = 160  # 20 ms of μ-law
#: Longer than a failover here (1.5 s node timeout + election): the leg is not given up while Redis moves.
FAILOVER_HEARTBEAT_TIMEOUT_SECONDS = 12


# -- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, cluster, kind, nodes, db, service", [
    ("redis://localhost:6379/2", False, STANDALONE, (("localhost", 6379),), 2, ""),
    ("rediss://:secret@cache.example.com:6380", False, STANDALONE, (("cache.example.com", 6380),), 0, ""),
    ("redis://10.0.0.1:7000,10.0.0.2:7000", True, CLUSTER, (("10.0.0.1", 7000), ("10.0.0.2", 7000)), 0, ""),
    ("redis+sentinel://s1:26379,s2:26380/mymaster/3", False, SENTINEL, (("s1", 26379), ("s2", 26380)), 3,
     "mymaster"),
])
def test_each_deployment_is_read_from_redis_url(url: str, cluster: bool, kind: str, nodes: tuple, db: int,
                                                service: str) -> None:
    target = parse_redis_target(url, cluster=cluster)
    assert (target.kind, target.nodes, target.db, target.service) == (kind, nodes, db, service)
    assert "secret" not in repr(target) and "secret" not in target.describe()


@pytest.mark.parametrize("env, says", [
    ({"REDIS_URL": "redis+sentinel://s1:26379"}, "redis+sentinel://host:port[,host:port]/service[/db]"),
    ({"REDIS_URL": "redis+sentinel://s1:26379/a/b/c"}, "redis+sentinel://host:port[,host:port]/service[/db]"),
    ({"REDIS_URL": "redis+sentinel://s1:26379/svc/x"}, "database must be a number"),
    ({"REDIS_URL": "rediss+sentinel://s1:26379"}, "rediss+sentinel://host:port[,host:port]/service[/db]"),
    ({"REDIS_URL": "rediss+sentinel://s:1/m", "REDIS_CLUSTER": "true"}, "cannot be combined"),
    ({"REDIS_URL": "redis+sentinel://s:1/m", "REDIS_TLS_CA": "/ca.pem"}, "REDIS_TLS_CA is set but REDIS_URL is not"),
    ({"REDIS_URL": "redis://a:1,b:2"}, "set REDIS_CLUSTER=true"),
    ({"REDIS_URL": "redis://a:1/3", "REDIS_CLUSTER": "true"}, "only database 0"),
    ({"REDIS_URL": "redis+sentinel://s:1/m", "REDIS_CLUSTER": "true"}, "cannot be combined"),
    ({"REDIS_URL": "memcached://x:1"}, "must start with redis://"),
    ({"REDIS_URL": "redis://host:notaport"}, "malformed host:port"),
    ({"REDIS_URL": "redis://:pw@host:70000"}, "malformed host:port"),
    ({"REDIS_URL": "redis://h:1/0?ssl_cert_reqs=none"}, "takes no query options"),
    ({"REDIS_URL": "redis://h:1", "REDIS_TLS_CA": "/ca.pem"}, "REDIS_TLS_CA is set but REDIS_URL is not rediss://"),
])
def test_a_malformed_redis_setting_is_a_clear_configuration_error(env: dict[str, str], says: str) -> None:
    config = {**bridge_config("redis://unused:1/0", "http://127.0.0.1:9/v1", "cfg", PUBLIC_URL), **env}
    with pytest.raises(ConfigError) as refused:
        create_app(config)
    assert says in str(refused.value)
    assert ":pw@" not in str(refused.value)  # credentials never end up in the message


def test_sentinel_over_tls_is_rediss_sentinel_for_the_bridge_and_its_throttle() -> None:
    target = parse_redis_target("rediss+sentinel://:pw@s1:26379,s2:26380/mymaster/1")
    assert (target.kind, target.tls, target.service, target.db) == (SENTINEL, True, "mymaster", 1)
    assert not parse_redis_target("redis+sentinel://s1:26379/mymaster").tls
    uri, options = limiter_storage(target, tls_ca="/ca.pem")
    assert uri == "redis+sentinel://:pw@s1:26379,s2:26380/mymaster"  # limits' scheme; TLS goes in the options
    tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    assert options == {**tls, "use_replicas": False, "sentinel_kwargs": tls}


def test_every_settings_reader_knows_the_new_names() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://a:1,b:2", "REDIS_CLUSTER": "true", "REDIS_TLS_CA": "",
                                  "REDIS_MAX_CONNECTIONS": "30"})
    assert settings.redis_cluster and settings.redis_max_connections == 30


# -- key layout ------------------------------------------------------------------------------------------------

def test_every_lifecycle_key_of_a_session_shares_one_slot_and_shards_spread_evenly() -> None:
    keys = RedisKeys("kb")
    session_id = "sess_" + uuid.uuid4().hex
    shard = keys.shard_of(session_id)
    slot_keys = [keys.session(session_id), keys.session_end_claim(session_id), keys.leg(session_id, "twilio", "CA1"),
                 keys.leg(session_id, "telnyx", "v3:x"), keys.deadlines(shard), keys.heartbeats(shard),
                 keys.live_sessions(shard), keys.billed_sessions(shard), keys.session_live_events(session_id),
                 keys.stream_generation(session_id, "telnyx", "v3:x")]
    assert len({redis_lib.crc.key_slot(k.encode()) for k in slot_keys}) == 1
    member = "twilio:CA1"
    assert len({redis_lib.crc.key_slot(k.encode()) for k in (
        keys.pending_creates(keys.shard_of(member)), keys.pending_create_data(keys.shard_of(member)))}) == 1
    # Each shard's slot lies in its own 1/16 of the range: three even masters get 5, 6 and 5 shards.
    owners = [redis_lib.crc.key_slot(keys.deadlines(s).encode()) * 3 // 16384 for s in keys.shards()]
    assert sorted(owners.count(m) for m in range(3)) == [5, 5, 6]


# -- whole calls on each deployment ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisDeployment]:
    with run_redis_cluster(masters=3, replicas_per_master=1) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisDeployment]:
    with run_redis_sentinel() as deployment:
        yield deployment


def _bridge(deployment: RedisDeployment, emulator_server: RunningServer, namespace: str) -> Iterator[RunningServer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**e2e_bridge_env(deployment.url, emulator_server.url + "/v1", namespace, url), **deployment.env,
           "HEARTBEAT_TIMEOUT_SECONDS": str(FAILOVER_HEARTBEAT_TIMEOUT_SECONDS)}
    with run_gunicorn("app:create_app()", env, workers=2, port=port,
                      graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server


@pytest.fixture(scope="module")
def cluster_bridge(cluster: RedisDeployment, emulator_server: RunningServer) -> Iterator[RunningServer]:
    yield from _bridge(cluster, emulator_server, "kb")


@pytest.fixture(scope="module")
def sentinel_bridge(sentinel: RedisDeployment, emulator_server: RunningServer) -> Iterator[RunningServer]:
    yield from _bridge(sentinel, emulator_server, "kb")


def _send_frames(stream: SimulatedStream, audio: bytes, first_chunk: int) -> None:
    for n in range(len(audio) // FRAME):
        assert stream.send_event("media", {"streamSid": stream.stream_sid, "media": {
            "track": "inbound", "chunk": str(first_chunk + n), "timestamp": str((first_chunk + n) * 20),
            "payload": base64.b64encode(audio[n * FRAME:(n + 1) * FRAME]).decode()}})


def _received(emulator: EmulatorControl, session_id: str) -> bytes:
    return base64.b64decode(emulator.session(session_id)["audio_received"].get("customer", ""))


def _assert_nothing_left(state: BridgeState, session_id: str, call_sid: str) -> None:
    keys = state.keys
    shard = keys.shard_of(session_id)
    assert state.settled_ended(session_id), (state.session(session_id), state.end_claim(session_id))
    assert state.redis.zscore(keys.live_sessions(shard), session_id) is None
    assert state.heartbeat_expiry("twilio", call_sid) is None
    assert state.call("twilio", call_sid)["state"] == "ended"


def _whole_call(bridge: RunningServer, deployment: RedisDeployment, emulator: EmulatorControl) -> None:
    simulator = TwilioCallSimulator(bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    audio = os.urandom(50 * FRAME)  # ten 100 ms chunks
    call_sid = "CA" + uuid.uuid4().hex
    def hear_it_all(stream: SimulatedStream) -> None:  # an event, not a clock: the echo of every chunk is back
        assert stream.wait_for(lambda s: len(s.heard) >= len(audio), timeout=30)

    result = simulator.place_call(*new_numbers(), audio, pace=False, call_sid=call_sid, hold_open=hear_it_all,
                                  listen_seconds=0.2)
    assert result.protocol_errors == [] and result.errors == []
    session = only_session(emulator)
    assert _received(emulator, session["id"]) == audio and result.heard_audio == audio
    assert requests.get(bridge.url + "/readyz", timeout=10).status_code == 200
    state = BridgeState(deployment.client(), "kb")
    assert wait_until(lambda: state.settled_ended(session["id"]))
    _assert_nothing_left(state, session["id"], call_sid)
    assert emulator.session(session["id"])["end_calls"] == 1
    # The one unsharded stream a call writes: two entries per leg (README Scaling's figure at 10 000 live calls).
    assert wait_until(lambda: _live_changes_of(state, session["id"]) == ["started", "ended"], timeout=10), \
        _live_changes_of(state, session["id"])


def _live_changes_of(state: BridgeState, session_id: str) -> list[str]:
    """The leg states one session put on the global live-changes stream, oldest first."""
    return [json.loads(fields[b"data"])["state"] for _, fields in state.redis.xrange(state.keys.live_changes())
            if fields[b"session_id"].decode() == session_id]


@pytest.mark.e2e
def test_a_whole_call_on_a_redis_cluster(cluster_bridge: RunningServer, cluster: RedisDeployment,
                                         emulator: EmulatorControl) -> None:
    _whole_call(cluster_bridge, cluster, emulator)


@pytest.mark.e2e
def test_a_whole_call_under_sentinel(sentinel_bridge: RunningServer, sentinel: RedisDeployment,
                                     emulator: EmulatorControl) -> None:
    _whole_call(sentinel_bridge, sentinel, emulator)


def _call_across_a_failover(bridge: RunningServer, deployment: RedisDeployment, emulator: EmulatorControl,
                            kill_master: Any) -> None:
    """Kill a master mid-call (``kill_master(session_id)`` returns the port it killed and a "failed over?"
    check); audio sent during and after the failover reaches Kallglot and comes back; the session ends once."""
    simulator = TwilioCallSimulator(bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    before, during, after = (os.urandom(25 * FRAME) for _ in range(3))
    call_sid = "CA" + uuid.uuid4().hex

    def failover(stream: SimulatedStream) -> None:
        assert wait_until(lambda: only_session(emulator)["connections_live"] == 1)
        session_id = only_session(emulator)["id"]
        failed_over = kill_master(session_id)
        _send_frames(stream, during, first_chunk=26)  # while Redis moves: the relay does not need it for audio
        assert wait_until(lambda: _received(emulator, session_id) == before + during, timeout=10)
        assert wait_until(failed_over, timeout=30), "no replica was promoted"
        _send_frames(stream, after, first_chunk=51)
        assert wait_until(lambda: _received(emulator, session_id) == before + during + after, timeout=10)
        assert stream.wait_for(lambda s: len(s.heard) >= len(before + during + after), timeout=10)

    result = simulator.place_call(*new_numbers(), before, pace=False, call_sid=call_sid, hold_open=failover,
                                  listen_seconds=0.5)
    assert result.protocol_errors == [] and result.errors == []
    assert result.heard_audio == before + during + after
    session_id = only_session(emulator)["id"]
    state = BridgeState(deployment.client(), "kb")
    assert wait_until(lambda: state.settled_ended(session_id), timeout=30), state.session(session_id)
    _assert_nothing_left(state, session_id, call_sid)
    assert emulator.session(session_id)["end_calls"] == 1
    assert emulator.session(session_id)["status"] == "ended"


@pytest.mark.e2e
def test_killing_the_cluster_master_of_the_sessions_slot_mid_call(
        cluster_bridge: RunningServer, cluster: RedisDeployment, emulator: EmulatorControl) -> None:
    keys = RedisKeys("kb")

    def kill_master(session_id: str) -> Any:
        killed = master_port_for_key(cluster, keys.session(session_id))
        cluster.node_on(killed).kill()
        return lambda: master_port_for_key(cluster, keys.session(session_id)) != killed

    _call_across_a_failover(cluster_bridge, cluster, emulator, kill_master)


@pytest.mark.e2e
def test_killing_the_sentinel_master_mid_call(sentinel_bridge: RunningServer, sentinel: RedisDeployment,
                                              emulator: EmulatorControl) -> None:
    def kill_master(_: str) -> Any:
        killed = sentinel_master_port(sentinel)
        sentinel.node_on(killed).kill()
        return lambda: sentinel_master_port(sentinel) != killed

    _call_across_a_failover(sentinel_bridge, sentinel, emulator, kill_master)


@pytest.mark.e2e
@pytest.mark.parametrize("deployment_name", ["cluster", "sentinel"])
def test_the_admin_throttle_and_sharded_views_work_on_each_deployment(
        request: pytest.FixtureRequest, deployment_name: str, emulator: EmulatorControl) -> None:
    deployment: RedisDeployment = request.getfixturevalue(deployment_name)
    app = create_app({**bridge_config(deployment.url, emulator.api_url, "adm-" + uuid.uuid4().hex[:8], PUBLIC_URL),
                      **deployment.env, "ADMIN_PASSWORD": ADMIN_PASSWORD})
    app.testing = True
    with app.app_context():  # one live session, to be listed from the sharded live set
        session = services().lifecycle.create_session(carrier="twilio", call_id="CAadm", idempotency_key="adm",
                                                      mode="ai_agent")
        services().lifecycle.register_leg(_leg("CAadm"), session_id=session.id)
    attacker = app.test_client()
    for attempt in range(MAX_FAILURES_PER_CLIENT):
        assert admin_sign_in(attacker, password="guess", name=f"guesser {attempt}").status_code == 401
    assert admin_sign_in(attacker).status_code == 429  # Flask-Limiter counted on the same deployment
    admin = app.test_client()
    admin.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    assert admin_sign_in(admin).status_code == 302
    assert session.id in admin.get("/admin/live").get_data(as_text=True)
    assert "CAadm" in admin.get("/admin/calls").get_data(as_text=True)
    assert b"kallglot_bridge_live_sessions 1" in app.test_client().get("/metrics").data
    with app.app_context():
        services().lifecycle.end_session(session.id, "admin")
    assert emulator.session(session.id)["end_calls"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("deployment_name", ["cluster", "sentinel"])
def test_redis_max_connections_bounds_the_pool_on_each_deployment(
        request: pytest.FixtureRequest, deployment_name: str, emulator: EmulatorControl) -> None:
    """Per worker, and on a cluster per node: the setting reaches the pool redis-py keeps for each."""
    deployment: RedisDeployment = request.getfixturevalue(deployment_name)
    app = create_app({**bridge_config(deployment.url, emulator.api_url, "pool-" + uuid.uuid4().hex[:8], PUBLIC_URL),
                      **deployment.env, "REDIS_MAX_CONNECTIONS": "7"})
    with app.app_context():
        client = services().redis
        assert client.ping()
        if deployment_name == "cluster":
            pools = [node.redis_connection.connection_pool for node in client.get_primaries()]
            assert len(pools) == 3 and {pool.max_connections for pool in pools} == {7}
        else:
            assert client.connection_pool.max_connections == 7


@pytest.mark.e2e
def test_every_lifecycle_step_runs_on_the_cluster(cluster: RedisDeployment, emulator: EmulatorControl) -> None:
    """Each Lua script and transaction, on a real cluster (a key outside the script's slot is CROSSSLOT there):
    hold, returning caller, heartbeat expiry, a failed end and its retry, an orphaned create, billing, profiles."""
    app = create_app({**bridge_config(cluster.url, emulator.api_url, "steps-" + uuid.uuid4().hex[:8], PUBLIC_URL),
                      **cluster.env})
    with app.app_context():
        svc = services()
        lifecycle, now = svc.lifecycle, time.time()
        first = lifecycle.create_session(carrier="twilio", call_id="CA1", idempotency_key="k1", mode="ai_agent")
        assert lifecycle.register_leg(_leg("CA1"), session_id=first.id)
        assert lifecycle.stream_started("twilio", "CA1", "MZ1") and lifecycle.heartbeat("twilio", "CA1", "MZ1")
        assert lifecycle.leg_ended("twilio", "CA1", "relay_carrier_lost", clean=False,
                                   stream_id="MZ1") is EndOutcome.HELD
        assert lifecycle.held_session_for("+15551230001", "+15551230000") == first.id
        back = LegSpec(**{**_leg("CA2").__dict__})
        assert lifecycle.register_leg(back, session_id=first.id, reattach_from=("+15551230001", "+15551230000"))
        assert lifecycle.held_session_for("+15551230001", "+15551230000") is None
        # The returning leg's relay never starts: its heartbeat runs out, the session is held, then ended.
        assert lifecycle.expire_lost_legs(now=now + 3600) == 1
        emulator.fault(endpoint="end", status=503, code="service_unavailable", times=3)
        assert lifecycle.end_due_sessions(now=now + 7200) == 1  # the end fails: released for a retry
        assert lifecycle.session_record(first.id)["status"] == "end_failed"
        assert lifecycle.end_due_sessions(now=now + 7300) == 1  # the retry asks Kallglot, then ends it
        assert lifecycle.session_record(first.id)["status"] == "ended"
        # A create whose leg was never registered (its worker died) is found and ended by a reaper.
        orphan = lifecycle.create_session(carrier="twilio", call_id="CA3", idempotency_key="k3", mode="ai_agent")
        assert lifecycle.end_orphaned_creates(now=now + 3600) == 1
        assert lifecycle.live_session_ids() == set() and lifecycle.live_session_count() == 0
        assert {c["call_id"] for c in lifecycle.recent_calls()} == {"CA1", "CA2"}
        assert usage.record_billed_seconds(svc.redis, svc.keys, first.id, 61.0)
        # Both sessions were billed at their end (the emulator answers with a duration); ours overwrote one.
        assert sum(row.sessions for row in usage.usage(svc.redis, svc.keys)) == 2
        assert 61.0 in [row.seconds for row in usage.usage(svc.redis, svc.keys)]
        queue = AgentQueue(svc.redis, svc.keys)  # the browser-agent queue's claim script: one slot too
        queue.offer(first.id, carrier="twilio", call_id="CA1", to_number="+1", from_number="+2", source_language="en",
                    target_language="es", wait_seconds=30)
        assert queue.take(first.id, agent="Ada", owner="o", leg_id="L1") and not queue.withdraw(first.id, "expired")
        svc.profiles.set("+15551230009", NumberProfile(mode="ai_agent"))
        assert list(svc.profiles.all()) == ["+15551230009"] and svc.profiles.delete("+15551230009")
    # Three end requests refused by the injected fault, then exactly one that ended it; the orphan's one.
    assert [emulator.session(s)["end_calls"] for s in (first.id, orphan.id)] == [4, 1]
    assert {emulator.session(s)["status"] for s in (first.id, orphan.id)} == {"ended"}


def _leg(call_id: str) -> LegSpec:
    return LegSpec(carrier="twilio", call_id=call_id, speaker="customer", from_number="+15551230000",
                   to_number="+15551230001", mode="ai_agent", reconnect_window_seconds=30)


# -- managed TLS Redis -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A server certificate for 127.0.0.1, its key, and the CA made here that signed it."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=kallglot-bridge test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    extensions = folder / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(extensions))
    return cert, key, ca


@pytest.fixture(scope="module")
def tls_redis(tls_files: tuple[Path, Path, Path]) -> Iterator[RedisDeployment]:
    """redis-server on TLS only, with a certificate signed by the test's CA."""
    with run_redis_tls(*tls_files) as deployment:
        yield deployment


def _tls_app(tls_redis: RedisDeployment, emulator: EmulatorControl, **extra: str) -> Any:
    return create_app({**bridge_config(tls_redis.url, emulator.api_url, "tls-" + uuid.uuid4().hex[:8], PUBLIC_URL),
                       **extra})


@pytest.mark.e2e
def test_rediss_with_a_private_ca_verifies_and_serves_the_lifecycle(tls_redis: RedisDeployment,
                                                                    emulator: EmulatorControl) -> None:
    app = _tls_app(tls_redis, emulator, REDIS_TLS_CA=tls_redis.env["REDIS_TLS_CA"])
    client = app.test_client()
    assert client.get("/readyz").status_code == 200, client.get("/readyz").json
    with app.app_context():
        svc = services()
        session = svc.lifecycle.create_session(carrier="twilio", call_id="CAtls", idempotency_key="tls-1",
                                               mode="ai_agent")
        assert svc.lifecycle.end_session(session.id, "admin") is EndOutcome.ENDED
    assert emulator.session(session.id)["end_calls"] == 1


@pytest.mark.e2e
def test_rediss_refuses_a_server_its_ca_did_not_sign(tls_redis: RedisDeployment, emulator: EmulatorControl,
                                                    tmp_path: Path) -> None:
    other_ca = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                    "-out", str(other_ca), "-days", "1", "-subj", "/CN=someone else"], check=True,
                   capture_output=True, timeout=60)
    app = _tls_app(tls_redis, emulator, REDIS_TLS_CA=str(other_ca))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and "Redis unreachable" in " ".join(ready.json["problems"])


@pytest.fixture(scope="module")
def tls_sentinel(tls_files: tuple[Path, Path, Path]) -> Iterator[RedisDeployment]:
    """Master + replica under three Sentinels, every one of them on TLS only (``rediss+sentinel://``)."""
    with run_redis_sentinel(tls=tls_files) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def tls_cluster(tls_files: tuple[Path, Path, Path]) -> Iterator[RedisDeployment]:
    """3 masters + 3 replicas, clients, replication and cluster bus on TLS only (``rediss://`` seeds)."""
    with run_redis_cluster(masters=3, replicas_per_master=1, tls=tls_files) as deployment:
        yield deployment


def _kill_tls_master(deployment: RedisDeployment, session_id: str) -> Any:
    """Kill the master that serves the session (a cluster: its slot's); returns a "failed over?" check."""
    if deployment.kind == CLUSTER:
        key = RedisKeys("kb").session(session_id)
        killed = master_port_for_key(deployment, key)
        deployment.node_on(killed).kill()
        return lambda: master_port_for_key(deployment, key) != killed
    killed = sentinel_master_port(deployment)
    deployment.node_on(killed).kill()
    return lambda: sentinel_master_port(deployment) != killed


@pytest.mark.e2e
@pytest.mark.parametrize("deployment_name, scheme", [("tls_sentinel", "rediss+sentinel://"),
                                                     ("tls_cluster", "rediss://")])
def test_tls_sentinel_and_cluster_serve_the_lifecycle_and_throttle_and_follow_a_failover(
        request: pytest.FixtureRequest, deployment_name: str, scheme: str, emulator: EmulatorControl) -> None:
    """Managed Redis with in-transit encryption, Sentinel or cluster mode: nothing listens in plain text, and the
    certificate is verified against the private CA. The sign-in throttle (Flask-Limiter) counts over the same
    TLS deployment; after the master serving the session is killed, the app finds the promoted replica over TLS."""
    deployment: RedisDeployment = request.getfixturevalue(deployment_name)
    assert deployment.url.startswith(scheme)
    app = create_app({**bridge_config(deployment.url, emulator.api_url, "kb", PUBLIC_URL), **deployment.env,
                      "ADMIN_PASSWORD": ADMIN_PASSWORD})
    app.testing = True
    assert app.test_client().get("/readyz").status_code == 200, app.test_client().get("/readyz").json
    attacker = app.test_client()
    for attempt in range(MAX_FAILURES_PER_CLIENT):
        assert admin_sign_in(attacker, password="guess", name=f"guesser {attempt}").status_code == 401
    assert admin_sign_in(attacker).status_code == 429
    call_id = "CAtls" + uuid.uuid4().hex[:8]
    with app.app_context():
        lifecycle = services().lifecycle
        first = lifecycle.create_session(carrier="twilio", call_id=call_id, idempotency_key=call_id,
                                         mode="ai_agent")
        assert lifecycle.register_leg(_leg(call_id), session_id=first.id)
        # Replicated before the kill (WAIT): the test is about finding the new master over TLS, not about
        # Redis' asynchronous replication losing the last write.
        client = services().redis
        wait = ("WAIT", 1, 5000)
        acks = (client.execute_command(*wait, target_nodes=client.get_node_from_key(services().keys.session(first.id)))
                if deployment.kind == CLUSTER else client.execute_command(*wait))
        assert acks == 1
        failed_over = _kill_tls_master(deployment, first.id)
        assert wait_until(failed_over, timeout=30), "no replica was promoted"
        # The session written before the failover is on the promoted replica; the app reaches it over TLS.
        assert wait_until(lambda: _answers(lambda: lifecycle.session_record(first.id)), timeout=30)
        assert lifecycle.end_session(first.id, "admin") is EndOutcome.ENDED
        assert first.id not in lifecycle.live_session_ids()
    assert emulator.session(first.id)["end_calls"] == 1


def _answers(read: Any) -> bool:
    """True once ``read()`` returns something truthy without a Redis error (a failover in progress)."""
    try:
        return bool(read())
    except redis_lib.RedisError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("deployment_name", ["cluster", "sentinel"])
def test_the_live_event_writer_writes_a_batch_on_each_deployment(
        request: pytest.FixtureRequest, deployment_name: str, emulator: EmulatorControl) -> None:
    """One script call per batch on Sentinel; a pipeline on the cluster, where the sessions' streams (and the
    global stream) sit in different slots that one script call could not span."""
    from app.calls.events import LEG, TRANSCRIPT, SessionEventLog, event_log_for, leg_event, transcript_event

    deployment: RedisDeployment = request.getfixturevalue(deployment_name)
    app = create_app({**bridge_config(deployment.url, emulator.api_url, "ev-" + uuid.uuid4().hex[:8], PUBLIC_URL),
                      **deployment.env})
    with app.app_context():
        log, forwarder = event_log_for(app)
        sessions = [f"sess_{n}" for n in range(8)]  # spread over slots on the cluster
        for n in range(40):
            assert forwarder.publish(sessions[n % 8], TRANSCRIPT, transcript_event(speaker="customer",
                                                                                  text=f"line {n}", final=True))
        assert forwarder.publish("sess_0", LEG, leg_event(carrier="twilio", call_id="CA1", speaker="customer",
                                                          state="ended"))
        assert forwarder.flush(timeout=20) and (forwarder.written, forwarder.dropped) == (41, 0)
        for n, session_id in enumerate(sessions):
            texts = [e.data["text"] for e in log.latest(session_id, 100) if e.kind == TRANSCRIPT]
            assert texts == [f"line {i}" for i in range(n, 40, 8)]
        assert [e.data["state"] for e in log.wait(services().keys.live_changes(), "0-0", block_ms=100)] == ["ended"]
        assert isinstance(log, SessionEventLog)
