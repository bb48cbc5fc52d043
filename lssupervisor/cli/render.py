"""``lssupervisor render-config`` and ``lssupervisor config-reference``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lssupervisor.errors import UsageError
from lssupervisor.lsconfig.render import Template, inspect_template, load_template, ls_environment, render

if TYPE_CHECKING:
    from lssupervisor.config import Config





def _marker_version(cfg: Config, template: Template, env: Mapping[str, str]) -> int:
    """The schema version the LMDBs have for our instance, read by a worker process (the CLI never
    opens an LMDB itself, like the daemon)."""
    from lssupervisor.worker.client import read_schema_version

    version = read_schema_version(cfg, inspect_template(template, env))
    if version is None:
        raise UsageError("render-config: the LMDB has no schema marker yet; give --version N")
    return version


def cmd_render_config(args: argparse.Namespace) -> int:
    from lssupervisor.config import load_config

    cfg = load_config(args.config)
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    version = args.schema_version
    if version is None:
        version = _marker_version(cfg, template, ls_environment(cfg, 0, os.environ))
    if version < 0:
        raise UsageError(f"render-config: --version must be >= 0, got {version}")
    rendered = render(template, version, ls_environment(cfg, version, os.environ))
    for warning in rendered.warnings:
        print(f"lssupervisor: warning: {warning}", file=sys.stderr)
    sys.stdout.write(rendered.text)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from lssupervisor.config import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0
