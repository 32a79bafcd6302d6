"""Build step (everything else is in pyproject.toml): ship the repo's top-level ``templates/`` inside the package
as ``app/templates``, so a non-editable install (a wheel, ``pip install .``) finds its templates wherever it runs.

An editable install needs no copy: :func:`app.factory.template_folder` falls back to the source tree's
``templates/``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).resolve().parent / "templates"


class BuildPyWithTemplates(build_py):
    """``build_py`` that also copies ``templates/`` to ``<build>/app/templates``."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            shutil.copytree(TEMPLATES, Path(self.build_lib) / "app" / "templates", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithTemplates})
