"""lssupervisor's own configuration: strict YAML into frozen dataclasses.

Every option is declared once, here, with its default and its documentation (``opt(...)``); the
configuration reference in ``docs/configuration.md`` is generated from these declarations
(``reference_markdown()``) and a test fails when the two drift apart.

Loading is strict: an unknown key, a wrong type or a bad value is one ``ConfigError`` line naming the
file and the dotted key, what was expected and what was found::

    lssupervisor.yaml: lightningstream.stop_timeout: expected a duration like 10s, got 'ten'

Relative paths are resolved against the directory of the config file, so a config set written by
``lssupervisor init`` works from any working directory.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from lssupervisor.core.states import OnFailure  # the core's vocabulary; re-exported for config users
from lssupervisor.durations import human as format_duration
from lssupervisor.durations import parse_seconds as parse_duration
from lssupervisor.errors import ConfigError, UsageError
from lssupervisor.trust import resolve_group

T = TypeVar("T")


class Duration(float):
    """Seconds, written in config as a Go-style duration: ``500ms``, ``10s``, ``1m30s``, ``2h``."""


class PathOpt(str):
    """A filesystem path; relative values are resolved against the config file's directory."""


def opt(default: Any, doc: str, *, example: str | None = None) -> Any:
    """Declare an option: its default and the one paragraph of documentation users read."""
    if isinstance(default, list | dict):
        def factory() -> Any:
            return type(default)(default)

        return field(default_factory=factory, metadata={"doc": doc, "example": example})
    return field(default=default, metadata={"doc": doc, "example": example})


class OutputMode(enum.Enum):
    INHERIT = "inherit"  # LS writes straight to our stderr (journald tags it with our unit)
    PREFIX = "prefix"  # we read LS's output and re-log each line with a prefix


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class LightningStreamConfig:
    binary: str = opt(
        "lightningstream",
        "The Lightning Stream binary: an absolute path, or a name looked up on PATH when LS starts.",
    )
    args: list[str] = opt(
        ["sync"],
        "Arguments after `--config <rendered config>`. Never passed through a shell. Do not add "
        "`--minimum-pid` (its re-exec orphans LS on stop); use `lightningstream.min_pid`.",
    )
    template: PathOpt = opt(
        PathOpt("lightningstream.yaml.in"),
        "The LS config template. `${<schema.variable>}` is replaced by the LMDB's schema version; "
        "any other `${VAR}` is left for LS to expand and must be set in LS's environment.",
    )
    config: PathOpt | None = opt(
        None,
        "Where the rendered LS config is written (mode 0600, atomically). "
        "Default: `<state_dir>/lightningstream.yaml`.",
    )
    env: dict[str, str] = opt(
        {}, "Extra environment variables for LS (on top of lssupervisor's own environment)."
    )
    stop_timeout: Duration = opt(
        Duration(10), "How long LS gets after SIGTERM to its process group before SIGKILL."
    )
    ready_timeout: Duration = opt(
        Duration(300),
        "How long LS may take to report `startup_<db>` on /healthz before the start counts as failed.",
    )
    settle_time: Duration = opt(
        Duration(3),
        "Readiness without LS HTTP: LS counts as ready after running this long.",
    )
    health_poll_interval: Duration = opt(Duration(0.5), "How often LS's /healthz is polled while starting.")
    min_pid: int = opt(
        0,
        "Raise the next PID above this before starting LS or a worker (what LS's `--minimum-pid` does, "
        "without its re-exec). For containers sharing an LMDB across PID namespaces. 0 disables.",
    )
    pdeathsig: bool = opt(
        True,
        "Start LS through `setpriv --pdeathsig KILL` so LS dies with a SIGKILLed supervisor.",
    )
    output: OutputMode = opt(
        OutputMode.INHERIT,
        "`inherit`: LS logs straight to our stderr. `prefix`: each LS line is re-logged as "
        "`lightningstream: <line>` (read by its own thread, so LS output never stalls the main loop).",
    )
    drain: bool = opt(
        False,
        "Before a migration, run `sync --only-once` on the old config to merge peers' last changes "
        "in and push ours out.",
    )
    drain_timeout: Duration = opt(Duration(60), "`--timeout` given to the drain run (LS exits 75 on expiry).")


