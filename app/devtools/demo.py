"""``kallglot-bridge-demo``: run the service locally with everything it needs.

Whatever is not configured is supplied, loudly: no ``KALLGLOT_API_KEY`` → the bundled Kallglot emulator;
no ``REDIS_URL`` → a private ``redis-server`` (or, without one installed, an embedded fakeredis server);
no ``PUBLIC_URL``/``SECRET_KEY``/``TWILIO_AUTH_TOKEN`` → local demo values. Then gunicorn + gevent serves
the app exactly as in production. Place a simulated call with ``kallglot-simulate-call``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

from app.config import DEMO_SECRET_KEY, DEMO_TWILIO_AUTH_TOKEN
from app.devtools.localstack import free_port, run_redis, wait_for_http

BANNER = "=" * 78


@contextlib.contextmanager
def _local_redis() -> Iterator[str]:
    """A private redis-server when one is installed, else an embedded fakeredis server (``.[demo]`` extra)."""
    if shutil.which("redis-server"):
        with run_redis() as url:
            yield url
        return
    try:
        import fakeredis
    except ImportError:
        raise SystemExit("No REDIS_URL, no redis-server and no fakeredis: install redis-server or "
                         "`pip install -e '.[demo]'`.") from None
    server = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield "redis://{}:{}/0".format(*server.server_address)
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Start the demo stack and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if not env.get("KALLGLOT_API_KEY"):
            emulator_port = free_port()
            emulator = subprocess.Popen([sys.executable, "-m", "app.devtools.emulator", "--host", "127.0.0.1",
                                         "--port", str(emulator_port)])
            stack.callback(emulator.terminate)
            wait_for_http(f"http://127.0.0.1:{emulator_port}/_emulator/stats", proc=emulator)
            env.update(KALLGLOT_API_URL=f"http://127.0.0.1:{emulator_port}/v1", KALLGLOT_API_KEY="sk_test_emulator",
                       DEMO_MODE="1")
            notes.append(f"KALLGLOT_API_KEY not set: using the bundled Kallglot EMULATOR on port {emulator_port}")
        if not env.get("REDIS_URL"):
            env["REDIS_URL"] = stack.enter_context(_local_redis())
            notes.append(f"REDIS_URL not set: using a private local store at {env['REDIS_URL']} (data is not kept)")
        defaults = {"PUBLIC_URL": f"http://127.0.0.1:{args.port}", "SECRET_KEY": DEMO_SECRET_KEY,
                    "TWILIO_AUTH_TOKEN": DEMO_TWILIO_AUTH_TOKEN}
        for name, value in defaults.items():
            if not env.get(name):
                env[name] = value
                env["DEMO_MODE"] = "1"
                notes.append(f"{name} not set: using the demo value" + (f" {value}" if name == "PUBLIC_URL" else ""))
        print(BANNER, "\nkallglot-bridge DEMO — not for real calls:", *(f"\n  * {n}" for n in notes),
              f"\n  Service: http://127.0.0.1:{args.port}/   Place a simulated call: kallglot-simulate-call "
              f"--base-url http://127.0.0.1:{args.port}\n{BANNER}", flush=True)
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="kb-demo-"))
        env["HOME"] = home  # gunicorn 27 keeps a control socket under $HOME/.gunicorn
        env["PORT"] = str(args.port)
        env["WEB_CONCURRENCY"] = str(args.workers)
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"],
                                  env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.send_signal(signal.SIGTERM)
            return server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
