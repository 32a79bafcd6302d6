"""Prometheus metrics (in-process and aggregated across gunicorn workers), readiness and the SIGTERM drain."""
from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app.ops.draining import Drain, begin_worker_drain, drain_for
from app.redis_keys import RedisKeys
from app.relay.core import RelayStats
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config
from tests.support.twilio_requests import answer, call_params, new_call_sid, post_signed



def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process (0 when it was never touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scraped(text: str, name: str, **labels: str) -> float:
    """A sample's value in a ``/metrics`` exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, label_text = metric.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if base == name and found == wanted:
            return float(value)
    return 0.0


def test_relay_stats_deltas_report_each_increment_once() -> None:
    stats = RelayStats()
    stats.frames_in, stats.bytes_in = 5, 800
    assert stats.take_deltas()["frames_in"] == 5
    stats.frames_in += 2
    deltas = stats.take_deltas()
    assert deltas["frames_in"] == 2 and deltas["bytes_in"] == 0
    assert "unknown_kallglot" not in deltas and "_reported" not in deltas


def test_metrics_endpoint_serves_the_prometheus_text_format(client: FlaskClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    # Which families it carries, with which labels: test_readme_promises.py checks each against the README.
    assert "# TYPE kallglot_bridge_live_sessions gauge" in response.get_data(as_text=True)


def test_answered_calls_api_latency_and_rejections_are_counted(client: FlaskClient,
                                                               emulator: EmulatorControl) -> None:
    answered = sample("kallglot_bridge_calls_total", carrier="twilio", outcome="answered")
    created = sample("kallglot_bridge_kallglot_api_seconds_count", operation="create_session")
    rejected = sample("kallglot_bridge_webhook_rejections_total", carrier="twilio", reason="signature")
    answer(client, new_call_sid())
    assert post_signed(client, "/twilio/voice", call_params(new_call_sid()), signature="bad").status_code == 403
    assert sample("kallglot_bridge_calls_total", carrier="twilio", outcome="answered") == answered + 1
    assert sample("kallglot_bridge_kallglot_api_seconds_count", operation="create_session") == created + 1
    assert sample("kallglot_bridge_webhook_rejections_total", carrier="twilio", reason="signature") == rejected + 1
    # This test's own namespace: the one call it answered is the one live session.
    assert scraped(client.get("/metrics").get_data(as_text=True), "kallglot_bridge_live_sessions") == 1


def test_kallglot_failures_count_errors_by_code_and_fallbacks(client: FlaskClient,
                                                              emulator: EmulatorControl) -> None:
    # The label is Kallglot's own error.code from the response body, whatever it is: set one the emulator
    # would not pick by default, so the test reads the product's parsing, not the fake's default.
    errors = sample("kallglot_bridge_kallglot_api_errors_total", operation="create_session",
                    code="insufficient_api_credits")
    fallbacks = sample("kallglot_bridge_fallbacks_total", carrier="twilio", reason="kallglot_unavailable")
    emulator.fault(endpoint="create", status=402, code="insufficient_api_credits")
    root = answer(client, new_call_sid())
    assert root.find("Connect") is None  # the apology, not a stream
    assert sample("kallglot_bridge_kallglot_api_errors_total", operation="create_session",
                  code="insufficient_api_credits") == errors + 1
    assert sample("kallglot_bridge_fallbacks_total", carrier="twilio", reason="kallglot_unavailable") == fallbacks + 1


def test_readyz_is_503_while_draining(app: Flask, client: FlaskClient) -> None:
    assert client.get("/readyz").status_code == 200
    drain_for(app).begin(grace_seconds=3600)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert any("draining" in p for p in response.get_json()["problems"])


def test_readyz_reports_an_unreachable_kallglot(make_admin_app) -> None:
    app = make_admin_app(KALLGLOT_API_URL=f"http://127.0.0.1:{free_port()}/v1")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert any(p.startswith("Kallglot API unreachable") for p in response.get_json()["problems"])


class FakeRelay:
    def __init__(self) -> None:
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


def test_drain_hands_over_tracked_relays_and_stops_late_ones_at_once() -> None:
    drain = Drain()
    early, late, finished = FakeRelay(), FakeRelay(), FakeRelay()
    with drain.track(finished):
        pass
    with drain.track(early):
        drain.begin(grace_seconds=0.2, margin_seconds=0.1).join(timeout=5)
        assert drain.draining and early.stopped == 1
        with drain.track(late):  # accepted just before the listener closed
            assert late.stopped == 1
    assert finished.stopped == 0 and drain.live_relays() == 0


def test_drain_hook_ignores_apps_that_are_not_the_bridge() -> None:
    assert begin_worker_drain(Flask("other"), grace_seconds=1) is False


# -- under gunicorn ------------------------------------------------------------------------------------------------


def test_metrics_aggregate_both_workers_after_a_whole_call(bridge_server: RunningServer,
                                                           emulator: EmulatorControl) -> None:
    before = requests.get(bridge_server.url + "/metrics", timeout=5).text
    simulator = TwilioCallSimulator(bridge_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    result = simulator.place_call(*new_numbers(), os.urandom(53 * 160), pace=False, listen_seconds=1.0)
    assert result.errors == []
    deadline = time.monotonic() + 5
    while True:
        after = requests.get(bridge_server.url + "/metrics", timeout=5).text
        ended = scraped(after, "kallglot_bridge_relays_ended_total", carrier="twilio", reason="carrier_stop") \
            - scraped(before, "kallglot_bridge_relays_ended_total", carrier="twilio", reason="carrier_stop")
        if ended >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ended == 1

    def grew(name: str, **labels: str) -> float:
        return scraped(after, name, **labels) - scraped(before, name, **labels)

    assert grew("kallglot_bridge_media_frames_total", carrier="twilio", direction="uplink") == 53
    assert grew("kallglot_bridge_media_bytes_total", carrier="twilio", direction="uplink") == 53 * 160
    assert grew("kallglot_bridge_kallglot_audio_input_total", carrier="twilio") == 11
    assert grew("kallglot_bridge_media_frames_total", carrier="twilio", direction="downlink") >= 10
    assert grew("kallglot_bridge_relay_hop_seconds_count", direction="uplink") >= 1
    assert grew("kallglot_bridge_calls_total", carrier="twilio", outcome="answered") == 1
    assert grew("kallglot_bridge_sessions_ended_total", by="bridge") == 1
    assert re.search(r"^kallglot_bridge_relays_live\{carrier=\"twilio\"\} 0\.0$", after, re.M)


@pytest.fixture
def draining_bridge(redis_url: str, emulator_server: RunningServer, namespace: str) -> Iterator[RunningServer]:
    """A one-worker bridge of this test's own (it gets SIGTERM), with a long reconnect window."""
    port = free_port()
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", namespace, f"http://127.0.0.1:{port}"),
           "RECONNECT_WINDOW_SECONDS": "60"}
    with run_gunicorn("app:create_app()", env, workers=1, port=port) as server:
        yield server


