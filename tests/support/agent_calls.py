"""The browser-agent tests' shared pieces (Chromium's and Firefox's): the number a customer calls, its
browser-agent profile, a customer held on the line, and an admin session signed in over HTTP."""
from __future__ import annotations

import re
import threading
from typing import Any

import redis as redis_lib
import requests

from app.devtools.simulator.twilio import SimulatedStream, TwilioCallSimulator
from app.profiles import NumberProfile
from app.redis_keys import RedisKeys
from tests.support.browser import PAGE_TIMEOUT_SECONDS
from tests.support.servers import RunningServer
from tests.support.settings import ADMIN_PASSWORD, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN
from tests.support.waiting import wait_until

#: The number the customer calls (its profile offers calls to browser agents) and the customer's own.
NUMBER, CALLER = "+14155550177", "+15551239876"
#: How long a waiting customer stays on the line at most.
HOLD_SECONDS = 90.0
#: Frames already on their way when Mute takes effect (the relay's uplink batches a few): 0.5 s of μ-law.
MUTE_SETTLE_BYTES = 4000


def set_browser_profile(client: redis_lib.Redis, keys: RedisKeys) -> None:
    """Offer calls to :data:`NUMBER` to browser agents (an agent hanging up ends the call)."""
    profile = NumberProfile(mode="bidirectional_translation", source_language="en", target_language="es",
                            browser_agents=True, browser_agent_wait_seconds=120, agent_hangup_ends_call=True)
    client.set(keys.profile(NUMBER), profile.to_json())
    client.sadd(keys.profiles_index(), NUMBER)


class WaitingCustomer:
    """A simulated Twilio customer calling :data:`NUMBER`, held on the line until :meth:`release`."""

    def __init__(self, bridge: RunningServer) -> None:
        self.on_call, self._release = threading.Event(), threading.Event()
        self.result: Any = None

        def hold(stream: SimulatedStream) -> None:
            self.on_call.set()
            self._release.wait(HOLD_SECONDS)

        def run() -> None:
            simulator = TwilioCallSimulator(bridge.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
            self.result = simulator.place_call(NUMBER, CALLER, b"\xff" * 1600, pace=False, listen_seconds=0.2,
                                               hold_open=hold)

        self._thread = threading.Thread(target=run, name="waiting-customer", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()
        self._thread.join(PAGE_TIMEOUT_SECONDS)


def signed_in(base: str, name: str) -> requests.Session:
    """An HTTP session signed in to the admin as ``name``."""
    http = requests.Session()
    page = http.get(base + "/admin/sign-in", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert http.post(base + "/admin/sign-in", timeout=10, allow_redirects=False,
                     data={"csrf_token": token, "password": ADMIN_PASSWORD, "name": name}).status_code == 302
    return http


def take_over_http(base: str, session_id: str, name: str = "Ana") -> tuple[requests.Session, str, str]:
    """``name`` signs in, waits until the Agent page lists ``session_id`` and takes it over HTTP, as the page's
    Take button does; returns the agent's HTTP session, the agent leg's id and its single-use media token."""
    agent = signed_in(base, name)
    wait_until(lambda: session_id in agent.get(base + "/admin/agent", timeout=10).text)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"',  # type: ignore[union-attr]
                     agent.get(base + "/admin/agent", timeout=10).text).group(1)
    page = agent.post(f"{base}/admin/agent/take/{session_id}", data={"csrf_token": csrf}, timeout=10).text
    leg = re.search(r'data-leg="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    token = re.search(r'data-token="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    return agent, leg, token
