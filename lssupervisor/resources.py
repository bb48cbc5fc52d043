"""Files that ship with lssupervisor beside its code: the systemd units, the example config sets, the
demo application's migrations, and the Prometheus alert rules and Grafana dashboard.

In the source tree they live where people look for them (``systemd/``, ``config/``,
``examples/demo-app/migrations/``, ``monitoring/``); the build (``setup.py``) copies them into the package
(``lssupervisor/_data/...``), so an installed wheel has them without a checkout. :func:`path` finds
them in either place: the installed copy first, else the checkout this package was imported from (an
editable install, or a test run from the tree).

Standard library only: ``setup.py`` reads :data:`SHIPPED` from this file before anything is installed.
"""

from __future__ import annotations

from pathlib import Path

# name -> (directory in the source tree, directory inside the installed package)
SHIPPED: dict[str, tuple[str, str]] = {
    "systemd": ("systemd", "_data/systemd"),
    "config": ("config", "_data/config"),
    "demo-migrations": ("examples/demo-app/migrations", "_data/demo-migrations"),
    "monitoring": ("monitoring", "_data/monitoring"),
}

PACKAGE = Path(__file__).resolve().parent


class MissingResource(LookupError):
    """A shipped directory is in neither place: a broken installation."""


def path(name: str) -> Path:
    """The directory of the shipped files ``name`` (a key of :data:`SHIPPED`)."""
    source, installed = SHIPPED[name]
    candidates = [PACKAGE / installed]
    checkout = PACKAGE.parent
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / source)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = " nor ".join(str(c) for c in candidates)
    raise MissingResource(
        f"lssupervisor's {name} files are missing: neither {tried} exists; reinstall lssupervisor "
        "(pip install --force-reinstall lssupervisor)"
    )
