"""The built wheel works on its own: installed (not editable) into a fresh venv and served by gunicorn + gevent
from a directory that is not the repo, it renders the admin sign-in page (templates shipped inside the package)
and answers a signed Twilio webhook.

Offline and quick: the wheel is built without build isolation (setuptools from this venv), the fresh venv gets
only the wheel, and finds the dependencies through a ``.pth`` line naming this venv's site-packages.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import requests

from app.devtools.simulator.twilio import TwilioCallSimulator
from tests.support.controls import EmulatorControl
from tests.support.settings import ADMIN_PASSWORD, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, bridge_config
from tests.support.servers import REPO_ROOT, RunningServer, free_port, run_gunicorn

pytestmark = pytest.mark.e2e

#: What a wheel is built from: the package, the templates it ships, and the build configuration.
SOURCES = ("app", "templates", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")
BUILD_SECONDS = 180


def run(*cmd: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=BUILD_SECONDS)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh venv with the wheel built from this checkout installed in it."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build writes nothing (build/, *.egg-info) into the checkout
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        else:
            shutil.copy2(path, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", work / "dist", source, cwd=work)
    (wheel,) = (work / "dist").glob("kallglot_bridge-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=work)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work).strip())
    (purelib / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_carries_the_package_its_templates_and_py_typed(wheel_python: Path) -> None:
    script = "import app, app.factory; print(app.__file__); print(app.factory.template_folder())"
    where = run(wheel_python, "-c", script, cwd=wheel_python.parent)
    package_file, templates = where.split()
    venv = wheel_python.parent.parent
    assert Path(package_file).is_relative_to(venv) and Path(templates).is_relative_to(venv)
    assert (Path(templates) / "admin" / "sign_in.html").is_file()
    assert (Path(package_file).parent / "py.typed").is_file()


@pytest.fixture(scope="module")
def wheel_server(wheel_python: Path, redis_url: str, emulator_server: RunningServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The installed wheel under gunicorn + gevent, started from an empty directory (not the repo root)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**bridge_config(redis_url, emulator_server.url + "/v1", "wheel", url), "ADMIN_PASSWORD": ADMIN_PASSWORD}
    with run_gunicorn("app:create_app()", env, port=port, python=str(wheel_python),
                      cwd=tmp_path_factory.mktemp("elsewhere")) as server:
        yield server


def test_the_installed_wheel_serves_the_admin_sign_in_page(wheel_server: RunningServer) -> None:
    page = requests.get(wheel_server.url + "/admin/sign-in", timeout=10)
    assert page.status_code == 200
    assert 'name="password"' in page.text and "/admin/static/admin.css" in page.text
    assert requests.get(wheel_server.url + "/admin/static/admin.css", timeout=10).status_code == 200


def test_the_installed_wheel_answers_a_signed_twilio_webhook(wheel_server: RunningServer,
                                                             emulator: EmulatorControl) -> None:
    simulator = TwilioCallSimulator(wheel_server.url, TWILIO_AUTH_TOKEN, account_sid=TWILIO_ACCOUNT_SID)
    assert simulator.post_voice_webhook("+14155550100", "+14155550199", sign=False).status_code == 403
    call_sid = "CA" + "7" * 32
    answer = simulator.post_voice_webhook("+14155550100", "+14155550199", call_sid=call_sid)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/xml")
    stream = ET.fromstring(answer.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == wheel_server.url.replace("http", "ws", 1) + "/twilio/media"
    session_id = next(p.get("value") for p in stream.iter("Parameter") if p.get("name") == "session_id")
    # The caller hangs up before any media: the session must not be left running at Kallglot.
    status = simulator.signed_post("/twilio/status", simulator.base_params("+14155550100", "+14155550199",
                                                                           call_sid, "completed"))
    assert status.status_code == 204
    assert emulator.session(session_id)["status"] == "ended"
