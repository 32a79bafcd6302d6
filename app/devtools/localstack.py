"""Start real local servers (gunicorn + gevent, redis-server) on free loopback ports.

Used by the test-suite, the chaos run (``python -m app.devtools.chaos``) and the load benchmark: the same real parts
users run, never mocks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: How long a freshly started server may take to answer. Importing the telnyx SDK alone took 22 s on a 2-core
#: machine at load average 16, so the floor is generous; ``KB_SERVER_START_TIMEOUT`` overrides it.
DEFAULT_START_TIMEOUT_SECONDS = 90.0
#: Above the floor the budget grows with the run queue per core (20 s per unit of load), up to this.
LOAD_START_SECONDS = 20.0
MAX_START_TIMEOUT_SECONDS = 300.0


def startup_timeout() -> float:
    """How long to wait for a local server to come up: ``KB_SERVER_START_TIMEOUT`` when set, else 90 s, or more
    on a loaded machine (20 s × 2 × load average per core), at most 300 s."""
    configured = os.environ.get("KB_SERVER_START_TIMEOUT")
    if configured:
        return float(configured)
    try:
        load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        load_per_core = 1.0
    return min(MAX_START_TIMEOUT_SECONDS, max(DEFAULT_START_TIMEOUT_SECONDS, LOAD_START_SECONDS * 2 * load_per_core))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_http(url: str, timeout: float | None = None, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any status below 500) or raise after ``timeout`` seconds
    (default :func:`startup_timeout`)."""
    timeout = startup_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException as exc:  # not up yet
            last_error = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last_error}")


@dataclass
class RunningServer:
    """A server process started by a test, with its base URL and captured log file."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_gunicorn(
    app_spec: str,
    env: dict[str, str] | None = None,
    *,
    workers: int = 1,
    ready_path: str = "/healthz",
    port: int | None = None,
    print_log_on_error: bool = True,
    graceful_timeout: int = 5,
    log_path: Path | None = None,
    own_session: bool = False,
    python: str = sys.executable,
    cwd: Path = REPO_ROOT,
    ready_timeout: float | None = None,
) -> Iterator[RunningServer]:
    """Run ``gunicorn -k gevent app_spec`` on a free port until the block exits: with this interpreter from
    the repo root by default, or with another ``python`` (an installed wheel's venv) from another ``cwd``.

    Each server gets its own ``HOME`` so gunicorn 27's control socket under ``$HOME/.gunicorn``
    never collides between servers started by parallel tests. ``log_path``: where its output goes (default a
    file in that temporary home). ``own_session``: start it in its own session, so a Ctrl-C in the terminal
    reaches only the caller, which then stops it in order (the demo). ``ready_timeout``: how long to wait for it
    to answer (default :func:`startup_timeout`, which grows with the machine's load). ``graceful_timeout``: how
    long a stopped server waits for open connections (tests shorten it). With ``KB_COVERAGE_SERVERS`` set, the
    server runs under ``coverage run --parallel-mode`` (see README, "Test it"), workers included.
    """
    port = port or free_port()
    home = tempfile.mkdtemp(prefix="kb-gunicorn-home-")
    log_path = log_path or Path(home) / "server.log"
    full_env = {**os.environ, **(env or {}), "HOME": home, "PYTHONUNBUFFERED": "1"}
    coverage = ["-m", "coverage", "run", "--parallel-mode"] if os.environ.get("KB_COVERAGE_SERVERS") else []
    cmd = [
        python, *coverage, "-m", "gunicorn",
        "-k", "gevent",
        "-w", str(workers),
        "-b", f"127.0.0.1:{port}",
        "--timeout", "0",
        "--graceful-timeout", str(graceful_timeout),
        app_spec,
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=own_session)
    server = RunningServer(url=f"http://127.0.0.1:{port}", port=port, process=proc, log_path=log_path)
    with supervised(server, home, ready_path=ready_path, ready_timeout=ready_timeout,
                    print_log_on_error=print_log_on_error):
        yield server


@contextlib.contextmanager
def supervised(server: RunningServer, home: str, *, ready_path: str, ready_timeout: float | None,
               print_log_on_error: bool = True) -> Iterator[RunningServer]:
    """Wait until ``server`` answers ``ready_path``, hand it to the block, then stop it (terminate, then kill)
    and remove its temporary ``home`` however the block ends; its log is printed when starting or the block fails."""
    proc = server.process
    try:
        wait_for_http(server.url + ready_path, timeout=ready_timeout, proc=proc)
        yield server
    except BaseException:
        if print_log_on_error:
            print(server.log(), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def run_redis(*, own_session: bool = False) -> Iterator[str]:
    """Yield a Redis URL: ``REDIS_URL`` when set, else a private ``redis-server`` on a free port
    (``own_session``: see :func:`run_gunicorn`)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed and REDIS_URL is not set (.ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=own_session,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
