"""The Lightning Stream config: render the template for a schema version, check it as LS would, write it.

Theory of operation
-------------------
LS loads its config as: read text -> Go ``os.ExpandEnv`` over the WHOLE text (comments too) -> strict
YAML (yaml.v2 ``UnmarshalStrict``: unknown or duplicate keys are errors) -> ``Config.Check()``. An unset
variable silently becomes ``""``, ``${VAR:-default}`` becomes ``""`` and a literal ``$`` cannot be
written. So a template mistake does not fail loudly in LS; it syncs to the wrong place.

``render`` therefore:

1. scans the template for ``$`` exactly as Go's ``os.Expand`` does (same tokenisation, so ``$$X`` or
   ``${VAR:-x}`` are seen as LS sees them);
2. replaces OUR variable (``schema.variable``, both ``${V}`` and ``$V``) by the version, literally: the
   written file never depends on LS's environment for the one value that must be right;
3. leaves every other variable for LS (secrets stay out of files) but refuses an unset one, warns about
   a set-but-empty one and about every ``$`` that LS would mangle;
4. expands the result with Go's rules and the environment LS will get, and validates it like LS
   (strict keys against LS ``config/config.go`` and the storage backends' options, types, ``Check()``),
   plus what lssupervisor itself needs (an explicit instance, a known storage type);
5. returns the text to write and the ``LsView`` the daemon and workers act on.

Substituting digits for our variable cannot create a new ``$`` construct: a ``$`` directly before our
reference is itself a ``$$`` special variable in Go's scan, which we leave untouched. Hence, for any
environment ``env``: ``go_expand(rendered, env) == go_expand(template, env | {V: version})``.

No code is copied from LS; the rules were read from LS v1.0 (``config/config.go``,
``cmd/lightningstream/commands/root.go``, ``syncer/utils.go``), simpleblob's backends and Go's
``os/env.go``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lssupervisor import sdnotify
from lssupervisor.errors import ConfigError, TemplateError, UsageError
from lssupervisor.lsmodel import DEFAULT_MAX_DBS, LmdbSpec, LsView

if TYPE_CHECKING:
    from lssupervisor.config import Config

# ---------------------------------------------------------------------------------------------------
# Go os.Expand, reimplemented from its documented behaviour (src/os/env.go)

# Shell parameter-expansion operators people expect to work inside ${...}; Go has none of them.
_SHELL_OPERATORS = (":-", "-", ":=", "=", ":?", "?", ":+", "+")
_GO_SPECIAL = frozenset("*#$@!?-0123456789")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _go_alnum(c: str) -> bool:
    return c == "_" or "0" <= c <= "9" or "a" <= c <= "z" or "A" <= c <= "Z"


def _go_shell_name(s: str, start: int) -> tuple[str, int]:
    """Go's ``getShellName`` on ``s[start:]`` (the text after a ``$``): (name, characters consumed).
    ``("", w > 0)`` is invalid syntax whose characters are eaten; ``("", 0)`` means "no name"."""
    n = len(s)
    if s[start] == "{":
        if start + 2 < n and s[start + 1] in _GO_SPECIAL and s[start + 2] == "}":
            return s[start + 1], 3
        close = s.find("}", start + 1)
        if close == -1:
            return "", 1  # "${" with no closing brace: Go eats the two characters
        if close == start + 1:
            return "", 2  # "${}": eaten
        return s[start + 1 : close], close - start + 1
    if s[start] in _GO_SPECIAL:
        return s[start], 1
    i = start
    while i < n and _go_alnum(s[i]):
        i += 1
    return s[start:i], i - start


@dataclass(frozen=True, slots=True)
class DollarRef:
    """One ``$`` as Go's os.Expand sees it. ``text[start:end]`` is what Go consumes."""

    start: int
    end: int
    name: str  # "" when the syntax is invalid (eaten) or when the $ has no name (kept)
    eaten: bool  # Go deletes text[start:end]
    braced: bool

    @property
    def kept(self) -> bool:
        """A ``$`` followed by something that is not a name: Go leaves it alone."""
        return not self.name and not self.eaten


def scan_dollars(text: str) -> list[DollarRef]:
    """Every ``$`` construct of ``text`` in Go's os.Expand tokenisation, in order."""
    refs: list[DollarRef] = []
    n = len(text)
    j = text.find("$")
    while j != -1 and j + 1 < n:
        name, w = _go_shell_name(text, j + 1)
        eaten = not name and w > 0
        refs.append(DollarRef(start=j, end=j + 1 + w, name=name, eaten=eaten, braced=text[j + 1] == "{"))
        j = text.find("$", j + 1 + w)
    return refs


