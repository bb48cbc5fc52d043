"""``lssupervisor run``: the daemon in the foreground (systemd, a container, a terminal)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from lssupervisor.config import load_config
from lssupervisor.daemon import lock
from lssupervisor.daemon.logs import setup_logging
from lssupervisor.daemon.supervisor import Supervisor
from lssupervisor.fsutil import ensure_private_dir
from lssupervisor.lsconfig import render as lsconfig


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if getattr(args, "log_format", None) or getattr(args, "log_level", None):
        log_cfg = dataclasses.replace(
            cfg.log,
            **{k: v for k, v in (("format", args.log_format), ("level", args.log_level)) if v},
        )
    else:
        log_cfg = cfg.log
    setup_logging(log_cfg.format, log_cfg.level)
    # The LMDBs to lock come from the template (their paths must not depend on the version).
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, os.environ))
    # 0700 whatever the umask: backups, history and the rendered LS config live here.
    ensure_private_dir(cfg.state_dir)
    with lock.acquire(cfg, view.lmdbs, "daemon") as held:
        return Supervisor(cfg, held=held).run()
