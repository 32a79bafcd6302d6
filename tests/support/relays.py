"""Which bridge worker carries a call's relay, from the bridge's own log (to kill it with SIGKILL)."""
from __future__ import annotations

import re

import requests

from tests.support.servers import RunningServer
from tests.support.waiting import wait_until


def relay_pid(bridge: RunningServer, call_id: str, timeout: float = 8.0) -> int:
    """The worker whose relay carries ``call_id`` (from its "relay started" log line)."""
    def find() -> int | None:
        for line in bridge.log().splitlines():
            if call_id in line and "relay started" in line:
                match = re.search(r'"pid":\s*(\d+)', line)
                if match:
                    return int(match.group(1))
        return None
    pid = wait_until(find, timeout)
    assert pid, f"no relay log line for {call_id}"
    return pid


def all_workers_serving(bridge: RunningServer, workers: int = 2, timeout: float = 60.0) -> None:
    """Until each of the bridge's ``workers`` newest workers has served a request (its pid in an access line).

    gunicorn logs "Booting worker" at the fork, before the app is imported (seconds on a loaded machine), and the
    server counts as ready once any one worker answers: a test that kills "the relay's worker" must first know
    the other one can take over, or it measures a worker still importing.
    """
    def serving() -> bool:
        log = bridge.log().splitlines()
        pids = [m.group(1) for line in log if (m := re.search(r"Booting worker with pid: (\d+)", line))][-workers:]
        if len(pids) < workers:
            return False
        missing = [pid for pid in pids if not any(f'"pid":{pid}' in line and "gunicorn.access" in line
                                                   for line in log)]
        for _ in missing:  # any worker may take each request; a few give each a chance
            try:
                requests.get(bridge.url + "/healthz", timeout=5)
            except requests.RequestException:
                pass
        return not missing
    assert wait_until(serving, timeout, interval=0.1), f"not every worker of {bridge.url} serves yet"
