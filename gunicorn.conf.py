"""gunicorn settings for long-lived media WebSockets under the gevent worker (used by Procfile, render.yaml and
the Dockerfile; gunicorn also reads this file by default when started from the repository root).

- Calls are WebSockets lasting minutes to hours: the worker ``timeout`` is gevent's heartbeat, never a
  per-request limit, so it does not cut calls.
- SIGTERM (every Heroku/Render deploy): the worker stops accepting, ``/readyz`` answers 503, live calls go on
  for most of ``graceful_timeout``, then each remaining call's leg is handed to the session lifecycle as lost
  — held for a reconnect, not leaked (``app/ops/draining.py``).
- Prometheus metrics of all workers are aggregated through ``PROMETHEUS_MULTIPROC_DIR`` (``app/metrics.py``).
- A broken configuration stops the master at once with one clear message and exit status 1.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
worker_class = "gevent"
# One gevent worker per core carries many calls; WEB_CONCURRENCY is what Heroku sets (Render: set it yourself).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Concurrent accepted connections per worker: each live call holds one carrier media socket (its Kallglot
# socket is outbound and not counted) plus short webhook requests. 1000 leaves room above the ~400 calls a
# worker core carries (README, Capacity) and caps what a flood of idle sockets can hold (README, Security).
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# With gevent the timeout is the worker's heartbeat, not a per-request limit, so calls of any length
# survive; it only catches a worker whose event loop is blocked.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# Heroku and Render allow 30 s between SIGTERM and SIGKILL on deploys; the drain hands calls over before.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "25"))
# Under the gevent worker this is also how long a client may take to send a request's headers (gunicorn
# reads each request line and headers inside a keepalive-long timeout): sockets that send half a request
# line and stall are dropped after it instead of holding a worker connection for minutes. A buffering proxy
# in front (docs/deploy/nginx.conf) sends whole requests at once.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# Request line, header count and header size limits (carrier webhooks need a fraction of these).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
accesslog = "-"
# Never log query strings of stream URLs or headers; the default format has neither headers nor bodies.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss'
# Whose X-Forwarded-* headers gunicorn believes: loopback only (a proxy on the same host) unless the operator
# names their proxy's addresses; never "*" by default, which lets any client claim https or another address.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# gunicorn's own lines (start, worker exits, access log) in the app's format: one JSON object per line.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"app": {"()": "app.logging_setup.make_formatter"}},
    "handlers": {
        "error_console": {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr"},
        # The access log goes to stderr too: README (Operations, Logs) says every line does.
        "console": {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr"},
    },
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False,
                           "qualname": "gunicorn.error"},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False,
                            "qualname": "gunicorn.access"},
    },
}

# prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is first imported, which happens in the workers
# after fork; setting it here (in the master, before any fork) makes every worker write its values there.
_METRICS_DIR_CREATED = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _METRICS_DIR_CREATED:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kallglot-bridge-metrics-")
else:  # an operator's directory (the Dockerfile sets one) may not exist yet
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
_BRIDGE_APP = "app:create_app"


def on_starting(server):
    """Master start: refuse a broken configuration with a clear message; start metrics from zero."""
    if str(getattr(server.app, "app_uri", "") or "").startswith(_BRIDGE_APP):
        from app.config import ConfigError, Settings

        try:
            Settings.from_env().validate()
        except ConfigError as exc:
            print(f"kallglot-bridge cannot start: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)
    # Files of a previous run would add stale counts (a directory given by the operator is reused).
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink(missing_ok=True)


def post_worker_init(worker):
    """Worker booted: make SIGTERM drain calls (see app/ops/draining.py) on top of gunicorn's own handling."""
    import signal

    import gevent

    stop_accepting = worker.handle_exit

    def handle_term(sig, frame):
        stop_accepting(sig, frame)  # gunicorn: close the listener, wait up to graceful_timeout for connections
        from app.ops.draining import begin_worker_drain

        # Off the signal handler: the drain logs and starts a greenlet.
        gevent.spawn(begin_worker_drain, worker.wsgi, worker.cfg.graceful_timeout)

    signal.signal(signal.SIGTERM, handle_term)
    signal.siginterrupt(signal.SIGTERM, False)  # signal.signal() made it interrupting again; gunicorn does not


def child_exit(server, worker):
    """A worker exited: its live gauges stop counting (prometheus-client multiprocess rule)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master exit: remove the metrics directory this file created."""
    if _METRICS_DIR_CREATED:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