@dataclass(frozen=True, slots=True)
class RestartConfig:
    initial_delay: Duration = opt(Duration(1), "First delay before restarting a crashed LS.")
    max_delay: Duration = opt(Duration(60), "Cap of the exponential backoff.")
    multiplier: float = opt(2.0, "Backoff growth factor per consecutive failure.")
    jitter: float = opt(0.2, "Random extra delay, as a fraction of the delay (0 disables).")
    reset_after: Duration = opt(
        Duration(60), "LS running healthy this long resets the backoff and the burst count."
    )
    burst_limit: int = opt(
        5, "This many crashes within `burst_window` park LS (down, waiting for an operator)."
    )
    burst_window: Duration = opt(Duration(300), "Window for `burst_limit`.")
    config_error_window: Duration = opt(
        Duration(5),
        "LS exiting 1 this soon after start with an unchanged config is reported as a config problem.",
    )


@dataclass(frozen=True, slots=True)
class SchemaConfig:
    variable: str = opt(
        "APP_SCHEMA_VERSION", "The template variable that carries the schema version."
    )
    marker_dbi: str = opt(
        "lssupervisor",
        "The synced DBI holding the per-instance schema markers (`schema_version/<instance>`).",
    )
    target: int | None = opt(
        None, "Pin the target schema version. Default: the newest migration (or `target_file`)."
    )
    target_file: PathOpt | None = opt(
        None,
        "A file holding the target version as a number; watched, so writing it triggers a reconcile.",
    )
    baseline: int | None = opt(
        None,
        "Version assumed for a non-empty LMDB without a marker (0: its data predates every migration, "
        "so all of them run). Unset: such an LMDB is refused (run `lssupervisor stamp N`).",
    )
    on_failure: OnFailure = opt(
        OnFailure.PARK,
        "After a failed migration: `park` keeps LS down until an operator acts; `resume` restarts LS "
        "on the version the LMDB has (safe: the config always follows the marker).",
    )


@dataclass(frozen=True, slots=True)
class MigrationsConfig:
    path: PathOpt | None = opt(
        PathOpt("migrations"), "Directory of migration files `NNNN_slug.py`."
    )
    package: str | None = opt(
        None,
        "Importable package of migration modules (instead of `path`; setting it unsets the default `path`).",
    )
    grow_map: bool = opt(
        False, "On MDB_MAP_FULL during a step, grow the LMDB map and retry the step once."
    )
    timeout: Duration | None = opt(
        None, "Cancel a migration that runs longer than this (the step's transaction aborts)."
    )
    import_timeout: Duration = opt(
        Duration(60),
        "Time limit for loading the migrations' code (their module-level code runs while LS still "
        "runs); on expiry the worker is killed, LS keeps running and the reason says so. Must be > 0.",
    )
    step_timeout: Duration = opt(
        Duration(3600),
        "Time limit for each migration step, and for the backup before the first one (LS is down "
        "meanwhile): on expiry the worker is killed, the step rolls back and `schema.on_failure` "
        "decides. Must be > 0.",
    )


@dataclass(frozen=True, slots=True)
class BackupConfig:
    enabled: bool = opt(
        True, "Take a verified compact backup of every LMDB before the first write of a migration."
    )
    dir: PathOpt | None = opt(None, "Backup directory. Default: `<state_dir>/backups`.")
    keep: int = opt(
        5,
        "How many backups to keep (oldest are removed after a new one is verified), never counting "
        "out a restore point: the newest backup of each schema version is always kept.",
    )


@dataclass(frozen=True, slots=True)
class HooksConfig:
    pre_migrate: list[list[str]] = opt(
        [], "Commands (argv lists) run before the backup, with LS stopped. A failure aborts."
    )
    post_migrate: list[list[str]] = opt(
        [], "Commands run after the migration is verified, before LS starts. A failure parks."
    )
    timeout: Duration = opt(Duration(300), "Time limit for each hook.")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    address: str = opt(
        "127.0.0.1:8265",
        "Our HTTP listener (/livez /readyz /status /metrics). Empty disables it. Read-only.",
    )


@dataclass(frozen=True, slots=True)
class WatchConfig:
    enabled: bool = opt(
        True, "Watch migrations, the template, this config and the target file; reconcile on change."
    )
    debounce: Duration = opt(
        Duration(1),
        "Quiet time after the last change before reconciling (at most 10 times this after the first "
        "change of a burst, so a file that keeps changing cannot hold a reconcile back).",
    )