def go_expand(text: str, mapping: Callable[[str], str]) -> str:
    """Go ``os.Expand``: ``${VAR:-x}`` looks up the variable named ``VAR:-x``, ``$$``/``$1`` are the
    special variables ``$``/``1``, ``${}`` and an unclosed ``${`` are deleted, a ``$`` before a
    non-name character stays."""
    out: list[str] = []
    pos = 0
    for ref in scan_dollars(text):
        out.append(text[pos : ref.start])
        if ref.kept:
            out.append("$")
        elif ref.name:
            out.append(mapping(ref.name))
        pos = ref.end
    out.append(text[pos:])
    return "".join(out)


def go_expand_env(text: str, env: Mapping[str, str]) -> str:
    """Go ``os.ExpandEnv`` against ``env``: an unset variable becomes ``""``, silently."""
    return go_expand(text, lambda name: env.get(name, ""))


# ---------------------------------------------------------------------------------------------------
# Go value syntaxes LS uses in its config

_GO_UNITS_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
                "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)([a-zµμ]+)")


def parse_go_duration(text: str) -> int:
    """Go ``time.ParseDuration`` into nanoseconds. Raises ValueError."""
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _GO_DURATION.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r} (expected a number and a unit like 5s)")
        unit = _GO_UNITS_NS.get(m.group(2))
        if unit is None:
            raise ValueError(f"unknown unit {m.group(2)!r} in duration {text!r}")
        whole, _, frac = m.group(1).partition(".")
        total += int(whole or "0") * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        pos = m.end()
    return sign * total


_BYTE_UNITS: dict[str, int] = {"": 1, "b": 1, "byte": 1}
for _power, _names in enumerate(
    (
        ("k", "kb", "kilo", "kilobyte", "kilobytes"),
        ("m", "mb", "mega", "megabyte", "megabytes"),
        ("g", "gb", "giga", "gigabyte", "gigabytes"),
        ("t", "tb", "tera", "terabyte", "terabytes"),
        ("p", "pb", "peta", "petabyte", "petabytes"),
        ("e", "eb"),
    ),
    start=1,
):
    for _name in _names:
        _BYTE_UNITS[_name] = 1 << (10 * _power)


def parse_bytesize(text: str) -> int:
    """``datasize.ByteSize`` text as LS's ``map_size`` takes it: ``1GB`` = 2**30, a plain number is
    bytes, units are powers of 1024 and case-insensitive, ``Gb`` (bits) is refused. Raises ValueError."""
    m = re.match(r"[0-9]+", text)
    if m is None:
        raise ValueError(f"invalid size {text!r} (expected a number with an optional unit like 1GB)")
    unit = text[m.end() :].strip()
    if unit in ("Kb", "Mb", "Gb", "Tb", "Pb", "Eb"):
        raise ValueError(f"invalid size {text!r}: lower-case b means bits; write {unit[0]}B")
    mult = _BYTE_UNITS.get(unit.lower())
    if mult is None:
        raise ValueError(f"invalid size {text!r} (unknown unit {unit!r})")
    value = int(m.group(0)) * mult
    if value >= 1 << 64:
        raise ValueError(f"size {text!r} out of range")
    return value


_INSTANCE_UNSAFE = re.compile(r"[^a-zA-Z0-9-]")


def sanitize_instance(name: str) -> str:
    """What LS makes of an instance name (``syncer.instanceID``): other characters become ``-``."""
    return _INSTANCE_UNSAFE.sub("-", name)


# ---------------------------------------------------------------------------------------------------
# The keys LS accepts (config/config.go and the structs it embeds), and the backends' options
# (simpleblob backends/*, parsed strictly when LS creates the backend for sync/receive/snapshots).

_Kind = str | dict[str, Any] | tuple[str, Any]

