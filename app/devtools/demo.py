"""``kallglot-bridge-demo``: the whole product on this machine, with one command.

Whatever is not configured is supplied, loudly: no ``KALLGLOT_API_KEY`` → the bundled Kallglot emulator; no
``REDIS_URL`` → a private ``redis-server`` (or, without one installed, an embedded fakeredis server with Lua);
no Twilio / Telnyx credentials → local fake Twilio and Telnyx REST APIs that really place the calls they are
asked for, with demo numbers to connect in the admin; the admin with a generated password; the outbound-call
API with a generated token. Then gunicorn + gevent serves the app exactly as in production, on 127.0.0.1
only (the demo runs with published secrets). Every setting is written to ``.demo/env`` for ``flask numbers …``
and the simulators; SIGTERM, SIGHUP and Ctrl-C stop everything the demo started.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import requests

from app.config import DEMO_SECRET_KEY, DEMO_TWILIO_AUTH_TOKEN
from app.devtools.demo_banner import banner
from app.devtools.localstack import REPO_ROOT, free_port, port_is_free, run_gunicorn, run_redis, wait_for_http
from app.devtools.simulator.number_apis import DEMO_CALL_CONTROL_APP_ID
from app.devtools.simulator.telnyx import TelnyxSigner
from app.envfile import DEMO_ENV_FILE, write_env_file

DEMO_TWILIO_ACCOUNT_SID = "AC" + "de" * 16
DEMO_TELNYX_API_KEY = "KEY_demo_telnyx_api_key"
#: The demo stops quickly: live calls get this long before they are handed to the lifecycle as lost.
DEMO_GRACEFUL_SECONDS = "8"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopDemo(Exception):
    """Raised in the main thread by a stop signal, so every started server is stopped in order."""


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A private redis-server when one is installed, else an embedded fakeredis server with Lua (``.[demo]``)."""
    if shutil.which("redis-server"):
        with run_redis(own_session=True) as url:
            yield url
        return
    try:
        import fakeredis
        import lupa  # noqa: F401 — the lifecycle's Lua scripts need it; without it every call would fail
    except ImportError:
        raise SystemExit("No REDIS_URL, no redis-server and no fakeredis with Lua: install redis-server or "
                         "`.venv/bin/pip install -e '.[demo]'`.") from None
    server = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield "redis://{}:{}/0".format(*server.server_address)
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def emulator(log_path: Path, webhook_url: str = "", webhook_secret: str = "") -> Iterator[str]:
    """The Kallglot emulator in its own process; yields its API base URL.

    With ``webhook_url`` and ``webhook_secret`` it sends the signed after-call webhooks (session.ended,
    transcript.ready, recording.ready) there, as Kallglot does."""
    port = free_port()
    hooks = {"KALLGLOT_EMULATOR_WEBHOOK_URL": webhook_url, "KALLGLOT_EMULATOR_WEBHOOK_SECRET": webhook_secret}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.devtools.emulator", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True, env={**os.environ, **hooks})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/_emulator/stats", proc=proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not interrupt the orderly stop
        signal.signal(sig, signal.SIG_IGN)
    raise StopDemo(signal.Signals(signum).name)


