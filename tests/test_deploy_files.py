"""Deploy files checked against their platforms' documented schemas (written from Render's Blueprint spec and
Heroku's app.json schema), and against what the app reads: every variable the app reads is declared."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
START_COMMAND = "gunicorn -c gunicorn.conf.py 'app:create_app()'"

# -- Render Blueprint (render.yaml) ------------------------------------------------------------------------------
RENDER_TOP_LEVEL = {"services", "databases", "envVarGroups", "previews", "version", "projects", "ungrouped"}
RENDER_SERVICE_TYPES = {"web", "pserv", "worker", "cron", "keyvalue", "redis"}
RENDER_RUNTIMES = {"node", "python", "elixir", "go", "ruby", "rust", "docker", "image", "static"}
RENDER_PLANS = {"free", "starter", "standard", "pro", "pro plus", "pro max", "pro ultra"}
RENDER_REGIONS = {"oregon", "ohio", "virginia", "frankfurt", "singapore"}
RENDER_SERVICE_KEYS = {
    "type", "name", "runtime", "env", "plan", "region", "repo", "branch", "rootDir", "buildCommand", "startCommand",
    "preDeployCommand", "healthCheckPath", "envVars", "autoDeploy", "numInstances", "scaling", "disk", "domains",
    "buildFilter", "dockerfilePath", "dockerContext", "dockerCommand", "image", "registryCredential",
    "maxShutdownDelaySeconds", "ipAllowList", "maxmemoryPolicy", "schedule", "previews", "pullRequestPreviewsEnabled",
    "staticPublishPath", "headers", "routes",
}
RENDER_ENV_SOURCES = {"value", "generateValue", "sync", "fromService", "fromDatabase", "fromGroup"}
RENDER_FROM_SERVICE_PROPERTIES = {"host", "port", "hostport", "connectionString"}
RENDER_MAXMEMORY_POLICIES = {"allkeys-lru", "volatile-lru", "allkeys-lfu", "volatile-lfu", "allkeys-random",
                             "volatile-random", "volatile-ttl", "noeviction"}

# -- Heroku app.json ---------------------------------------------------------------------------------------------
APP_JSON_KEYS = {"name", "description", "keywords", "website", "repository", "logo", "success_url", "scripts", "env",
                 "formation", "image", "addons", "buildpacks", "environments", "stack"}
APP_JSON_ENV_KEYS = {"description", "value", "required", "generator"}
HEROKU_DYNO_SIZES = {"eco", "basic", "standard-1x", "standard-2x", "performance-m", "performance-l",
                     "performance-l-ram", "performance-xl", "performance-2xl"}
HEROKU_STACKS = {"heroku-22", "heroku-24"}

#: Read by the app but set by a launcher, not by operators.
INTERNAL_SETTINGS = {"DEMO_MODE"}
#: Read outside Settings (logging); operators set them, so the deploy files declare them.
OTHER_APP_VARIABLES = {"LOG_LEVEL", "LOG_FORMAT"}
#: gunicorn.conf.py tunables with sane defaults, and platform-provided ones (README documents them).
GUNICORN_VARIABLES = {"PORT", "WEB_CONCURRENCY", "WORKER_CONNECTIONS", "GUNICORN_TIMEOUT",
                      "GUNICORN_GRACEFUL_TIMEOUT", "PROMETHEUS_MULTIPROC_DIR"}


def app_variables() -> set[str]:
    """Every environment variable the app itself reads."""
    return {f.name.upper() for f in fields(Settings) if f.name != "extra"} - INTERNAL_SETTINGS | OTHER_APP_VARIABLES


@pytest.fixture(scope="module")
def render() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "render.yaml").read_text())


@pytest.fixture(scope="module")
def app_json() -> dict[str, Any]:
    return json.loads((ROOT / "app.json").read_text())


def test_render_blueprint_follows_the_spec(render: dict[str, Any]) -> None:
    assert set(render) <= RENDER_TOP_LEVEL and isinstance(render["services"], list) and render["services"]
    names = [s["name"] for s in render["services"]]
    assert len(names) == len(set(names))
    for service in render["services"]:
        assert set(service) <= RENDER_SERVICE_KEYS, set(service) - RENDER_SERVICE_KEYS
        assert service["type"] in RENDER_SERVICE_TYPES and isinstance(service["name"], str) and service["name"]
        assert service.get("plan", "starter") in RENDER_PLANS
        assert service.get("region", "oregon") in RENDER_REGIONS
        if service["type"] in ("keyvalue", "redis"):
            assert isinstance(service["ipAllowList"], list)  # required for Key Value instances
            assert service.get("maxmemoryPolicy", "allkeys-lru") in RENDER_MAXMEMORY_POLICIES
            continue
        assert service.get("runtime", service.get("env")) in RENDER_RUNTIMES
        if service.get("runtime") not in ("docker", "image"):
            assert isinstance(service["buildCommand"], str) and isinstance(service["startCommand"], str)
        if "maxShutdownDelaySeconds" in service:
            assert isinstance(service["maxShutdownDelaySeconds"], int) and 1 <= service["maxShutdownDelaySeconds"] <= 300
        for var in service.get("envVars", []):
            assert isinstance(var["key"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var["key"])
            sources = set(var) & RENDER_ENV_SOURCES
            assert len(sources) == 1 and set(var) == {"key"} | sources, var
            if "value" in var:
                assert isinstance(var["value"], str), f"{var['key']}: values must be strings in YAML"
            if "generateValue" in var:
                assert var["generateValue"] is True
            if "sync" in var:
                assert var["sync"] is False
            if "fromService" in var:
                ref = var["fromService"]
                assert ref["type"] in RENDER_SERVICE_TYPES and ref["name"] in names
                assert (set(ref) & {"property", "envVarKey"}) and ref.get("property", "host") in RENDER_FROM_SERVICE_PROPERTIES


def test_render_web_service_runs_the_bridge_with_redis_wired(render: dict[str, Any]) -> None:
    (web,) = [s for s in render["services"] if s["type"] == "web"]
    assert web["startCommand"] == START_COMMAND
    assert web["healthCheckPath"] == "/healthz"
    assert web["maxShutdownDelaySeconds"] >= 30  # above gunicorn's graceful_timeout (25 s)
    env = {v["key"]: v for v in web["envVars"]}
    redis_ref = env["REDIS_URL"]["fromService"]
    (kv,) = [s for s in render["services"] if s["name"] == redis_ref["name"]]
    assert kv["type"] == redis_ref["type"] == "keyvalue" and redis_ref["property"] == "connectionString"
    assert kv["maxmemoryPolicy"] == "noeviction"  # session state must never be evicted
    assert env["SECRET_KEY"] == {"key": "SECRET_KEY", "generateValue": True}
    for secret in ("KALLGLOT_API_KEY", "TWILIO_AUTH_TOKEN", "TELNYX_API_KEY", "ADMIN_PASSWORD", "API_TOKEN"):
        assert env[secret].get("sync") is False, f"{secret} must be entered in the dashboard, never committed"
    missing = app_variables() - set(env)
    assert not missing, f"render.yaml does not declare {sorted(missing)}"
    assert env["TRUSTED_PROXY_HOPS"]["value"] == "1"  # Render's router, and nothing else, is trusted


def test_app_json_follows_the_heroku_schema(app_json: dict[str, Any]) -> None:
    assert set(app_json) <= APP_JSON_KEYS, set(app_json) - APP_JSON_KEYS
    assert isinstance(app_json["name"], str) and app_json["name"]
    assert isinstance(app_json["description"], str)
    assert all(isinstance(k, str) for k in app_json.get("keywords", []))
    assert app_json.get("stack", "heroku-24") in HEROKU_STACKS
    for buildpack in app_json.get("buildpacks", []):
        assert set(buildpack) == {"url"} and isinstance(buildpack["url"], str)
    for process, formation in app_json.get("formation", {}).items():
        assert set(formation) <= {"quantity", "size"} and isinstance(formation.get("quantity", 1), int)
        assert formation.get("size", "basic").lower() in HEROKU_DYNO_SIZES, process
    for addon in app_json.get("addons", []):
        if isinstance(addon, dict):
            assert set(addon) <= {"plan", "as", "options"} and isinstance(addon["plan"], str)
        else:
            assert isinstance(addon, str)
    for name, spec in app_json["env"].items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        if isinstance(spec, str):
            continue
        assert set(spec) <= APP_JSON_ENV_KEYS, (name, set(spec) - APP_JSON_ENV_KEYS)
        assert isinstance(spec.get("description", ""), str) and spec.get("description"), f"{name} is not described"
        assert isinstance(spec.get("value", ""), str) and isinstance(spec.get("required", True), bool)
        assert spec.get("generator", "secret") == "secret"


def test_app_json_declares_every_variable_and_the_redis_addon(app_json: dict[str, Any]) -> None:
    plans = [a["plan"] if isinstance(a, dict) else a for a in app_json["addons"]]
    assert any(p.startswith("heroku-redis") for p in plans)  # the add-on sets REDIS_URL
    declared = set(app_json["env"]) | {"REDIS_URL"}
    missing = app_variables() - declared
    assert not missing, f"app.json does not declare {sorted(missing)}"
    env = app_json["env"]
    assert env["SECRET_KEY"]["generator"] == "secret"
    assert env["KALLGLOT_API_KEY"]["required"] is True and "value" not in env["KALLGLOT_API_KEY"]
    assert env["TRUSTED_PROXY_HOPS"]["value"] == "1"  # Heroku's router, and nothing else, is trusted


def test_procfile_and_dockerfile_start_the_same_server() -> None:
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert procfile["web"].strip() == START_COMMAND
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd and " ".join(shlex.quote(a) for a in json.loads(cmd.group(1))) == START_COMMAND
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source


def test_gunicorn_conf_suits_long_lived_websockets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Executing the file sets PROMETHEUS_MULTIPROC_DIR; keep it out of the servers later tests start.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # empty: the file creates its own; undone after the test
    namespace: dict[str, Any] = {}
    source = (ROOT / "gunicorn.conf.py").read_text()
    ast.parse(source)
    exec(compile(source, "gunicorn.conf.py", "exec"), namespace)  # noqa: S102 - our own config file
    assert namespace["worker_class"] == "gevent"
    assert namespace["timeout"] >= 30  # the gevent heartbeat, never a per-request limit
    assert 0 < namespace["graceful_timeout"] < 30  # below Heroku's and Render's 30 s SIGKILL
    assert namespace["worker_connections"] >= 500
    for hook in ("on_starting", "post_worker_init", "child_exit", "on_exit"):
        assert callable(namespace[hook]), hook
    created = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    namespace["on_exit"](None)  # removes the metrics directory the exec just created
    assert not created.exists()