_HEALTH = {"interval": "duration", "error_duration": "duration", "warn_duration": "duration"}
_LMDB: dict[str, Any] = {
    "path": "string",
    "options": {
        "dir_mask": "int",
        "file_mask": "int",
        "map_size": "bytesize",
        "max_dbs": "int",
        "no_subdir": "bool",
        "create": "bool",
    },
    "dbi_options": ("map", {"override_create_flags": "text"}),
    "schema_tracks_changes": "bool",
    "dupsort_hack": "bool",
    "header_extra_padding_block": "bool",
}
LS_CONFIG_KEYS: dict[str, Any] = {
    "instance": "string",
    "lmdbs": ("map", _LMDB),
    "sweeper": {
        "enabled": "bool",
        "retention_days": "float",
        "interval": "duration",
        "first_interval": "duration",
        "lock_duration": "duration",
        "release_duration": "duration",
        "retention_load_cutoff_duration": "duration",
    },
    "storage": {
        "type": "string",
        "options": ("map", "any"),
        "cleanup": {
            "enabled": "bool",
            "interval": "duration",
            "must_keep_interval": "duration",
            "remove_old_instances_interval": "duration",
        },
        "root_path": "string",  # deprecated: LS copies it into options.root_path
    },
    "http": {"address": "string"},
    "log": {"level": "string", "format": "string", "timestamp": "string"},
    "health": {
        "storage_list": _HEALTH,
        "storage_load": _HEALTH,
        "storage_store": _HEALTH,
        "start": {**_HEALTH, "report_healthz": "bool", "report_metadata": "bool"},
    },
    "lmdb_poll_interval": "duration",
    "lmdb_log_stats_interval": "duration",
    "storage_poll_interval": "duration",
    "storage_retry_interval": "duration",
    "storage_retry_count": "int",
    "storage_retry_forever": "bool",
    "storage_force_snapshot_interval": "duration",
    "memory_downloaded_snapshots": "int",
    "memory_decompressed_snapshots": "int",
    "lmdb_scrape_smaps": "bool",
    "only_once": "bool",
}

_S3_OPTIONS = frozenset(
    [
        "access_key", "secret_key", "access_key_file", "secret_key_file", "secrets_refresh_interval",
        "region", "bucket", "storage_class", "create_bucket", "global_prefix", "prefix_folders",
        "hide_folders", "endpoint_url", "disable_send_content_md5", "num_minio_threads", "tls",
        "init_timeout", "idle_conn_timeout", "max_idle_conns", "dial_timeout", "dial_keep_alive",
        "tls_handshake_timeout", "client_timeout", "use_update_marker", "update_marker_force_list_interval",
    ]
)
_AZURE_OPTIONS = frozenset(
    [
        "account_name", "account_key", "account_key_file", "secrets_refresh_interval", "use_shared_key",
        "container", "create_container", "global_prefix", "endpoint_url", "tls", "init_timeout",
        "idle_conn_timeout", "max_idle_conns", "dial_timeout", "dial_keep_alive", "tls_handshake_timeout",
        "client_timeout", "use_update_marker", "update_marker_force_list_interval", "concurrency",
    ]
)
# None: the memory backend ignores its options.
STORAGE_OPTIONS: dict[str, frozenset[str] | None] = {
    "s3": _S3_OPTIONS,
    "azure": _AZURE_OPTIONS,
    "fs": frozenset({"root_path"}),
    "memory": None,
}

_SECOND = 10**9
# config.Default(): only the values Check() or the view depend on; everything else starts at zero.
_LS_DEFAULTS: dict[str, Any] = {
    "log": {"level": "info", "format": "human", "timestamp": "short"},
    "lmdb_poll_interval": _SECOND,
    "storage_poll_interval": _SECOND,
    "storage_retry_interval": 5 * _SECOND,
    "storage_retry_count": 100,
    "storage_force_snapshot_interval": 4 * 3600 * _SECOND,
    "memory_downloaded_snapshots": 2,
    "memory_decompressed_snapshots": 3,
}

_LOG_FORMATS = ("human", "logfmt", "json")
_LOG_TIMESTAMPS = ("short", "disable", "full")
_LOGRUS_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug", "trace")


def _zero(kind: _Kind) -> Any:
    if isinstance(kind, dict):
        return {k: _zero(v) for k, v in kind.items()}
    if isinstance(kind, tuple):
        return {}
    return {"string": "", "bool": False, "int": 0, "float": 0.0, "duration": 0, "bytesize": 0,
            "text": "", "any": None}[kind]


def _ls_defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = _zero(LS_CONFIG_KEYS)
    for key, value in _LS_DEFAULTS.items():
        cfg[key] = dict(value) if isinstance(value, dict) else value
    return cfg


