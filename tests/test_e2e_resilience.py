"""Failures of the parts around the bridge: Redis restarted mid-call or down at call time, and two bridge
instances sharing one Redis (webhooks on one, media on the other)."""
from __future__ import annotations

import base64
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
import redis as redis_lib

from app.calls.prompts import UNAVAILABLE_MESSAGE
from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from tests.support.bridge_state import BridgeState
from tests.support.controls import EmulatorControl
from tests.support.numbers import new_numbers
from tests.support.redis_server import PersistentRedis
from tests.support.servers import RunningServer, free_port, run_gunicorn
from tests.support.settings import E2E_GRACEFUL_TIMEOUT_SECONDS, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PersistentRedis]:
    redis = PersistentRedis()
    redis.start()
    yield redis
    redis.stop()
    shutil.rmtree(redis.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bridge_on_private_redis(private_redis: PersistentRedis, emulator_server: RunningServer) -> Iterator[RunningServer]:
    port = free_port()
    env = bridge_config(private_redis.url, emulator_server.url + "/v1", "e2e-resilience", f"http://127.0.0.1:{port}")
    with run_gunicorn("app:create_app()", env, workers=1, port=port,
                      graceful_timeout=E2E_GRACEFUL_TIMEOUT_SECONDS) as server:
        yield server




def test_redis_restarted_mid_call_the_call_goes_on_and_the_session_ends_once(
        private_redis: PersistentRedis, bridge_on_private_redis: RunningServer, emulator: EmulatorControl) -> None:
    def restart_redis(stream: SimulatedStream) -> None:
        assert wait_until(lambda: emulator.sessions()[0]["connections_live"] == 1)
        private_redis.stop()
        heard_before = len(stream.heard)
        for n in range(50):  # one second of the caller talking while Redis is down
            stream.send_event("media", {"streamSid": stream.stream_sid, "media": {
                "track": "inbound", "chunk": str(1000 + n), "timestamp": str(20 * n),
                "payload": base64.b64encode(b"\x03" * 160).decode()}})
        # No Redis on the media path: Kallglot's audio still reaches the caller during the outage.
        assert stream.wait_for(lambda s: len(s.heard) > heard_before, timeout=5)
        private_redis.start()

    sim = TwilioCallSimulator(bridge_on_private_redis.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    result = sim.place_call(*new_numbers(), b"\xff" * 800, pace=False, hold_open=restart_redis, listen_seconds=0.3)
    assert result.protocol_errors == [] and not result.server_closed_first
    (session,) = emulator.sessions()
    state = BridgeState(redis_lib.Redis.from_url(private_redis.url, socket_timeout=5), "e2e-resilience")
    assert wait_until(lambda: state.settled_ended(session["id"]))  # ended for good, nothing left due
    assert emulator.session(session["id"])["end_calls"] == 1


def test_redis_down_at_call_time_the_caller_hears_the_fallback(
        private_redis: PersistentRedis, bridge_on_private_redis: RunningServer, emulator: EmulatorControl) -> None:
    private_redis.stop()
    try:
        sim = TwilioCallSimulator(bridge_on_private_redis.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
        response = sim.post_voice_webhook(*new_numbers())
        assert response.status_code == 200
        root = ET.fromstring(response.text)
        assert root.findtext("Say") == UNAVAILABLE_MESSAGE and root.find("Hangup") is not None
        assert emulator.sessions() == []  # nothing created that could not be tracked
    finally:
        private_redis.start()


class SplitSimulator(TwilioCallSimulator):
    """Twilio behind a load balancer: webhooks reach one bridge instance, the media socket another."""

    def __init__(self, public_url: str, webhooks: RunningServer, media: RunningServer) -> None:
        super().__init__(webhooks.url, TWILIO_AUTH_TOKEN, public_url=public_url, account_sid=TWILIO_ACCOUNT_SID)
        self.media_url = media.url

    def _real_url(self, url: str) -> str:
        real = super()._real_url(url)
        if real.startswith("ws://") and real.endswith("/twilio/media"):
            return self.media_url.replace("http://", "ws://") + "/twilio/media"
        return real


def test_two_instances_share_the_state(redis_url: str, emulator_server: RunningServer,
                                       emulator: EmulatorControl) -> None:
    public = "https://bridge.example.test"
    env = bridge_config(redis_url, emulator_server.url + "/v1", "e2e-two-instances", public)
    with run_gunicorn("app:create_app()", env, workers=1) as first, run_gunicorn("app:create_app()", env,
                                                                                   workers=1) as second:
        audio = bytes(range(256)) * 5
        result = SplitSimulator(public, webhooks=first, media=second).place_call(*new_numbers(), audio, pace=False,
                                                                                listen_seconds=0.8)
        assert result.protocol_errors == [] and result.errors == []
        assert "relay started" in second.log() and "relay started" not in first.log()
        assert result.heard_audio == audio  # the full 100 ms chunk, then the rest after the quiet time, echoed
        (session,) = emulator.sessions()
        state = BridgeState(redis_lib.Redis.from_url(redis_url, socket_timeout=5), "e2e-two-instances")
        assert wait_until(lambda: state.settled_ended(session["id"]))  # ended for good, nothing left due
        assert emulator.session(session["id"])["end_calls"] == 1