def demo_settings(env: dict[str, str], port: int, stack: contextlib.ExitStack, logs: Path) -> list[str]:
    """Fill ``env`` with everything the bridge needs that is not configured; returns what was supplied."""
    notes: list[str] = []
    base_url = f"http://127.0.0.1:{port}"
    if not env.get("KALLGLOT_API_KEY"):
        env.setdefault("KALLGLOT_WEBHOOK_SECRET", secrets.token_urlsafe(24))  # the emulator signs its webhooks
        env.update(KALLGLOT_API_URL=stack.enter_context(emulator(
            logs / "emulator.log", base_url + "/kallglot/webhooks", env["KALLGLOT_WEBHOOK_SECRET"])),
                   KALLGLOT_API_KEY="sk_test_emulator")
        # ``sip`` numbers dial the emulator's SIP endpoint, which the simulators reach at the URI's host:port.
        env.setdefault("KALLGLOT_SIP_DOMAIN", urlsplit(env["KALLGLOT_API_URL"]).netloc)
        notes.append(f"KALLGLOT_API_KEY not set: the bundled Kallglot EMULATOR at {env['KALLGLOT_API_URL']}")
    if not env.get("REDIS_URL"):
        env["REDIS_URL"] = stack.enter_context(local_redis())
        kind = "redis-server" if shutil.which("redis-server") else "embedded fakeredis (no redis-server installed)"
        notes.append(f"REDIS_URL not set: a private {kind} at {env['REDIS_URL']} (data is not kept)")
    for name, value in (("PUBLIC_URL", base_url), ("SECRET_KEY", DEMO_SECRET_KEY)):
        if not env.get(name):
            env[name] = value
            notes.append(f"{name} not set: the demo value" + (f" {value}" if name == "PUBLIC_URL" else ""))
    if not env.get("TWILIO_AUTH_TOKEN"):
        env.update(TWILIO_AUTH_TOKEN=DEMO_TWILIO_AUTH_TOKEN, TWILIO_ACCOUNT_SID=DEMO_TWILIO_ACCOUNT_SID)
        fake = stack.enter_context(run_gunicorn(
            "app.devtools.simulator.twilio_rest:create_fake_twilio_rest()",
            {"TWILIO_ACCOUNT_SID": DEMO_TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": DEMO_TWILIO_AUTH_TOKEN,
             "FAKE_TWILIO_BRIDGE_URL": base_url, "FAKE_TWILIO_PUBLIC_URL": env["PUBLIC_URL"]},
            log_path=logs / "fake-twilio.log", own_session=True, print_log_on_error=False))
        env.update(TWILIO_API_URL=fake.url, DEMO_FAKE_TWILIO_URL=fake.url)
        notes.append(f"TWILIO_AUTH_TOKEN not set: demo Twilio account on a FAKE Twilio REST API at {fake.url}")
    if not env.get("TELNYX_API_KEY") and not env.get("TELNYX_PUBLIC_KEY"):
        fake = stack.enter_context(run_gunicorn(
            "app.devtools.simulator.number_apis:create_fake_telnyx_api()",
            {"FAKE_TELNYX_WEBHOOK_URL": base_url + "/telnyx/call-control", "FAKE_TELNYX_API_KEY": DEMO_TELNYX_API_KEY,
             "FAKE_TELNYX_SIGNING_SEED": ""},
            ready_path="/_fake/health", log_path=logs / "fake-telnyx.log", own_session=True,
            print_log_on_error=False))
        env.update(TELNYX_API_KEY=DEMO_TELNYX_API_KEY, TELNYX_PUBLIC_KEY=TelnyxSigner().public_key,
                   TELNYX_API_URL=fake.url + "/v2", TELNYX_CONNECTION_ID=DEMO_CALL_CONTROL_APP_ID,
                   DEMO_FAKE_TELNYX_URL=fake.url)
        notes.append(f"TELNYX_API_KEY not set: the demo Telnyx key pair and a FAKE Telnyx API at {fake.url}/v2")
    for name in ("ADMIN_PASSWORD", "API_TOKEN"):
        if not env.get(name):
            env[name] = secrets.token_urlsafe(12)  # 16 characters
            notes.append(f"{name} not set: generated for this run")
    env.update(DEMO_MODE="1", DEMO_BASE_URL=base_url)
    env.setdefault("GUNICORN_GRACEFUL_TIMEOUT", DEMO_GRACEFUL_SECONDS)
    return notes


def _bridge_settings(env: dict[str, str]) -> dict[str, str]:
    names = ("KALLGLOT_API_URL", "KALLGLOT_API_KEY", "REDIS_URL", "PUBLIC_URL", "SECRET_KEY", "TWILIO_ACCOUNT_SID",
             "TWILIO_AUTH_TOKEN", "TWILIO_API_URL", "TELNYX_API_KEY", "TELNYX_PUBLIC_KEY", "TELNYX_API_URL",
             "TELNYX_CONNECTION_ID", "KALLGLOT_SIP_DOMAIN", "ADMIN_PASSWORD", "API_TOKEN", "REDIS_NAMESPACE", "DEMO_MODE", "DEMO_BASE_URL",
             "DEMO_FAKE_TWILIO_URL", "DEMO_FAKE_TELNYX_URL")
    return {name: env[name] for name in names if env.get(name)}