class _Decoder:
    """yaml.v2 ``UnmarshalStrict`` semantics over PyYAML nodes: unknown keys and type mismatches are
    errors with line numbers; a value written replaces the default, null means the zero value."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node, key: str, message: str) -> None:
        self.errors.append(f"line {node.start_mark.line + 1}: {key}: {message}")

    def decode(self, node: yaml.Node, kind: _Kind, current: Any, key: str) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return _zero(kind)
        if isinstance(kind, dict):
            if not isinstance(node, yaml.MappingNode):
                self.error(node, key, "expected a mapping")
                return current
            out = dict(current) if isinstance(current, dict) else _zero(kind)
            for knode, vnode in node.value:
                name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
                dotted = f"{key}.{name}" if key else name
                if name not in kind:
                    self.error(knode, dotted, "unknown key (LS refuses it: strict config parsing)")
                    continue
                out[name] = self.decode(vnode, kind[name], out.get(name), dotted)
            return out
        if isinstance(kind, tuple):  # ("map", value kind)
            if not isinstance(node, yaml.MappingNode):
                self.error(node, key, "expected a mapping")
                return current
            out = {}
            for knode, vnode in node.value:
                name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
                out[name] = self.decode(vnode, kind[1], None, f"{key}.{name}")
            return out
        if kind == "any":
            return self._constructor.construct_object(node, deep=True)
        if not isinstance(node, yaml.ScalarNode):
            got = "mapping" if isinstance(node, yaml.MappingNode) else "list"
            self.error(node, key, f"expected {_KIND_TEXT.get(str(kind), 'a ' + str(kind))}, got a {got}")
            return current
        value = self._constructor.construct_object(node, deep=True)
        match kind:
            case "string" | "text":
                return node.value  # yaml.v2 stores any scalar's text into a string field
            case "bool":
                if isinstance(value, bool):
                    return value
            case "int":
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            case "float":
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value)
            case "duration":
                if isinstance(value, int) and not isinstance(value, bool):
                    return value  # a bare integer is nanoseconds in Go
                if isinstance(value, str):
                    try:
                        return parse_go_duration(value)
                    except ValueError as exc:
                        self.error(node, key, str(exc))
                        return current
            case "bytesize":
                try:
                    return parse_bytesize(node.value)
                except ValueError as exc:
                    self.error(node, key, str(exc))
                    return current
        self.error(node, key, f"expected {_KIND_TEXT.get(str(kind), kind)}, got {node.value!r}")
        return current


_KIND_TEXT = {"bool": "true or false", "int": "an integer", "float": "a number",
              "duration": "a duration like 5s"}


def _check_dupes(node: yaml.Node | None, errors: list[str], key: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for knode, vnode in node.value:
            name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
            dotted = f"{key}.{name}" if key else name
            if name in seen:
                errors.append(f"line {knode.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(name)
            _check_dupes(vnode, errors, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_dupes(item, errors, key)


def _child(node: yaml.Node | None, *keys: str) -> yaml.Node | None:
    """The node at ``keys`` in a mapping tree (None when a key is absent)."""
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
    return node


def _split_host_port(address: str) -> str | None:
    """Go ``net.SplitHostPort`` acceptance; the reason when refused."""
    if address.startswith("["):
        end = address.find("]")
        if end == -1:
            return "missing ']' in address"
        return None if address[end + 1 :].startswith(":") else "missing port in address"
    colon = address.rfind(":")
    if colon == -1:
        return "missing port in address"
    if ":" in address[:colon]:
        return "too many colons in address"
    return None


def _ls_check(cfg: dict[str, Any]) -> list[str]:
    """LS ``Config.Check()`` (what makes every LS subcommand exit 1), same order."""
    problems: list[str] = []
    log = cfg["log"]
    if str(log["level"]).lower() not in _LOGRUS_LEVELS:
        problems.append(f"log.level: {log['level']!r} is not one of debug, info, warning, error, fatal")
    if log["format"] not in _LOG_FORMATS:
        problems.append(f"log.format: {log['format']!r} is not one of {', '.join(_LOG_FORMATS)}")
    if log["timestamp"] and log["timestamp"] not in _LOG_TIMESTAMPS:
        problems.append(f"log.timestamp: {log['timestamp']!r} is not one of {', '.join(_LOG_TIMESTAMPS)}")
    if not cfg["lmdbs"]:
        problems.append("lmdbs: no LMDBs configured")
    for name, lmdb in cfg["lmdbs"].items():
        if not lmdb["path"]:
            problems.append(f"lmdbs.{name}.path: no path configured")
        for mask in ("file_mask", "dir_mask"):
            if lmdb["options"][mask] > 0o777:
                problems.append(f"lmdbs.{name}.options.{mask}: {lmdb['options'][mask]} is too large "
                                "(write the mask in octal, like 0664)")
        if lmdb["schema_tracks_changes"] and lmdb["dupsort_hack"]:
            problems.append(f"lmdbs.{name}: schema_tracks_changes cannot be combined with dupsort_hack")
    if cfg["http"]["address"]:
        reason = _split_host_port(cfg["http"]["address"])
        if reason:
            address = cfg["http"]["address"]
            problems.append(f"http.address: {address!r}: {reason} (expected host:port like :8500)")
    for key in ("lmdb_poll_interval", "storage_poll_interval", "storage_retry_interval"):
        if cfg[key] < 100 * 10**6:
            problems.append(f"{key}: too short (minimum 100ms; a bare number is nanoseconds)")
    force = cfg["storage_force_snapshot_interval"]
    if force != 0 and force < 60 * _SECOND:
        problems.append("storage_force_snapshot_interval: too short (minimum 1m, or 0 to disable)")
    for key in ("storage_retry_count", "memory_downloaded_snapshots", "memory_decompressed_snapshots"):
        if cfg[key] < 1:
            problems.append(f"{key}: a positive number is required")
    return problems


# ---------------------------------------------------------------------------------------------------
# Template and rendering


@dataclass(frozen=True, slots=True)
class Template:
    path: Path
    text: str
    variable: str  # our variable, schema.variable


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str  # what to write: our variable replaced, other variables left for LS
    view: LsView
    warnings: tuple[str, ...]


def load_template(path: Path, variable: str) -> Template:
    """Read the LS config template. ConfigError naming the file when it cannot be read."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: LS config template not found (lightningstream.template; `lssupervisor init` writes one)"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: LS config template is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the LS config template: {exc.strerror}") from None
    if not _IDENTIFIER.fullmatch(variable):
        raise ConfigError(f"schema.variable: expected an environment variable name, got {variable!r}")
    return Template(path=p, text=text, variable=variable)


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _scalar_spans(text: str) -> list[tuple[int, int]] | None:
    """Character spans of YAML scalars (keys and values) in the template: a ``$`` outside them sits in
    a comment. None when the template does not even tokenise (then every ``$`` counts as live)."""
    spans: list[tuple[int, int]] = []
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, yaml.ScalarToken):
                spans.append((token.start_mark.index, token.end_mark.index))
    except yaml.YAMLError:
        return None
    return spans


