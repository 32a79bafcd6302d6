"""What the load benchmark measures: the bridge, and beside it (``--reference``) the reference relay under uvicorn."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.devtools.localstack import REPO_ROOT, RunningServer, free_port, supervised


@dataclass(frozen=True)
class Target:
    """One relay under test: its name in the output, base URL, and the pid whose CPU and RSS are measured."""

    name: str
    url: str
    worker_pid: int
    #: ``LIVE_TRANSCRIPTS`` of this bridge: False for the "not forwarded" arm (lines received and parsed only).
    live_transcripts: bool = True
    #: The WebSocket layer of a bridge ("" for the reference relay).
    layer: str = ""


@contextlib.contextmanager
def run_reference(env: dict[str, str], *, enabled: bool) -> Iterator[RunningServer | None]:
    """The reference relay (one uvicorn process, the ``websockets`` protocol) on a free port; None when not enabled."""
    if not enabled:
        yield None
        return
    port = free_port()
    home = tempfile.mkdtemp(prefix="kb-reference-")
    log_path = Path(home) / "server.log"
    full_env = {**os.environ, **env, "PUBLIC_URL": f"http://127.0.0.1:{port}", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.devtools.loadtest.reference_relay:app",
                                 "--host", "127.0.0.1", "--port", str(port), "--ws", "websockets",
                                 "--log-level", "warning", "--no-access-log"],
                                cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(url=f"http://127.0.0.1:{port}", port=port, process=proc, log_path=log_path)
    with supervised(server, home, ready_path="/healthz", ready_timeout=60):
        yield server
