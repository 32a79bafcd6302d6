"""Issue 13 items 8 and 9: hashed lock files that CI and the Dockerfile install from, bounded dependency
versions, and gunicorn settings that do not trust every client."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\[\]-]+)\s*(.*)$")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked(lock: str) -> dict[str, str]:
    """``{name: version}`` of a pip-compile lock file; every entry must carry a sha256 hash."""
    text = (ROOT / ".ci" / lock).read_text()
    entries = re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text,
                         re.M)
    names = re.findall(r"^([a-z0-9][a-z0-9._-]*)==", text, re.M)
    assert len(entries) == len(names), "a locked package has no hash"
    return {name: version for name, version, _ in entries}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def test_every_dependency_has_an_upper_bound_and_pynacl_is_declared() -> None:
    project = pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    for spec in specs:
        requirement = spec.split(";")[0].strip()
        if "python_version >= '3.13'" in spec:
            continue  # audioop-lts: a backport, versioned with Python itself
        assert "<" in requirement, f"{requirement} has no upper bound"
    assert any(normalized(spec).startswith("pynacl") for spec in project["dependencies"])


@pytest.mark.parametrize("lock, extras", [("requirements.lock", ("test", "demo")), ("requirements-runtime.lock", ())])
def test_lock_files_pin_every_dependency_with_hashes(lock: str, extras: tuple[str, ...]) -> None:
    versions = locked(lock)
    project = pyproject()["project"]
    wanted = [s for s in project["dependencies"] if "python_version >= '3.13'" not in s]
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    for spec in wanted:
        assert normalized(REQUIREMENT.match(spec.split(";")[0].strip()).group(1)) in versions, spec
    if not extras:
        assert "pytest" not in versions and "selenium" not in versions  # the image carries no test tools


def test_ci_and_dockerfile_install_from_the_locks() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--require-hashes -r .ci/requirements.lock" in ci and "--no-deps -e ." in ci
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements-runtime.lock" in dockerfile and "--no-deps" in dockerfile


def test_gunicorn_trusts_no_forwarding_by_default_and_bounds_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.delenv("GUNICORN_KEEPALIVE", raising=False)
    namespace: dict[str, Any] = {}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)  # noqa: S102
    try:
        assert "*" not in namespace["forwarded_allow_ips"]
        assert 1 <= namespace["keepalive"] <= 10  # under gevent: the time a client may take to send headers
        assert namespace["limit_request_line"] <= 8190 and namespace["limit_request_fields"] <= 100
        assert namespace["limit_request_field_size"] <= 8190
    finally:
        namespace["on_exit"](None)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"]  # set by the file; monkeypatch restores it