def _in_spans(spans: list[tuple[int, int]], index: int) -> bool:
    i = bisect.bisect_right(spans, (index, sys.maxsize)) - 1
    return i >= 0 and spans[i][0] <= index < spans[i][1]


def _substitute(template: Template, version: int, ls_env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Steps 1-3 of the module docstring: (text with our variable replaced, warnings). Raises
    TemplateError for a referenced variable that LS's environment does not set."""
    text = template.text
    var = template.variable
    spans = _scalar_spans(text)
    out: list[str] = []
    warnings: list[str] = []
    unset: list[tuple[str, int, bool]] = []  # (name, line, braced)
    previous: DollarRef | None = None  # the reference written just before, if it was not ours
    pos = 0
    for ref in scan_dollars(text):
        line = _line_of(text, ref.start)
        where = f"{template.path}:{line}"
        written = text[ref.start : ref.end]
        in_comment = spans is not None and not _in_spans(spans, ref.start)
        out.append(text[pos : ref.start])
        pos = ref.end
        if ref.name == var:
            if (
                previous is not None
                and previous.end == ref.start
                and not previous.braced
                and _go_alnum(previous.name[:1])
            ):
                # "$X" directly before our digits would read as "$X7": brace it, same meaning in Go.
                out[-2] = "${" + previous.name + "}"
            out.append(str(version))
            previous = None
            continue
        previous = ref
        out.append(written)
        if ref.kept:
            continue  # LS leaves a "$" that no name follows
        if "\n" in written:
            # An unclosed "${" eats everything up to the next "}", lines further down.
            raise TemplateError(
                f"{where}: {written.splitlines()[0]!r} is not closed on its line; LS's variable expansion "
                f"would delete everything up to the '}}' on line {_line_of(text, ref.end - 1)}"
            )
        if in_comment:
            continue  # LS expands comments too; harmless there
        if ref.eaten:
            warnings.append(f"{where}: {written!r} is deleted by LS's variable expansion "
                            "(a literal $ cannot be written in an LS config)")
        elif _IDENTIFIER.fullmatch(ref.name):
            if ref.name not in ls_env:
                unset.append((ref.name, line, ref.braced))
            elif ls_env[ref.name] == "":
                warnings.append(f"{where}: {written} is set but empty in LS's environment; LS will use ''")
        else:
            base = re.match(r"[A-Za-z_][A-Za-z0-9_]*", ref.name)
            if base is not None and ref.name[base.end() :].startswith(_SHELL_OPERATORS):
                if base.group(0) == var:
                    raise TemplateError(
                        f"{where}: {written} is not substituted (LS has no ${{VAR:-default}} syntax; it "
                        f"would expand to ''); write ${{{var}}}"
                    )
                warnings.append(f"{where}: {written}: LS has no default syntax; it looks up a variable "
                                f"named {ref.name!r} and gets ''")
            else:
                warnings.append(f"{where}: {written} expands to '' in LS (a literal $ cannot be written "
                                "in an LS config)")
    out.append(text[pos:])
    if unset:
        name, line, braced = unset[0]
        more = sorted({n for n, _, _ in unset[1:]} - {name})
        hint = "" if braced else " (if a literal $ was meant: LS cannot express one; use a *_file option)"
        also = f"; also unset: {', '.join(more)}" if more else ""
        raise TemplateError(
            f"{template.path}:{line}: ${{{name}}} is not set in the environment LS gets (LS would silently "
            f"use ''); export it to lssupervisor or set lightningstream.env{hint}{also}"
        )
    return "".join(out), warnings


def _storage_location(storage_type: str, options: Mapping[str, Any]) -> str:
    match storage_type:
        case "s3":
            return f"{options.get('bucket') or ''}/{options.get('global_prefix') or ''}"
        case "azure":
            return f"{options.get('container') or ''}/{options.get('global_prefix') or ''}"
        case "fs":
            return str(options.get("root_path") or "")
        case _:
            return ""


def _validate(
    expanded: str, where: str, warnings: list[str], *, require_instance: bool = True
) -> LsView:
    """Steps 4-5: the expanded text checked as LS checks it, and the view we act on."""
    errors: list[str] = []
    try:
        root = yaml.compose(expanded, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f"line {mark.line + 1}: " if mark else ""
        raise TemplateError(f"{where}: {pos}invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"{where}: invalid YAML: {exc}") from None
    if root is None:
        raise TemplateError(f"{where}: empty config (LS needs at least lmdbs and storage)")
    _check_dupes(root, errors)
    decoder = _Decoder()
    cfg = decoder.decode(root, LS_CONFIG_KEYS, _ls_defaults(), "")
    errors.extend(decoder.errors)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TemplateError(f"{where}: {errors[0]}{more}")
    problems = _ls_check(cfg)
    if problems:
        raise TemplateError(f"{where}: {problems[0]} (LS exits 1 on this config)")

    # What LS only finds when it creates the storage backend (sync, receive, snapshots).
    storage = cfg["storage"]
    st_type = storage["type"]
    options = dict(storage["options"] or {})
    if st_type not in STORAGE_OPTIONS:
        known = ", ".join(STORAGE_OPTIONS)
        what = "not set" if not st_type else f"{st_type!r} is unknown"
        raise TemplateError(f"{where}: storage.type: {what} (expected one of {known})")
    if storage["root_path"]:
        if not isinstance(_child(root, "storage", "options"), yaml.MappingNode):
            # LS assigns into storage.options, a nil Go map when absent or null: a panic, exit 2.
            raise TemplateError(
                f"{where}: storage.root_path without storage.options makes LS panic; "
                "write it as storage.options.root_path"
            )
        warnings.append(f"{where}: storage.root_path is deprecated in LS; use storage.options.root_path")
        options["root_path"] = storage["root_path"]
    allowed = STORAGE_OPTIONS[st_type]
    if allowed is not None:
        for key in options:
            if key not in allowed:
                if st_type == "fs" and key == "global_prefix":
                    raise TemplateError(
                        f"{where}: storage.options.global_prefix: the fs backend has no global_prefix "
                        "(LS refuses it); put the version in root_path instead"
                    )
                raise TemplateError(f"{where}: storage.options.{key}: unknown option for the {st_type} "
                                    "backend (LS refuses it when it starts syncing)")
    for key in ("root_path", "bucket", "container", "global_prefix"):
        if key in options and options[key] is not None and not isinstance(options[key], str):
            raise TemplateError(f"{where}: storage.options.{key}: expected a string, got {options[key]!r}")
    required = {"fs": "root_path", "s3": "bucket", "azure": "container"}.get(st_type)
    if required and not options.get(required):
        raise TemplateError(f"{where}: storage.options.{required}: must be set for the {st_type} backend")

    instance = cfg["instance"]
    if not instance and require_instance:
        raise TemplateError(
            f"{where}: instance: not set (LS would use the host name, which changes with containers "
            "and re-installs, and our schema markers are keyed by it); set a stable name"
        )
    safe = sanitize_instance(instance)
    if safe != instance:
        warnings.append(f"{where}: instance {instance!r} is used as {safe!r} by LS (only [a-zA-Z0-9-] kept)")

    lmdbs: list[LmdbSpec] = []
    for name, lmdb in cfg["lmdbs"].items():
        opts = lmdb["options"]
        if not os.path.isabs(lmdb["path"]):
            warnings.append(f"{where}: lmdbs.{name}.path {lmdb['path']!r} is relative; LS resolves it "
                            "against its working directory; prefer an absolute path")
        lmdbs.append(
            LmdbSpec(
                name=name,
                path=lmdb["path"],
                no_subdir=bool(opts["no_subdir"]),
                map_size=int(opts["map_size"]),
                max_dbs=int(opts["max_dbs"]) or DEFAULT_MAX_DBS,
                native=bool(lmdb["schema_tracks_changes"]),
            )
        )
    return LsView(
        instance=safe,
        lmdbs=tuple(lmdbs),
        storage_type=st_type,
        storage_location=_storage_location(st_type, options),
        http_address=cfg["http"]["address"] if not cfg["only_once"] else "",
    )


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"schema version must be a non-negative integer, got {version!r}")


def render(template: Template, version: int, ls_env: Mapping[str, str]) -> Rendered:
    """The LS config for ``version``, checked as LS would check it with ``ls_env`` (the environment LS
    will receive). Raises TemplateError (one line, naming the file and line) when LS would refuse it or
    silently misread it."""
    _check_version(version)
    text, warnings = _substitute(template, version, ls_env)
    expanded = go_expand_env(text, ls_env)
    view = _validate(expanded, f"{template.path} (rendered for version {version})", warnings)
    return Rendered(text=text, view=view, warnings=tuple(warnings))


# Two versions that differ in every digit, so any use of our variable shows up in the views.
_PROBE_VERSIONS = (1, 2)


def inspect_template(template: Template, ls_env: Mapping[str, str]) -> LsView:
    """The view of the template before any version is known (to find the LMDBs whose markers tell the
    version). Its ``storage_location`` is rendered for the placeholder version 0. Refuses a template
    whose LMDB paths or instance depend on the version: the LMDB must not move with the schema."""
    a, b = (render(template, v, ls_env).view for v in _PROBE_VERSIONS)
    var = template.variable
    if a.instance != b.instance:
        raise TemplateError(f"{template.path}: instance depends on ${{{var}}}; the instance name (and our "
                            "markers keyed by it) must not change with the schema version")
    if [(s.name, s.path) for s in a.lmdbs] != [(s.name, s.path) for s in b.lmdbs]:
        raise TemplateError(f"{template.path}: an lmdbs path depends on ${{{var}}}; the LMDB must not "
                            "move with the schema version (put the version in the storage location)")
    return render(template, 0, ls_env).view


def _example_location(st_type: str, current: str, var: str) -> str:
    match st_type:
        case "fs":
            return f"root_path: {current.rstrip('/') or '/var/lib/lightningstream'}/v${{{var}}}"
        case _:
            return f"global_prefix: v${{{var}}}/ (or add it to the prefix you have)"


# A version no real schema reaches, rendered to show where our variable sits in a global_prefix.
_SENTINEL_VERSION = 987654321


def check_prefix_safety(template: Template, ls_env: Mapping[str, str] | None = None) -> list[str]:
    """For the ``prefix`` strategy: the storage location (s3/azure ``global_prefix`` or bucket/container,
    fs ``root_path``) must contain the version variable, so each schema version syncs in its own place.
    Variables other than ours take their value from ``ls_env`` when given, else a placeholder.

    Raises TemplateError when it does not; returns warnings (one line each) about a location that is
    versioned but risky."""
    env = dict(ls_env) if ls_env is not None else {}

    def probe(version: int) -> LsView:
        text, _ = _substitute(template, version, _AnyEnv(env))
        expanded = go_expand(text, lambda name: env.get(name, f"<{name}>"))
        return _validate(expanded, f"{template.path}", [], require_instance=False)

    a, b = (probe(v) for v in _PROBE_VERSIONS)
    var = template.variable
    if a.storage_type == "memory":
        raise TemplateError(f"{template.path}: storage.type memory has no location to version; the prefix "
                            "strategy needs s3, azure or fs")
    if a.storage_location == b.storage_location:
        key = "storage.options.root_path" if a.storage_type == "fs" else "storage.options.global_prefix"
        current = a.storage_location
        raise TemplateError(
            f"{template.path}: {key} does not contain ${{{var}}}, but a migration uses the prefix strategy "
            f"(each schema version must sync in its own location); change it, e.g. "
            f"{_example_location(a.storage_type, current, var)}"
        )
    if a.storage_type in ("s3", "azure"):
        prefix_a, prefix_b = (_global_prefix(v) for v in (a, b))
        if prefix_a != prefix_b and not prefix_a.endswith("/"):
            # LS prepends global_prefix raw to each object name: "app/v1" + "1db__..." and "app/v11" +
            # "db__..." are the same object, so two schema versions could read each other's snapshots.
            fixed = _global_prefix(probe(_SENTINEL_VERSION)).replace(str(_SENTINEL_VERSION), f"${{{var}}}")
            return [
                f"{template.path}: storage.options.global_prefix {prefix_a!r} (for version 1) does not end "
                f"with '/': LS prepends it to object names as is, so versions 1 and 11 can share object "
                f"names for LMDBs whose names begin with a digit; end it with '/', e.g. "
                f"global_prefix: {fixed}/"
            ]
    return []


def _global_prefix(view: LsView) -> str:
    """The global_prefix part of an s3/azure ``storage_location`` (``bucket/prefix``; bucket and
    container names cannot contain '/')."""
    return view.storage_location.partition("/")[2]


class _AnyEnv(dict[str, str]):
    """An environment in which every variable counts as set (for checks that do not need values)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return super().get(key, "<set>")


def lenient_env(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` in which every other variable counts as set (value ``<set>``): to learn a template's
    structure (``inspect_template``) while unset variables are reported elsewhere."""
    return _AnyEnv(env)


# ---------------------------------------------------------------------------------------------------
# The environment LS runs with

def ls_environment(cfg: Config, version: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment LS gets: ``base`` (our own), then ``lightningstream.env``, then our variable set to
    ``version`` (so a ``${VAR}`` LS would expand itself agrees with what we wrote); systemd's notify,
    watchdog and socket-activation variables removed (:func:`sdnotify.child_env`: they belong to
    lssupervisor, never to LS)."""
    _check_version(version)
    env = sdnotify.child_env(base)
    env.update(sdnotify.child_env(cfg.lightningstream.env))
    env[cfg.schema.variable] = str(version)
    return env


# ---------------------------------------------------------------------------------------------------
# Writing and validating the file


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory: a crash at any
    point leaves either the old or the new content under ``path``, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, text: str, *, mode: int = 0o600, keep_previous: bool = True) -> bool:
    """Write ``text`` to ``path`` atomically with ``mode``; the previous content is kept as
    ``<path>.prev``. Returns False (and writes nothing) when the content is already ``text``.
    OSError propagates (the caller decides what a failed write means)."""
    p = Path(path)
    data = text.encode("utf-8")
    try:
        old: bytes | None = p.read_bytes()
    except FileNotFoundError:
        old = None
    if old == data:
        if (p.stat().st_mode & 0o7777) != mode:
            os.chmod(p, mode)
        return False
    if old is not None and keep_previous:
        _replace_file(p.with_name(p.name + ".prev"), old, mode)
    _replace_file(p, data, mode)
    return True


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def resolve_binary(binary: str) -> str | None:
    """The LS binary's path, or None when it does not exist (or is not executable)."""
    if os.sep in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    return shutil.which(binary)


def validate_with_binary(binary: str, candidate: Path, env: Mapping[str, str], timeout: float = 10.0) -> None:
    """Ask LS itself: ``BIN -c CANDIDATE`` with no subcommand loads and checks the config, prints help
    and exits 0 (1 on a bad config). TemplateError with LS's last stderr line when it refuses.
    Returns silently when the binary is not found (our own checks still ran)."""
    path = resolve_binary(binary)
    if path is None:
        return
    try:
        proc = subprocess.run(
            [path, "-c", str(candidate)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TemplateError(f"{candidate}: `{path} -c` did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise TemplateError(f"{candidate}: cannot run {path}: {exc.strerror}") from None
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise TemplateError(f"{candidate}: Lightning Stream refuses this config: {detail}")


# ---------------------------------------------------------------------------------------------------
# CLI: lssupervisor render-config


def _marker_version(cfg: Config, template: Template, env: Mapping[str, str]) -> int:
    """The schema version the LMDBs have for our instance, read by a worker process (the CLI never
    opens an LMDB itself, like the daemon)."""
    from lssupervisor.worker import read_schema_version

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
