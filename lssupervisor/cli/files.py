"""``lssupervisor files`` and ``lssupervisor install-units``: the files that ship with lssupervisor, for
someone who installed it with pip and has no checkout.

``files`` prints where the shipped directories are (the systemd units, the example config sets, the
demo's migrations); ``files NAME`` prints one path, for ``cp -r "$(lssupervisor files config)/pdns" ...``.

``install-units [DIR]`` copies both units into DIR (default ``/etc/systemd/system``). The units say
``ExecStart=lssupervisor ...``: systemd (239 and later) looks a bare name up in its own fixed search
path, ``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`` (never ``$PATH``), which covers a
distribution package (``/usr/bin``) and a system-wide pip or pipx install (``/usr/local/bin``). When the
``lssupervisor`` running this command is not what systemd would find there (a virtualenv in
``/opt/lssupervisor``, say), it also writes a drop-in per unit, ``<unit>.d/10-exec-path.conf``, that
resets ``ExecStart=`` to this executable's absolute path. The unit files themselves are never edited:
site changes belong in drop-ins.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from lssupervisor import resources
from lssupervisor.errors import SupervisorError, UsageError

DEFAULT_UNIT_DIR = "/etc/systemd/system"
# systemd's compiled-in lookup path for a bare ExecStart= name (split-usr order; merged-usr systems
# resolve the same files through the /bin and /sbin symlinks).
SYSTEMD_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
EXEC_NAME = "lssupervisor"
DROPIN_NAME = "10-exec-path.conf"

_DESCRIPTIONS = {
    "systemd": "the systemd units (`lssupervisor install-units DIR` installs them)",
    "config": "example config sets: generic/ and pdns/ (PowerDNS Authoritative)",
    "demo-migrations": "the demo application's migrations (`lssupervisor demo`)",
    "monitoring": "Prometheus alert rules and their tests, the Grafana dashboard",
}


def cmd_files(args: argparse.Namespace) -> int:
    if args.name:
        print(resources.path(args.name))
        return 0
    width = max(len(name) for name in resources.SHIPPED)
    for name in resources.SHIPPED:
        print(f"{name.ljust(width)}  {resources.path(name)}  {_DESCRIPTIONS[name]}")
    return 0


def our_executable() -> Path | None:
    """The ``lssupervisor`` script of this installation: the one running, else the one beside this
    Python (a virtualenv's bin/), else the first on PATH."""
    argv0 = Path(sys.argv[0])
    if argv0.name == EXEC_NAME and argv0.is_file():
        return Path(os.path.abspath(argv0))
    beside = Path(sys.executable).parent / EXEC_NAME
    if beside.is_file():
        return beside
    found = shutil.which(EXEC_NAME)
    return Path(found) if found else None


def systemd_would_run(search_path: Sequence[str] = SYSTEMD_SEARCH_PATH) -> Path | None:
    """What systemd starts for ``ExecStart=lssupervisor``: the first executable of that name in its
    search path."""
    for directory in search_path:
        candidate = Path(directory) / EXEC_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _exec_start(unit_text: str) -> str:
    for line in unit_text.splitlines():
        if line.startswith(f"ExecStart={EXEC_NAME} "):
            return line.removeprefix(f"ExecStart={EXEC_NAME} ")
    raise SupervisorError(f"the shipped unit has no `ExecStart={EXEC_NAME} ...` line (a packaging bug)")


def _write(path: Path, text: str, force: bool, written: list[str]) -> None:
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            written.append(f"unchanged {path}")
            return
        if not force:
            raise UsageError(
                f"{path} exists and differs from the shipped file; pass --force to replace it "
                "(site changes belong in a drop-in: systemctl edit lssupervisor)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(path)
    written.append(f"wrote {path}")


def install_units(
    directory: Path,
    *,
    force: bool = False,
    executable: Path | None = None,
    search_path: Sequence[str] = SYSTEMD_SEARCH_PATH,
) -> list[str]:
    """Copy the units into ``directory`` (and a drop-in per unit when systemd would not find
    ``executable``). Returns one line per file, for the user."""
    exe = executable if executable is not None else our_executable()
    found = systemd_would_run(search_path)
    needs_dropin = exe is not None and (found is None or not _same(found, exe))
    written: list[str] = []
    try:
        for unit in sorted(resources.path("systemd").glob("*.service")):
            text = unit.read_text(encoding="utf-8")
            _write(directory / unit.name, text, force, written)
            dropin = directory / f"{unit.name}.d" / DROPIN_NAME
            if needs_dropin:
                assert exe is not None
                why = (
                    f"systemd would start {found} instead" if found is not None
                    else "systemd would not find it"
                )
                _write(
                    dropin,
                    f"# Written by `lssupervisor install-units`: {EXEC_NAME} is {exe}, and {why} in its\n"
                    f"# search path ({':'.join(search_path)}).\n"
                    "[Service]\n"
                    "ExecStart=\n"
                    f"ExecStart={exe} {_exec_start(text)}\n",
                    True,
                    written,
                )
            elif dropin.exists() and dropin.read_text(encoding="utf-8").startswith(
                "# Written by `lssupervisor install-units`"
            ):
                dropin.unlink()  # ours, and no longer needed: systemd finds this lssupervisor itself
                written.append(f"removed {dropin}")
    except OSError as exc:
        raise UsageError(
            f"install-units: cannot write into {directory}: {exc.strerror or exc} (run it as root, or "
            "name another directory)"
        ) from None
    if exe is None:
        written.append(
            f"warning: no {EXEC_NAME} executable found for this installation; the units run the "
            f"{EXEC_NAME} that systemd finds in {':'.join(search_path)}"
        )
    return written


def cmd_install_units(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    for line in install_units(directory, force=args.force):
        print(line)
    print(
        "next: give the unit the user that owns the LMDB and its directory (`systemctl edit "
        "lssupervisor`: User=, Group=, ReadWritePaths=), write /etc/lssupervisor/lssupervisor.yaml "
        "(`lssupervisor init /etc/lssupervisor --state-dir /var/lib/lssupervisor ...`), then "
        "`systemctl daemon-reload && systemctl enable --now lssupervisor` (docs/systemd.md)"
    )
    return 0
