"""Read a server's JSON log lines (see app/logging_setup.py) to wait for a positive event, never for time."""
from __future__ import annotations

import json
from typing import Any

from tests.support.servers import RunningServer

#: The line every media socket ends with (app/websocket.py), after everything its handler did.
SOCKET_CLOSED_PREFIX = "media socket "


def log_records(server: RunningServer) -> list[dict[str, Any]]:
    """Every JSON log line the server wrote so far, parsed (gunicorn's own plain lines are skipped)."""
    records = []
    for line in server.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def closed_media_sockets(server: RunningServer, **context: str) -> list[dict[str, Any]]:
    """The "media socket … closed" lines whose log context has every field of ``context`` (``request_id``,
    ``call_id``…): each proves one socket's handler ran to its end, goodbye and relay teardown included."""
    return [r for r in log_records(server)
            if str(r.get("message", "")).startswith(SOCKET_CLOSED_PREFIX) and str(r.get("message")).endswith(" closed")
            and all(r.get(k) == v for k, v in context.items())]
