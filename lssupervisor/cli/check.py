"""``lssupervisor check -c FILE``: is this config set ready to run? One line per finding.

Checked, in order (a failure of an early step skips the steps that depend on it):

1. our config loads (strict keys, types, values), and every file that decides what runs is trusted:
   our config, the template, the target file, hook executables, the LS binary and each directory on
   the way to them (owned by root or us, not writable by group or others: :mod:`lssupervisor.trust`);
   a warning for an HTTP listener beyond loopback;
2. the LS template loads and its LMDB paths and instance do not depend on the schema version;
3. the migrations directory and files are trusted like the files of step 1, discoverable and valid
   (names, literals, gaps; never executed here), and when any
   uses the ``prefix`` strategy the template's storage location contains the version variable;
4. the target resolves as the daemon resolves it (``config.resolve_target``: ``schema.target``, then
   ``schema.target_file``, else the newest migration) and is a known version; the template renders for
   it in the environment LS will get (every variable set, no ``$`` that LS would mangle) and passes
   LS's own rules;
5. the LS binary exists, and accepts the rendered config (``lightningstream -c FILE``);
6. the environment: ``setpriv`` present when ``pdeathsig`` is on, no secret-looking values in
   ``lightningstream.env``, the state directory usable;
7. the storage the rendered config names, read-only and within ``fleet.timeout`` (skipped with
   ``--offline``): s3 — the bucket exists, the credentials are accepted, listing is allowed; fs — the
   root is a writable directory (or LS can create it). And each ``new-dbi`` migration's ``REPLACES``.

Exit status: ExitCode.CONFIG when there is any error, 0 otherwise (warnings included).
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lssupervisor import trust
from lssupervisor.config import Config, load_config, parse_address, resolve_target
from lssupervisor.errors import ExitCode, SupervisorError
from lssupervisor.fsutil import write_atomic
from lssupervisor.lsconfig.binary import resolve_binary, validate_with_binary
from lssupervisor.lsconfig.render import (
    Template,
    check_prefix_safety,
    inspect_template,
    lenient_env,
    load_template,
    ls_environment,
    render,
    storage_settings,
)
from lssupervisor.lsmodel import LsView
from lssupervisor.worker import migrations


class Level(enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    OK = "ok"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    message: str

    def line(self) -> str:
        return f"{self.level.value}: {self.message}"


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.findings.append(Finding(Level.ERROR, message))

    def warning(self, message: str) -> None:
        self.findings.append(Finding(Level.WARNING, message))

    def ok(self, message: str) -> None:
        self.findings.append(Finding(Level.OK, message))

    def count(self, level: Level) -> int:
        return sum(1 for f in self.findings if f.level is level)


_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|ACCOUNT_KEY|CREDENTIAL", re.IGNORECASE)


def _check_migrations(
    cfg: Config, template: Template, view: LsView, env: dict[str, str], report: Report
) -> int | None:
    """Step 3. Returns the newest migration version (None when unknown)."""
    source = cfg.migrations.package or cfg.migrations.path
    assert source is not None  # config validation requires exactly one of them
    policy = trust.Policy.for_config(cfg)
    try:
        scanned = migrations.scan(source, [spec.name for spec in view.lmdbs], policy)
    except SupervisorError as exc:
        report.error(str(exc))
        return None
    # Every problem at once, one line each (file and line), so one edit-and-check round fixes them all.
    for problem in scanned.problems:
        report.error(problem)
    if scanned.problems:
        return None
    found = scanned.as_set()
    for mig in found.migrations:
        line = migrations.unwritten_line(mig.path)
        if line is not None:
            report.warning(
                f"{mig.path}:{line}: upgrade() is still the scaffold `lssupervisor new` wrote (it raises "
                "NotImplementedError): write the migration before you ship it"
            )
    prefix_users = [m.name for m in found.migrations if m.strategy.value == "prefix"]
    try:
        for warning in check_prefix_safety(template, env):
            report.warning(warning)
    except SupervisorError as exc:
        if prefix_users:
            report.error(f"{exc} [migrations using prefix: {', '.join(prefix_users)}]")
        else:
            report.warning(f"{exc} [no migration uses prefix yet; it is the default strategy]")
    newest = int(found.newest)
    report.ok(f"{len(found.migrations)} migration(s) in {found.directory}, newest version {newest}")
    for mig in found.migrations:
        for dbi in mig.replaces:
            if dbi == cfg.schema.marker_dbi:
                report.error(f"{mig.path}: REPLACES {dbi!r} is lssupervisor's marker DBI "
                             "(schema.marker_dbi); it can never be retired: remove it from REPLACES")
            else:
                report.ok(f"{mig.name} replaces DBI {dbi} (LMDB {mig.lmdb}): `lssupervisor prune --below "
                          f"{mig.version}` retires it once every instance runs version {mig.version}")
    return newest


def _check_target(cfg: Config, newest: int | None, report: Report) -> int | None:
    """The pinned target (None: the newest migration), resolved by the one function the daemon and
    the offline commands use, so check renders what they would."""

    try:
        target = resolve_target(cfg, None)
    except SupervisorError as exc:
        report.error(str(exc))
        return None
    source = "the newest migration"
    if cfg.schema.target is not None:
        source = "schema.target"
        if cfg.schema.target_file is not None:
            report.warning(
                f"schema.target ({cfg.schema.target}) is set and wins over schema.target_file "
                f"{cfg.schema.target_file}: writing the file changes nothing; unset schema.target to use it"
            )
    elif cfg.schema.target_file is not None:
        source = f"schema.target_file {cfg.schema.target_file}"
        if target is None:
            report.warning(
                f"schema.target_file {cfg.schema.target_file} does not exist: the target is the newest "
                f"migration ({'unknown' if newest is None else newest}); write the version to pin it"
            )
    if target is None:
        return None
    if newest is not None and target > newest:
        report.error(
            f"{source}: target version {target} is above the newest migration {newest}; the daemon would "
            "park at planning: install the migration file(s) or lower the target"
        )
    else:
        report.ok(f"target version {target} from {source}")
    return target


def _check_binary(cfg: Config, text: str, env: dict[str, str], report: Report) -> None:
    """Step 5: the binary exists and accepts the rendered config."""
    binary = cfg.lightningstream.binary
    path = resolve_binary(binary)
    if path is None:
        report.warning(
            f"lightningstream.binary {binary!r} not found (or not executable): LS cannot be started until "
            "it is installed; LS's own validation of the rendered config was skipped"
        )
        return
    with tempfile.TemporaryDirectory(prefix="lssupervisor-check-") as tmp:
        candidate = Path(tmp) / "lightningstream.yaml"
        write_atomic(candidate, text, keep_previous=False)
        try:
            validate_with_binary(path, candidate, env)
        except SupervisorError as exc:
            report.error(str(exc))
            return
    report.ok(f"{path} accepts the rendered config")


def _check_trust(cfg: Config, environ: dict[str, str], report: Report) -> None:
    """Step 1b: every input that decides what runs, and each directory on the way to it, may be
    written only by root or our user (I8; the migrations are checked in step 3)."""
    policy = trust.Policy.for_config(cfg)
    for violation in trust.check_inputs(cfg, environ, policy):
        report.error(violation.line())
    if policy.trusted_gid is not None:
        report.warning(
            f"security.trusted_group: members of group {trust.group_name(policy.trusted_gid)} (gid "
            f"{policy.trusted_gid}) may write the config, template, target file, migrations and hooks, "
            "and so run code as this user; unset it unless that is intended"
        )


def _check_http(cfg: Config, report: Report) -> None:
    """Our HTTP listener serves /status (paths, argv, versions) without authentication."""
    if not cfg.http.address:
        return
    host, _ = parse_address(cfg.http.address, f"{cfg.name}: http.address")
    if not _is_loopback(host):
        report.warning(
            f"{cfg.name}: http.address {cfg.http.address!r} listens beyond loopback: /status and /metrics "
            "(paths, LS argv, versions, state) are readable by anyone who reaches it, without "
            "authentication; prefer 127.0.0.1, or restrict it (firewall, Kubernetes NetworkPolicy)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (all interfaces) or a host name that may resolve anywhere


def _check_environment(cfg: Config, report: Report) -> None:
    """Step 6."""
    if cfg.lightningstream.pdeathsig and shutil.which("setpriv") is None:
        report.warning(
            "lightningstream.pdeathsig: setpriv (util-linux) not found; LS would not die with a SIGKILLed "
            "supervisor (install util-linux or set pdeathsig: false knowingly)"
        )
    for name in cfg.lightningstream.env:
        if _SECRET_NAME.search(name):
            report.warning(
                f"{cfg.name}: lightningstream.env.{name} looks like a secret written in a config file; pass "
                "it in lssupervisor's environment instead (e.g. systemd EnvironmentFile=)"
            )
    state = Path(cfg.state_dir)
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.error(f"state_dir {state}: {existing} is a file, not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        report.error(f"state_dir {state}: {existing} is not writable by this user")


def _check_storage(
    cfg: Config, template: Template, version: int, env: dict[str, str], report: Report
) -> None:
    """Step 7: can this instance (and so LS, with the same credentials) reach the storage?"""
    from lssupervisor.storage import location

    try:
        settings = storage_settings(template, version, env)
        report.ok(location.probe(settings, timeout=float(cfg.fleet.timeout)))
    except SupervisorError as exc:
        report.error(str(exc))


def run_checks(config_path: str, environ: dict[str, str] | None = None, *, offline: bool = False) -> Report:
    report = Report()
    base = dict(os.environ if environ is None else environ)
    try:
        cfg = load_config(config_path)
    except SupervisorError as exc:
        report.error(str(exc))
        return report
    report.ok(f"{config_path}: config loads")
    _check_trust(cfg, base, report)
    _check_http(cfg, report)
    _check_environment(cfg, report)

    try:
        template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    except SupervisorError as exc:
        report.error(str(exc))
        return report
    try:
        view = inspect_template(template, ls_environment(cfg, 0, base))
    except SupervisorError as exc:
        report.error(str(exc))
        try:
            # Unset variables: keep checking what does not depend on their values.
            view = inspect_template(template, lenient_env(ls_environment(cfg, 0, base)))
        except SupervisorError:
            return report
    lmdbs = ", ".join(f"{s.name}={s.path}" for s in view.lmdbs)
    report.ok(f"{template.path}: instance {view.instance}, lmdbs {lmdbs}, storage {view.storage_type}")

    newest = _check_migrations(cfg, template, view, ls_environment(cfg, 0, base), report)
    # The version the daemon would stamp a new LMDB with: the target exactly as the daemon and the
    # offline commands resolve it (schema.target, then schema.target_file), else the newest migration
    # (0 when the application ships none yet); 1 only when the migrations could not be read.
    version = newest if newest is not None else 1
    target = _check_target(cfg, newest, report)
    if target is not None:
        version = target
    env = ls_environment(cfg, version, base)
    try:
        rendered = render(template, version, env)
    except SupervisorError as exc:
        if Finding(Level.ERROR, str(exc)) not in report.findings:
            report.error(str(exc))
        return report
    for warning in rendered.warnings:
        report.warning(warning)
    report.ok(f"template renders for version {version}: storage {rendered.view.storage_location}")
    _check_binary(cfg, rendered.text, env, report)
    if not offline:
        _check_storage(cfg, template, version, env, report)
    return report


def cmd_check(args: argparse.Namespace) -> int:
    report = run_checks(args.config, offline=bool(getattr(args, "offline", False)))
    # The findings are this command's output: all on stdout, one line each, in check order.
    for finding in report.findings:
        print(finding.line())
    errors, warnings = report.count(Level.ERROR), report.count(Level.WARNING)
    print(f"check: {errors} error(s), {warnings} warning(s) in {args.config}")
    return int(ExitCode.CONFIG) if errors else int(ExitCode.OK)