@dataclass(frozen=True, slots=True)
class FleetConfig:
    watch: bool = opt(
        True,
        "The daemon lists the shared storage in the background (never in its main loop) and serves what "
        "it found at `/fleet` and as `lssupervisor_fleet_*` metrics. Needs read access to the storage "
        "(s3: `s3:ListBucket`), with LS's own credentials.",
    )
    interval: Duration = opt(
        Duration(60),
        "How often the daemon lists the storage; never more often than LS's `storage_poll_interval`.",
    )
    stale_after: Duration = opt(
        Duration(12 * 3600),
        "An instance whose newest snapshot is older than this is stale (`fleet --storage`, `/fleet`). "
        "LS uploads at least every `storage_force_snapshot_interval` (4h by default) while it runs.",
    )
    timeout: Duration = opt(
        Duration(10), "Time limit of each storage request (`check`'s probe, fleet, prune)."
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = opt(LogFormat.TEXT, "`text` (stable key=value lines) or `json`.")
    level: str = opt("info", "debug, info, warning or error.")


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    trusted_group: str | None = opt(
        None,
        "A group (name or gid) whose members are trusted like root and lssupervisor's own user: files "
        "and directories of the config, template, target file, migrations and hooks may belong to it "
        "and be writable by it. Unset: only root and our user (see docs/security.md). `check` says "
        "when it is in use.",
    )


@dataclass(frozen=True, slots=True)
class Config:
    state_dir: PathOpt = opt(
        PathOpt("state"),
        "Directory for `lock`, `state.json`, `history.jsonl`, `paused` and (by default) the "
        "rendered LS config and backups.",
    )
    lightningstream: LightningStreamConfig = field(
        default_factory=LightningStreamConfig, metadata={"doc": "The Lightning Stream child."}
    )
    restart: RestartConfig = field(
        default_factory=RestartConfig, metadata={"doc": "Restart policy for a crashed LS."}
    )
    schema: SchemaConfig = field(
        default_factory=SchemaConfig, metadata={"doc": "Schema versions and markers."}
    )
    migrations: MigrationsConfig = field(
        default_factory=MigrationsConfig, metadata={"doc": "Where the application's migrations are."}
    )
    backup: BackupConfig = field(default_factory=BackupConfig, metadata={"doc": "Backups."})
    hooks: HooksConfig = field(default_factory=HooksConfig, metadata={"doc": "Migration hooks."})
    http: HttpConfig = field(default_factory=HttpConfig, metadata={"doc": "Status HTTP server."})
    watch: WatchConfig = field(default_factory=WatchConfig, metadata={"doc": "File watching."})
    fleet: FleetConfig = field(
        default_factory=FleetConfig, metadata={"doc": "The fleet as the shared storage shows it."}
    )
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "Logging."})
    security: SecurityConfig = field(
        default_factory=SecurityConfig,
        metadata={"doc": "Who may write the files that decide what runs (docs/security.md)."},
    )
    # Not an option: where this config was loaded from (for messages and watching).
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})

    # Derived paths, so every module agrees on the defaults.
    @property
    def rendered_config(self) -> Path:
        return Path(self.lightningstream.config or Path(self.state_dir) / "lightningstream.yaml")

    @property
    def backup_dir(self) -> Path:
        return Path(self.backup.dir or Path(self.state_dir) / "backups")

    @property
    def lock_path(self) -> Path:
        return Path(self.state_dir) / "lock"

    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / "state.json"

    @property
    def history_file(self) -> Path:
        return Path(self.state_dir) / "history.jsonl"

    @property
    def paused_file(self) -> Path:
        return Path(self.state_dir) / "paused"

    @property
    def name(self) -> str:
        """How messages name this config file."""
        return self.source.name if self.source else "config"


