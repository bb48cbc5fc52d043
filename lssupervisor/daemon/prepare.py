"""What a reconcile loads and renders: our config, the LS template, the migrations (discovered, never
imported: no migration code runs in the daemon) and the target; and the LS config rendered for one
schema version, with the identity (digest) of "how LS would run"."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lssupervisor import trust
from lssupervisor.config import Config, resolve_target
from lssupervisor.core.events import ConfigFailed
from lssupervisor.errors import ConfigError, MigrationError, SupervisorError
from lssupervisor.lsconfig import render as lsconfig
from lssupervisor.lsmodel import LsView
from lssupervisor.worker import migrations

log = logging.getLogger("lssupervisor.supervisor")


@dataclass(frozen=True, slots=True)
class Loaded:
    """Our config, the LS template, the migrations (discovered, never imported here) and the target,
    loaded and checked together at the start of a reconcile. A failed load keeps the previous one."""

    cfg: Config
    template: lsconfig.Template
    view: LsView
    target: int | None  # pinned (schema.target / target_file); None: the newest migration
    newest: int | None  # the newest migration's version (None: no migration source configured)


@dataclass(frozen=True, slots=True)
class Prepared:
    cfg: Config
    text: str
    view: LsView
    argv: tuple[str, ...]
    env: Mapping[str, str]
    version: int
    digest: str


def _digest(cfg: Config, text: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Identity of "how LS would run": rendered text, argv, environment and the spawn options."""
    ls = cfg.lightningstream
    doc = {
        "text": text,
        "argv": list(argv),
        "env": sorted(env.items()),
        "pdeathsig": ls.pdeathsig,
        "output": ls.output.value,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load(cfg: Config, base_env: Mapping[str, str]) -> Loaded:
    """Load and check the template, the migrations (discovery: names, gaps, literals, ownership; no
    code runs in the daemon) and the target. Raises SupervisorError with a one-line message.
    Every input that decides what runs must be trusted first (I8: :mod:`lssupervisor.trust`)."""
    policy = trust.Policy.for_config(cfg)
    trust.require(trust.check_inputs(cfg, base_env, policy))
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, base_env))
    source = cfg.migrations.path if cfg.migrations.path is not None else cfg.migrations.package
    newest: int | None = None
    if source is not None:
        found = migrations.discover(source, [spec.name for spec in view.lmdbs], policy)
        newest = found.newest
        if any(m.strategy is migrations.Strategy.PREFIX for m in found.migrations):
            lsconfig.check_prefix_safety(template, lsconfig.ls_environment(cfg, 0, base_env))
    target = resolve_target(cfg)
    if target is not None and newest is not None and target > newest:
        where = cfg.schema.target_file or f"{cfg.name}: schema.target"
        raise ConfigError(f"{where}: target version {target} is unknown: the migrations go up to {newest}")
    return Loaded(cfg=cfg, template=template, view=view, target=target, newest=newest)


def load_failed(exc: SupervisorError) -> ConfigFailed:
    """A failed :func:`load` as the core's event, naming what failed: a bad migration file is not a
    render problem. The exit code (at boot) is the error's own, as offline."""
    migration = isinstance(exc, MigrationError)
    what = "cannot load the migrations" if migration else "cannot load the configuration"
    return ConfigFailed(str(exc), what=what, exit_code=exc.exit_code)


def render_for(loaded: Loaded, version: int, base_env: Mapping[str, str]) -> Prepared:
    """Render the LS config for ``version`` (the LMDB's marker, I2) in memory. Raises SupervisorError."""
    cfg = loaded.cfg
    env = lsconfig.ls_environment(cfg, version, base_env)
    rendered = lsconfig.render(loaded.template, version, env)
    for warning in rendered.warnings:
        log.warning("%s", warning)
    ls = cfg.lightningstream
    argv = (ls.binary, "--config", str(cfg.rendered_config), *ls.args)
    return Prepared(
        cfg=cfg,
        text=rendered.text,
        view=rendered.view,
        argv=argv,
        env=env,
        version=version,
        digest=_digest(cfg, rendered.text, argv, env),
    )
