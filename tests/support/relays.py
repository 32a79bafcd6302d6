"""Which bridge worker carries a call's relay, from the bridge's own log (to kill it with SIGKILL)."""
from __future__ import annotations

import re

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
