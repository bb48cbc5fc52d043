"""Minimal config sets for the offline checks (``lssupervisor check``, ``new``): our YAML, an LS
template with fs storage, migration files, a fake LS binary."""

from __future__ import annotations

from pathlib import Path

TEMPLATE = """\
instance: node-1
lmdbs:
  main:
    path: {db}
    schema_tracks_changes: true
storage:
  type: fs
  options:
    root_path: {root}
"""


def config_set(
    tmp_path: Path,
    *,
    root: str = "/srv/ls/v${APP_SCHEMA_VERSION}",
    template: str | None = None,
    binary: str | None = None,
    extra: str = "",
) -> Path:
    (tmp_path / "migrations").mkdir(exist_ok=True)
    text = template if template is not None else TEMPLATE.format(db=tmp_path / "db", root=root)
    (tmp_path / "lightningstream.yaml.in").write_text(text)
    cfg = tmp_path / "lssupervisor.yaml"
    cfg.write_text(
        "state_dir: state\n"
        "lightningstream:\n"
        f"  binary: {binary or str(tmp_path / 'no-such-ls')}\n"
        "  pdeathsig: false\n"
        f"{extra}"
    )
    return cfg


def migration(tmp_path: Path, version: int, strategy: str) -> None:
    (tmp_path / "migrations" / f"{version:04d}_step_{version}.py").write_text(
        f'"""Step {version}."""\nVERSION = {version}\nSTRATEGY = "{strategy}"\n\n'
        "\ndef upgrade(m):\n    pass\n"
    )


def fake_ls(tmp_path: Path, body: str) -> str:
    p = tmp_path / "fake-ls"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)
