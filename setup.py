"""Build hook only (the metadata is in pyproject.toml): ship the files that live beside the package in
the source tree (systemd units, example config sets, the demo's migrations) inside it, so that a wheel
installed anywhere has them. ``lssupervisor/resources.py`` names them and finds them at run time."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Read from the module itself (stdlib only), without importing the package: one list of what ships.
SHIPPED: dict[str, tuple[str, str]] = runpy.run_path(str(ROOT / "lssupervisor" / "resources.py"))["SHIPPED"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


class BuildPyWithShippedFiles(build_py):
    """``build_py`` that also copies SHIPPED into ``<build_lib>/lssupervisor/``. An editable install
    skips it: there resources.path() finds the files in the checkout itself."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for source, installed in SHIPPED.values():
            target = Path(self.build_lib) / "lssupervisor" / installed
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / source, target, ignore=IGNORE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs: list[str] = list(super().get_outputs(include_bytecode))
        if getattr(self, "editable_mode", False):
            return outputs
        for source, installed in SHIPPED.values():
            for path in sorted((ROOT / source).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                    rel = path.relative_to(ROOT / source)
                    outputs.append(str(Path(self.build_lib) / "lssupervisor" / installed / rel))
        return outputs


cmdclass: dict[str, Any] = {"build_py": BuildPyWithShippedFiles}
setup(cmdclass=cmdclass)
