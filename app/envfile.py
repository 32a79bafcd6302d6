"""The running demo's environment file (``.demo/env``): the one place both sides agree on its format.

``kallglot-bridge-demo`` writes every setting it gave the bridge there (demo values only, mode 0600), so
``flask numbers …`` and the simulators work against a running demo without copying variables by hand. The
format is ``NAME=value`` with shell quoting, so ``set -a; . .demo/env; set +a`` loads it into a shell too.
Variables already in the environment always win over the file.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

#: Relative to the working directory: README's commands run from the repository root.
DEMO_ENV_FILE = Path(".demo") / "env"


def read_env_file(path: Path | str = DEMO_ENV_FILE) -> dict[str, str]:
    """The ``NAME=value`` lines of ``path`` (``{}`` when it does not exist); comments and blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, raw = line.partition("=")
        parts = shlex.split(raw, comments=False, posix=True)
        values[name.strip()] = parts[0] if parts else ""
    return values


def write_env_file(values: Mapping[str, str], path: Path | str = DEMO_ENV_FILE, *, header: str = "") -> Path:
    """Write ``values`` as shell-quoted ``NAME=value`` lines, readable by the owner only; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines()] + [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return target


def environment_with_demo(environ: Mapping[str, str] | None = None,
                          path: Path | str = DEMO_ENV_FILE) -> dict[str, str]:
    """``environ`` (default ``os.environ``) filled in from the demo's env file where a variable is unset."""
    env = dict(os.environ if environ is None else environ)
    return {**read_env_file(path), **env}