def seed_demo_profiles(env: dict[str, str]) -> None:
    """Give the demo's carrier numbers a profile of their own: ``POST /api/calls`` dials only from numbers this
    service is configured for (toll-fraud rule), and the README's outbound call uses them. Existing profiles
    (a demo against your own Redis) are left alone."""
    import redis

    from app.devtools.simulator.number_apis import demo_telnyx_seed, demo_twilio_numbers
    from app.profiles import NumberProfile, ProfileStore
    from app.redis_keys import RedisKeys

    client = redis.Redis.from_url(env["REDIS_URL"], socket_timeout=5)
    try:
        store = ProfileStore(client, RedisKeys(env.get("REDIS_NAMESPACE") or "kb"), NumberProfile(),
                             carriers=("twilio", "telnyx"))
        numbers = [(n["phone_number"], "twilio") for n in demo_twilio_numbers()]
        numbers += [(n["phone_number"], "telnyx") for n in demo_telnyx_seed("")["phone_numbers"] if n["connection_id"]]
        for number, carrier in numbers:
            if not store.for_number(number).own:
                store.set(number, NumberProfile(carrier=carrier, source_language=env.get("DEFAULT_SOURCE_LANGUAGE", ""),
                                                target_language=env.get("DEFAULT_TARGET_LANGUAGE", "")))
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Start the demo stack and serve until Ctrl-C, SIGTERM or SIGHUP; exit status 0 when stopped so."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")),
                        help="the bridge's port on 127.0.0.1 (default $PORT or 5000)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--env-file", type=Path, default=DEMO_ENV_FILE,
                        help=f"where the demo's settings are written (default {DEMO_ENV_FILE})")
    args = parser.parse_args(argv)
    if not port_is_free(args.port):
        print(f"Port {args.port} on 127.0.0.1 is in use (another demo still running?). Stop it, or pick another "
              f"port: kallglot-bridge-demo --port {args.port + 1}", file=sys.stderr)
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    env = dict(os.environ)
    try:
        with contextlib.ExitStack() as stack:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kb-demo-")))
            logs = args.env_file.parent
            logs.mkdir(parents=True, exist_ok=True)
            notes = demo_settings(env, args.port, stack, logs)
            settings = _bridge_settings(env)
            write_env_file(settings, args.env_file, header="Written by kallglot-bridge-demo; removed when it stops.")
            stack.callback(args.env_file.unlink, missing_ok=True)
            # HOME: gunicorn 27 keeps a control socket under $HOME/.gunicorn. -b overrides gunicorn.conf.py's
            # 0.0.0.0: the demo's secrets are published, so it must not be reachable from the network.
            bridge = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{args.port}",
                 "app:create_app()"],
                env={**env, "HOME": str(home), "PORT": str(args.port), "WEB_CONCURRENCY": str(args.workers)},
                cwd=REPO_ROOT, start_new_session=True)
            # Stopped first (the stack unwinds in reverse): its calls end while Kallglot and Redis are still up.
            stack.callback(_stop, bridge, float(env["GUNICORN_GRACEFUL_TIMEOUT"]) + 5)
            wait_for_http(f"http://127.0.0.1:{args.port}/healthz", proc=bridge)
            seed_demo_profiles(env)
            ready = requests.get(f"http://127.0.0.1:{args.port}/readyz", timeout=10).json()
            print(banner(settings, notes, ready.get("problems", []), args.env_file), flush=True)
            return bridge.wait()
    except StopDemo as stop:
        print(f"\nkallglot-bridge demo: {stop}: stopped everything it started.", file=sys.stderr, flush=True)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"kallglot-bridge demo could not start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
