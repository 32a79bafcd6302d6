"""The test-suite's real servers: see :mod:`app.devtools.localstack` (shared with the chaos run and the benchmark)."""
from app.devtools.localstack import REPO_ROOT, RunningServer, free_port, run_gunicorn, run_redis, wait_for_http

__all__ = ["REPO_ROOT", "RunningServer", "free_port", "run_gunicorn", "run_redis", "wait_for_http"]