def test_sigterm_hands_live_calls_to_the_lifecycle_as_held(draining_bridge: RunningServer, namespace: str,
                                                           redis_client: redis_lib.Redis,
                                                           emulator: EmulatorControl) -> None:
    simulator = TwilioCallSimulator(draining_bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)

    def deploy_mid_call(stream: SimulatedStream) -> None:
        draining_bridge.process.send_signal(signal.SIGTERM)
        # gunicorn's --graceful-timeout is 5 s in tests: calls are handed over after half of it.
        assert stream.wait_for(lambda s: s.server_closed, timeout=10)

    call_sid = new_call_sid()
    result = simulator.place_call(*new_numbers(), b"\xff" * 1600, pace=False, call_sid=call_sid,
                                  hold_open=deploy_mid_call, listen_seconds=0, status_callbacks="none")
    assert result.server_closed_first
    keys = RedisKeys(namespace)
    call = BridgeState(redis_client, namespace).call("twilio", call_sid)
    assert call["end_reason"] == "relay_worker_draining" and call["clean"] == "0"
    session = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.session(call["session_id"])).items()}
    assert session["status"] == "held"  # held for a reconnect, not ended and not leaked
    assert emulator.session(call["session_id"])["status"] != "ended"
    assert draining_bridge.process.wait(timeout=15) == 0
    assert '"message":"worker draining' in draining_bridge.log()
