"""README's commands, run as pasted against a temporary demo, so README cannot drift from the product.

README marks each shell block it means to be run with an HTML comment right above the fence:
``<!-- readme-test: demo -->`` (the one-command demo: the install steps are checked, the start command is run),
``<!-- readme-test: run -->`` (run line by line with ``bash -e`` from a directory laid out like a fresh
clone's root, while the demo runs) or ``<!-- readme-test: skip (why) -->``.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.demo import REPO_ROOT, demo_environment, run_demo, venv_workdir

README = REPO_ROOT / "README.md"
MARKED_BLOCK = re.compile(r"<!-- readme-test: (?P<kind>demo|run|skip)\b[^>]*-->\s*\n```sh\n(?P<body>.*?)\n```",
                          re.DOTALL)
COMMAND_TIMEOUT_SECONDS = 180


@dataclass(frozen=True)
class Block:
    """One marked shell block of README."""

    kind: str
    body: str
    line: int


def marked_blocks() -> list[Block]:
    """Every marked ``sh`` block of README, in order."""
    text = README.read_text()
    return [Block(m["kind"], m["body"], text.count("\n", 0, m.start()) + 1) for m in MARKED_BLOCK.finditer(text)]


def test_readme_marks_the_run_simulate_telnyx_cli_and_curl_commands() -> None:
    blocks = marked_blocks()
    assert [b.kind for b in blocks].count("demo") == 1
    runnable = "\n".join(b.body for b in blocks if b.kind == "run")
    for needed in (".venv/bin/kallglot-simulate-call", "telnyx_cli texml", "telnyx_cli call-control",
                   ".venv/bin/flask --app 'app:create_app()' numbers", "curl ", "/api/calls"):
        assert needed in runnable, f"README has no marked command with {needed!r}"
    # Every ```sh fence in the sections README's newcomer path runs through is marked one way or the other.
    text = README.read_text()
    top = text[:text.index("## Configuration")]
    assert top.count("```sh") == len(MARKED_BLOCK.findall(top)), "an unmarked sh block before ## Configuration"


def test_readme_commands_use_the_venv_executables() -> None:
    for block in marked_blocks():
        if block.kind == "skip":
            continue
        for line in block.body.splitlines():
            for command in re.split(r"&&|;", line):
                words = shlex.split(command, comments=True)
                if words and words[0] in ("python", "pip", "flask", "gunicorn", "pytest", "kallglot-bridge-demo",
                                          "kallglot-simulate-call"):
                    pytest.fail(f"README line {block.line}: {words[0]!r} is not the venv's (.venv/bin/…): {line}")


@pytest.mark.e2e
def test_readme_commands_work_as_pasted_against_a_demo(tmp_path: Path) -> None:
    blocks = marked_blocks()
    demo_block = next(b for b in blocks if b.kind == "demo")
    steps = [step.strip() for step in demo_block.body.split("&&")]
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -e '.[demo]'"], steps
    assert steps[2] == ".venv/bin/kallglot-bridge-demo"

    workdir = venv_workdir(tmp_path)  # .venv here is this test's venv: the install step is already done
    env = demo_environment()
    with run_demo(workdir, env, command=["bash", "-c", steps[2]]) as demo:
        outputs = []
        for block in (b for b in blocks if b.kind == "run"):
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.body], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS)
            assert done.returncode == 0, (f"README line {block.line} failed ({done.returncode}):\n{block.body}\n"
                                          f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n"
                                          f"--- demo\n{demo.output()[-4000:]}")
            assert "Traceback" not in done.stderr, done.stderr
            outputs.append(done.stdout)
        printed = "\n".join(outputs)
        assert '"session_id"' in printed  # the curl started an outbound call
        assert "+15005550006: mode=bidirectional_translation source=en target=es" in printed
        simulators = sum(b.body.count("kallglot-simulate-call") + b.body.count("telnyx_cli ") for b in blocks
                         if b.kind == "run")
        assert printed.count("-> heard.wav") == simulators, printed
        assert (workdir / "profiles.json").is_file()
