# kallglot-bridge for any container host: gunicorn + gevent with gunicorn.conf.py (graceful drain, metrics).
# Build: docker build -t kallglot-bridge .   Run: docker run -p 5000:5000 --env-file .env kallglot-bridge
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=5000 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/kallglot-bridge-metrics

WORKDIR /srv
# Dependencies first, from the hashed lock (pip refuses any file whose hash differs; README › Security).
COPY .ci/requirements-runtime.lock ./requirements-runtime.lock
RUN pip install --require-hashes -r requirements-runtime.lock
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY app ./app
COPY templates ./templates
# The project itself without resolving again (the templates go inside the package: setup.py).
RUN pip install --no-deps . && useradd --system --no-create-home bridge && mkdir -p "$PROMETHEUS_MULTIPROC_DIR" \
    && chown bridge "$PROMETHEUS_MULTIPROC_DIR"
COPY gunicorn.conf.py ./
USER bridge
# gunicorn 27 keeps a control socket under $HOME/.gunicorn.
ENV HOME=/tmp
EXPOSE 5000
# Docker's stop sends SIGTERM and waits 10 s by default: run with --stop-timeout 30 (or set
# GUNICORN_GRACEFUL_TIMEOUT below the host's own grace) so live calls are handed over, not cut.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
