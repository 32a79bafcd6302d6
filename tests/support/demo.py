"""A running ``kallglot-bridge-demo`` for tests: started like a user starts it, in a directory of its own."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from app.devtools.localstack import REPO_ROOT, free_port, startup_timeout
from app.envfile import read_env_file

#: Variables a developer's shell may hold that would make the demo use real services instead of its own.
CONFIG_VARIABLES = ("KALLGLOT_API_URL", "KALLGLOT_API_KEY", "REDIS_URL", "PUBLIC_URL", "SECRET_KEY",
                    "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_URL", "TELNYX_API_KEY",
                    "TELNYX_PUBLIC_KEY", "TELNYX_API_URL", "TELNYX_CONNECTION_ID", "ADMIN_PASSWORD", "API_TOKEN",
                    "PORT", "REDIS_NAMESPACE", "DEMO_MODE")


@dataclass
class RunningDemo:
    """The demo process, the directory it runs in and what it wrote."""

    process: subprocess.Popen
    workdir: Path
    port: int
    output_path: Path

    @property
    def base_url(self) -> str:
        """Where the bridge listens."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> dict[str, str]:
        """The demo's ``.demo/env``."""
        return read_env_file(self.workdir / ".demo" / "env")

    def output(self) -> str:
        """Everything the demo printed so far (stdout and stderr)."""
        return self.output_path.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def demo_environment(path: str | None = None) -> dict[str, str]:
    """The test's environment without any service configuration (a fresh shell), ``PATH`` replaced if given."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    if path is not None:
        env["PATH"] = path
    return env


def venv_workdir(workdir: Path) -> Path:
    """Make ``workdir`` look like a fresh clone's root for README commands: ``.venv`` is this test's venv."""
    venv = Path(sys.executable).parent.parent
    link = workdir / ".venv"
    if not link.exists():
        link.symlink_to(venv, target_is_directory=True)
    return workdir


@contextlib.contextmanager
def run_demo(workdir: Path, env: dict[str, str], *, port: int | None = None,
             command: list[str] | None = None) -> Iterator[RunningDemo]:
    """Start the demo in ``workdir`` and yield once its banner is out and ``/readyz`` is 200; stop it after."""
    port = port or free_port()
    output_path = workdir / "demo-output.log"
    cmd = command or [sys.executable, "-m", "app.devtools.demo"]
    with open(output_path, "wb") as out:
        process = subprocess.Popen(cmd, cwd=workdir, env={**env, "PORT": str(port), "PYTHONUNBUFFERED": "1"},
                                   stdout=out, stderr=subprocess.STDOUT)
    demo = RunningDemo(process, workdir, port, output_path)
    try:
        deadline = time.monotonic() + 2 * startup_timeout()
        while "Stop with Ctrl-C" not in demo.output():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"demo did not start (exit {process.poll()}):\n{demo.output()}")
            time.sleep(0.2)
        assert requests.get(demo.base_url + "/readyz", timeout=10).status_code == 200, demo.output()
        yield demo
    except BaseException:
        print(demo.output(), file=sys.stderr)
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


__all__ = ["REPO_ROOT", "RunningDemo", "demo_environment", "run_demo", "venv_workdir"]
