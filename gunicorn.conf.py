"""gunicorn settings for long-lived media WebSockets under the gevent worker (used by Procfile and render.yaml)."""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
worker_class = "gevent"
# One gevent worker per core carries many calls; WEB_CONCURRENCY is what Heroku and Render set.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Each live call holds one carrier socket plus one Kallglot socket in the same worker.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# With gevent the timeout is the worker's heartbeat, not a per-request limit, so calls of any length
# survive; it only catches a worker whose event loop is blocked.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# Heroku and Render allow ~30 s between SIGTERM and SIGKILL on deploys.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "25"))
keepalive = 75
accesslog = "-"
# Never log query strings of stream URLs or headers; the default format has neither headers nor bodies.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss'
forwarded_allow_ips = "*"