# ---------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_strict(text: str, where: str) -> Any:
    """Parse YAML refusing duplicate keys; errors become one ConfigError line with the position."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}: {pos}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None


def _plural(tp: Any) -> str:
    """``list[str]`` -> "strings", ``list[list[str]]`` -> "lists of strings" (for ``_type_name``)."""
    if get_origin(tp) is list:
        return f"lists of {_plural(get_args(tp)[0])}"
    return _type_name(tp).removeprefix("a ").removeprefix("an ") + "s"


_SCALAR_NAMES: dict[Any, str] = {
    Duration: "a duration like 10s",
    PathOpt: "a path",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _type_name(tp: Any) -> str:
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    origin = get_origin(tp)
    if origin is list:
        return f"a list of {_plural(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return str(tp)


class _Loader:
    def __init__(self, where: str, base_dir: Path) -> None:
        self.where = where
        self.base_dir = base_dir

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {message}" if key else f"{self.where}: {message}")

    # Kept whole: one branch per config value type, each with its own error text.
    def convert(self, tp: Any, value: Any, key: str) -> Any:  # noqa: PLR0911, PLR0912
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if value is None:
                return None
            return self.convert(args[0], value, key)
        if dataclasses.is_dataclass(tp):
            return self.load_dataclass(tp, value, key)  # type: ignore[arg-type]
        if tp is Duration:
            if isinstance(value, bool):
                raise self.fail(key, f"expected a duration like 10s, got {value!r}")
            if isinstance(value, int | float):
                seconds = float(value)  # a bare number means seconds (unlike Go's nanoseconds)
            elif isinstance(value, str):
                try:
                    seconds = parse_duration(value)
                except ValueError:
                    raise self.fail(key, f"expected a duration like 10s, got {value!r}") from None
            else:
                raise self.fail(key, f"expected a duration like 10s, got {value!r}")
            if seconds < 0 or not math.isfinite(seconds):
                raise self.fail(key, f"expected a non-negative duration, got {value!r}")
            return Duration(seconds)
        if tp is PathOpt:
            if not isinstance(value, str) or not value:
                raise self.fail(key, f"expected a path, got {value!r}")
            expanded = os.path.expanduser(value)
            return PathOpt(os.path.normpath(self.base_dir / expanded))
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(key, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(key, f"expected a number, got {value!r}")
            if not math.isfinite(value):
                raise self.fail(key, f"expected a finite number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(key, f"expected a string, got {value!r}")
            return value
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if value == member.value:
                    return member
            raise self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
        if origin is list:
            (item_tp,) = get_args(tp)
            if not isinstance(value, list):
                raise self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
            return [self.convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            _, val_tp = get_args(tp)
            if not isinstance(value, dict):
                raise self.fail(key, f"expected a mapping, got {value!r}")
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise self.fail(key, f"expected string keys, got {k!r}")
                out[k] = self.convert(val_tp, v, f"{key}.{k}")
            return out
        raise TypeError(f"unsupported option type {tp!r} at {key}")  # a bug in this module

    def load_dataclass(self, cls: type[T], data: Any, prefix: str) -> T:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise self.fail(prefix, f"expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
            if raw_key not in fields:
                known = ", ".join(sorted(fields))
                raise self.fail(key, f"unknown option (known here: {known})")
            values[raw_key] = self.convert(hints[raw_key], value, key)
        for name, f in fields.items():
            # Sections left out still get their path defaults resolved against the config's directory.
            if name not in values and dataclasses.is_dataclass(hints[name]):
                values[name] = self.load_dataclass(hints[name], {}, f"{prefix}.{name}" if prefix else name)
            # Defaults that are paths are resolved like configured paths.
            elif name not in values and hints[name] is PathOpt and isinstance(f.default, str):
                values[name] = PathOpt(os.path.normpath(self.base_dir / f.default))
            elif name not in values and get_origin(hints[name]) in (Union, types.UnionType):
                inner = [a for a in get_args(hints[name]) if a is not type(None)]
                if inner and inner[0] is PathOpt and isinstance(f.default, str):
                    values[name] = PathOpt(os.path.normpath(self.base_dir / f.default))
        return cls(**values)


# LS's -c as pflag reads it: "-c FILE", "-cFILE", "-c=FILE", and after LS's boolean shorthands in one
# cluster ("-Hc FILE": dump -H, snapshots -l/-t). Not "--...", and not "-i..." whose value may hold a c.
_LS_SHORT_CONFIG = re.compile(r"-[Hlt]*c")


# Kept whole: one branch per cross-key rule, in the order the reference lists them.
def _validate(cfg: Config, where: str) -> None:  # noqa: PLR0912
    def bad(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    ls = cfg.lightningstream
    if not ls.binary:
        raise bad("lightningstream.binary", "must not be empty")
    if "--minimum-pid" in ls.args or any(a.startswith("--minimum-pid=") for a in ls.args):
        raise bad(
            "lightningstream.args",
            "--minimum-pid re-execs LS and orphans it on stop; use lightningstream.min_pid instead",
        )
    if any(a == "--config" or a.startswith("--config=") or _LS_SHORT_CONFIG.match(a) for a in ls.args):
        raise bad("lightningstream.args", "do not pass --config; lssupervisor passes the rendered config")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.schema.variable):
        raise bad("schema.variable", f"expected an environment variable name, got {cfg.schema.variable!r}")
    if ls.min_pid < 0 or ls.min_pid >= 4194304:
        raise bad("lightningstream.min_pid", f"expected 0..4194303, got {ls.min_pid}")
    # A time limit of 0 would fire at once (or, read as "none", keep LS down): refuse it by name.
    limits: tuple[tuple[str, float | None], ...] = (
        ("lightningstream.stop_timeout", ls.stop_timeout),
        ("lightningstream.ready_timeout", ls.ready_timeout),
        ("lightningstream.drain_timeout", ls.drain_timeout),
        ("hooks.timeout", cfg.hooks.timeout),
        ("migrations.timeout", cfg.migrations.timeout),
    )
    for key, limit in limits:
        if limit is not None and limit <= 0:
            raise bad(key, "must be greater than 0 (a time limit)")
    if ls.health_poll_interval <= 0:
        raise bad("lightningstream.health_poll_interval", "must be greater than 0")
    # Nothing may keep LS down without a deadline (I10): the limits exist and are never 0.
    for key, value in (
        ("migrations.import_timeout", cfg.migrations.import_timeout),
        ("migrations.step_timeout", cfg.migrations.step_timeout),
    ):
        if value <= 0:
            raise bad(key, "must be greater than 0 (a time limit; it cannot be turned off)")
    r = cfg.restart
    if r.initial_delay <= 0:
        raise bad("restart.initial_delay", "must be greater than 0")
    if r.max_delay < r.initial_delay:
        raise bad("restart.max_delay", "must not be smaller than restart.initial_delay")
    if r.multiplier < 1:
        raise bad("restart.multiplier", f"expected a number >= 1, got {r.multiplier}")
    if not 0 <= r.jitter <= 1:
        raise bad("restart.jitter", f"expected a fraction between 0 and 1, got {r.jitter}")
    if r.burst_limit < 1:
        raise bad("restart.burst_limit", f"expected an integer >= 1, got {r.burst_limit}")
    if cfg.schema.target is not None and cfg.schema.target < 1:
        raise bad("schema.target", f"expected a schema version >= 1, got {cfg.schema.target}")
    # 0 is a version like any other for data (what `stamp 0` records: before the first migration).
    if cfg.schema.baseline is not None and cfg.schema.baseline < 0:
        raise bad("schema.baseline", f"expected a schema version >= 0, got {cfg.schema.baseline}")
    if (cfg.migrations.path is None) == (cfg.migrations.package is None):
        raise bad("migrations", "set exactly one of migrations.path and migrations.package (not both)")
    if cfg.backup.keep < 1:
        raise bad("backup.keep", f"expected an integer >= 1, got {cfg.backup.keep}")
    hook_lists = (
        ("hooks.pre_migrate", cfg.hooks.pre_migrate),
        ("hooks.post_migrate", cfg.hooks.post_migrate),
    )
    for hook_key, hooks in hook_lists:
        for i, argv in enumerate(hooks):
            if not argv:
                raise bad(f"{hook_key}[{i}]", "expected a non-empty argv list")
    for key, value in (("fleet.interval", cfg.fleet.interval), ("fleet.timeout", cfg.fleet.timeout),
                       ("fleet.stale_after", cfg.fleet.stale_after)):
        if value <= 0:
            raise bad(key, "must be greater than 0")
    if cfg.http.address:
        parse_address(cfg.http.address, f"{where}: http.address")
    if cfg.security.trusted_group is not None:
        try:
            resolve_group(cfg.security.trusted_group)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise bad("log.level", f"expected debug, info, warning or error, got {cfg.log.level!r}")


def resolve_target(cfg: Config, override: int | None = None) -> int | None:
    """The target version the daemon and the offline commands work toward: ``override`` (``--to``)
    wins, then ``schema.target``, then the number in ``schema.target_file``; None means the newest
    migration."""
    if override is not None:
        if override < 0:
            raise UsageError(f"--to must be >= 0, got {override}")
        return override
    if cfg.schema.target is not None:
        return cfg.schema.target
    if cfg.schema.target_file is not None:
        path = Path(cfg.schema.target_file)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read schema.target_file: {exc.strerror}") from None
        # ASCII digits only: str.isdigit() also accepts "٣" and "²" (and int("²") then fails).
        if not re.fullmatch(r"[0-9]{1,18}", text):
            raise ConfigError(
                f"{path}: schema.target_file must hold a version number (ASCII digits), got {text[:40]!r}"
            )
        return int(text)
    return None


def parse_address(address: str, where: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` (all interfaces, like Go) into (host, port)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", address)
    if m is None or int(m.group("port")) > 65535:
        raise ConfigError(f"{where}: expected host:port like 127.0.0.1:8265, got {address!r}")
    host = m.group("v6") or m.group("host") or ""
    return host, int(m.group("port"))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate our config file. Raises ConfigError (one line) on any problem."""
    p = Path(path)
    where = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no such file (create one with `lssupervisor init DIR ...`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    # Absolute, but symlinks NOT resolved: in a Kubernetes ConfigMap volume the file is
    # NAME -> ..data/NAME -> ..<timestamp>/NAME, and an update deletes that timestamped directory.
    # Relative paths, reloads and the watcher must follow the name the operator gave.
    source = Path(os.path.abspath(p))
    return parse_config(text, where, source.parent, source=source)


def parse_config(text: str, where: str, base_dir: Path, source: Path | None = None) -> Config:
    data = load_yaml_strict(text, where)
    loader = _Loader(where, base_dir)
    cfg = loader.load_dataclass(Config, data, "")
    section = data.get("migrations") if isinstance(data, dict) else None
    if isinstance(section, dict) and section.get("package") and "path" not in section:
        # Naming a package means "not the default directory": no need to also write `path: null`.
        cfg = dataclasses.replace(cfg, migrations=dataclasses.replace(cfg.migrations, path=None))
    cfg = dataclasses.replace(cfg, source=source)
    _validate(cfg, where)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Reference documentation, generated from the declarations above


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:
        d = f.default_factory()
    else:
        return ""
    if d is None:
        return "unset"
    if isinstance(d, Duration):
        return format_duration(d)
    if isinstance(d, enum.Enum):
        return str(d.value)
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, str):
        return repr(d) if d == "" else d
    if isinstance(d, int | float):
        return str(d)  # yaml.safe_dump of a scalar is a document: "5\n...", which broke the table row
    return yaml.safe_dump(d, default_flow_style=True).strip()


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `lssupervisor config-reference` from lssupervisor/config.py; "
        "a test fails when this file drifts. Do not edit by hand. -->",
        "",
        "lssupervisor reads one YAML file (`-c`, default `/etc/lssupervisor/lssupervisor.yaml`). "
        "Unknown keys are errors. Relative paths are relative to the file's directory. Durations are "
        "Go-style strings (`500ms`, `10s`, `1m30s`) or a number of seconds.",
        "",
    ]

    def walk(cls: type[Any], prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows: list[tuple[str, str, str, str]] = []
        nested: list[tuple[str, type[Any], str]] = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((key, tp, f.metadata.get("doc", "")))  # type: ignore[arg-type]
                continue
            tp_inner = tp
            if get_origin(tp) in (Union, types.UnionType):
                tp_inner = next(a for a in get_args(tp) if a is not type(None))
            rows.append((key, _type_name(tp_inner), _default_text(f), f.metadata.get("doc", "")))
        if rows:
            lines.append("| key | type | default | meaning |")
            lines.append("| --- | --- | --- | --- |")
            for key, tname, default, doc in rows:
                lines.append(f"| `{key}` | {tname} | `{default}` | {doc} |")
            lines.append("")
        for key, tp, doc in nested:
            lines.append(f"## `{key}`")
            lines.append("")
            if doc:
                lines.append(doc)
                lines.append("")
            walk(tp, f"{key}.")

    lines.append("## Top level")
    lines.append("")
    walk(Config, "")
    return "\n".join(lines).rstrip() + "\n"
