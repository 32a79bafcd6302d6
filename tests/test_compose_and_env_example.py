"""docs/deploy/compose.yaml and .env.example, checked without Docker (no daemon here): the Compose file
against the Compose Specification's top-level and service keys and the repository it builds from; the example
environment against the settings the app reads."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import Settings
from app.envfile import read_env_file

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docs" / "deploy" / "compose.yaml"
#: The Compose Specification's own JSON schema, vendored (tests/fixtures/compose-spec/README.md says from where).
COMPOSE_SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"
# From the Compose Specification (compose-spec/compose-spec, schema/compose-spec.json): allowed keys.
COMPOSE_TOP_LEVEL = {"version", "name", "include", "services", "networks", "volumes", "secrets", "configs", "models"}
COMPOSE_SERVICE_KEYS = {
    "build", "command", "container_name", "depends_on", "entrypoint", "env_file", "environment", "expose",
    "healthcheck", "image", "labels", "networks", "ports", "restart", "stop_grace_period", "stop_signal",
    "volumes", "working_dir", "user", "init", "read_only", "tmpfs", "ulimits", "logging", "profiles",
    "cap_drop", "cap_add", "security_opt", "deploy", "develop", "extra_hosts", "hostname", "mem_limit", "cpus",
}
COMPOSE_DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
#: Read by gunicorn.conf.py / the logging setup rather than Settings.
PROCESS_VARIABLES = {"WEB_CONCURRENCY", "PORT", "LOG_LEVEL", "LOG_FORMAT", "WORKER_CONNECTIONS", "GUNICORN_TIMEOUT",
                     "GUNICORN_GRACEFUL_TIMEOUT"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_uses_only_spec_keys(compose: dict[str, Any]) -> None:
    assert set(compose) <= COMPOSE_TOP_LEVEL
    assert set(compose["services"]) == {"app", "redis", "proxy"}
    for name, service in compose["services"].items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (name, set(service) - COMPOSE_SERVICE_KEYS)
        assert "image" in service or "build" in service, name
        for dependency in (service.get("depends_on") or {}):
            assert dependency in compose["services"]
        if isinstance(service.get("depends_on"), dict):
            assert all(d["condition"] in COMPOSE_DEPENDS_CONDITIONS for d in service["depends_on"].values())


def test_compose_file_validates_against_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    # `docker compose config` would say the same, but needs the Compose plugin (absent here: the Docker CLI
    # answers "unknown command"); the schema is what the plugin validates against.
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = {**compose, "services": {**compose["services"], "app": {**compose["services"]["app"], "replica": 2}}}
    assert list(validator.iter_errors(broken)), "the schema check cannot fail"


def test_compose_runs_two_bridge_instances_behind_the_one_proxy(compose: dict[str, Any]) -> None:
    assert compose["services"]["app"]["deploy"]["replicas"] == 2
    assert "container_name" not in compose["services"]["app"]  # a fixed name would allow one instance only
    assert "app" in compose["services"]["proxy"]["depends_on"]


def test_compose_builds_the_repository_and_wires_redis_and_the_proxy(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["app"]
    context = (COMPOSE.parent / bridge["build"]["context"]).resolve()
    assert context == ROOT and (context / bridge["build"]["dockerfile"]).is_file()
    assert (COMPOSE.parent / bridge["env_file"][0]["path"]).resolve() == ROOT / ".env"
    assert bridge["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "redis" in bridge["depends_on"] and "healthcheck" in compose["services"]["redis"]
    proxy = compose["services"]["proxy"]
    mounts = [volume.split(":") for volume in proxy["volumes"]]
    assert any((COMPOSE.parent / source).resolve() == ROOT / "docs" / "deploy" / "nginx.conf"
               for source, *_ in mounts)
    # The proxy is the only published port, on loopback; the bridge is reachable only through it, and trusts
    # exactly one proxy hop. nginx.conf proxies to the service by name.
    assert all(port.startswith("127.0.0.1:") for port in proxy["ports"]) and "ports" not in bridge
    assert bridge["environment"]["TRUSTED_PROXY_HOPS"] == "1"
    nginx = (ROOT / "docs" / "deploy" / "nginx.conf").read_text()
    assert f"server app:{bridge['environment']['PORT']}" in nginx


def test_env_example_names_only_real_settings_and_every_required_one() -> None:
    example = read_env_file(ROOT / ".env.example")
    known = {f.name.upper() for f in fields(Settings) if f.name != "extra"} | PROCESS_VARIABLES
    assert set(example) <= known, set(example) - known
    assert {"KALLGLOT_API_KEY", "PUBLIC_URL", "SECRET_KEY", "REDIS_URL", "TWILIO_AUTH_TOKEN",
            "TELNYX_PUBLIC_KEY"} <= set(example)
    assert not any(example[name] for name in ("KALLGLOT_API_KEY", "SECRET_KEY", "TWILIO_AUTH_TOKEN",
                                               "TELNYX_API_KEY", "ADMIN_PASSWORD", "API_TOKEN"))
