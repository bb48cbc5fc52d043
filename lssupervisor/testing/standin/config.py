"""Config loading for the Lightning Stream stand-in, as LS v1.0 does it.

Pipeline (LS ``config/config.go`` ``LoadYAMLFile`` + ``cmd/.../root.go``)::

    read text -> Go os.ExpandEnv over the WHOLE text -> yaml.v2 UnmarshalStrict into config.Config
    (defaults first; unknown and duplicate keys are errors with line numbers) -> Config.Check()

The strict decoder is a walk over PyYAML's node tree against a schema that mirrors LS's Go structs,
so every key the real ``config.go`` accepts loads, and the error text follows yaml.v2
(``line 3: field foo not found in type config.Config``).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------
# Go os.Expand / os.ExpandEnv (src/os/env.go), byte for byte in behaviour.

_SHELL_SPECIAL = frozenset("*#$@!?-0123456789")


def _is_alnum(c: str) -> bool:
    return c == "_" or ("0" <= c <= "9") or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _get_shell_name(s: str) -> tuple[str, int]:
    """Go's getShellName: the name after ``$`` and how many characters it consumed."""
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SHELL_SPECIAL and s[2] == "}":
            return s[1:2], 3
        for i in range(1, len(s)):
            if s[i] == "}":
                if i == 1:
                    return "", 2  # bad syntax: eat "${}"
                return s[1:i], i + 1
        return "", 1  # bad syntax: eat "${"
    if s[0] in _SHELL_SPECIAL:
        return s[0:1], 1
    i = 0
    while i < len(s) and _is_alnum(s[i]):
        i += 1
    return s[:i], i


def go_expand(s: str, mapping: Callable[[str], str]) -> str:
    """Go ``os.Expand``. ``${VAR:-x}`` looks up the variable literally named ``VAR:-x`` (so: empty),
    ``$$`` is the special variable ``$`` (empty), a ``$`` before a non-name character stays."""
    buf: list[str] | None = None
    i = 0
    j = 0
    n = len(s)
    while j < n:
        if s[j] == "$" and j + 1 < n:
            if buf is None:
                buf = []
            buf.append(s[i:j])
            name, w = _get_shell_name(s[j + 1 :])
            if name == "" and w > 0:
                pass  # invalid syntax: the characters are eaten
            elif name == "":
                buf.append("$")  # valid syntax but no name: keep the dollar
            else:
                buf.append(mapping(name))
            j += w
            i = j + 1
        j += 1
    if buf is None:
        return s
    return "".join(buf) + s[i:]


def go_expand_env(s: str, environ: Mapping[str, str] | None = None) -> str:
    """Go ``os.ExpandEnv``: unset variables become the empty string, silently."""
    env = os.environ if environ is None else environ
    return go_expand(s, lambda name: env.get(name, ""))


# --------------------------------------------------------------------------------------------
# Go value syntaxes

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5
    "μs": 1_000,  # U+03BC
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_INT64 = (1 << 63) - 1


class GoValueError(ValueError):
    pass


def parse_go_duration(text: str) -> int:
    """Go ``time.ParseDuration`` -> nanoseconds (same grammar and error wording)."""
    orig = text
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise GoValueError(f'time: invalid duration "{orig}"')
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise GoValueError(f'time: invalid duration "{orig}"')
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s.startswith("."):
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                i += 1
            frac, s = s[:i], s[i:]
        if not whole and not frac:
            raise GoValueError(f'time: invalid duration "{orig}"')
        i = 0
        while i < len(s) and s[i] != "." and not ("0" <= s[i] <= "9"):
            i += 1
        unit, s = s[:i], s[i:]
        if not unit:
            raise GoValueError(f'time: missing unit in duration "{orig}"')
        scale = _UNITS_NS.get(unit)
        if scale is None:
            raise GoValueError(f'time: unknown unit "{unit}" in duration "{orig}"')
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // (10 ** len(frac))
        total += value
        if total > _MAX_INT64:
            raise GoValueError(f'time: invalid duration "{orig}"')
    return -total if neg else total


def format_go_duration(ns: int) -> str:
    """Go ``time.Duration.String`` (enough of it for log lines)."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    h, rem = divmod(ns, 3_600_000_000_000)
    m, rem = divmod(rem, 60_000_000_000)
    secs = _trim(rem / 1_000_000_000)
    out = ""
    if h:
        out += f"{h}h"
    if h or m:
        out += f"{m}m"
    return f"{sign}{out}{secs}s"


def _trim(x: float) -> str:
    s = f"{x:.9f}".rstrip("0").rstrip(".")
    return s or "0"


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "byte": 1,
    **dict.fromkeys(("k", "kb", "kilo", "kilobyte", "kilobytes"), 1 << 10),
    **dict.fromkeys(("m", "mb", "mega", "megabyte", "megabytes"), 1 << 20),
    **dict.fromkeys(("g", "gb", "giga", "gigabyte", "gigabytes"), 1 << 30),
    **dict.fromkeys(("t", "tb", "tera", "terabyte", "terabytes"), 1 << 40),
    **dict.fromkeys(("p", "pb", "peta", "petabyte", "petabytes"), 1 << 50),
    **dict.fromkeys(("e", "eb"), 1 << 60),
}


def parse_bytesize(text: str) -> int:
    """c2h5oh/datasize ``ByteSize.UnmarshalText``: ``1GB`` = 1<<30 (units are powers of 1024)."""
    i = 0
    while i < len(text) and "0" <= text[i] <= "9":
        i += 1
    if i == 0:
        raise GoValueError(f'strconv.ParseFloat: parsing "{text}": invalid syntax')
    unit = text[i:].strip()
    if unit in ("Kb", "Mb", "Gb", "Tb", "Pb", "Eb"):
        raise GoValueError(
            f'strconv.ParseFloat: parsing "{text}": unit with capital unit prefix and '
            "lower case unit (b) - bits are not supported"
        )
    mult = _BYTE_UNITS.get(unit.lower())
    if mult is None:
        raise GoValueError(f'strconv.ParseFloat: parsing "{text}": invalid syntax')
    value = int(text[:i]) * mult
    if value >= 1 << 64:
        raise GoValueError(f'strconv.ParseFloat: parsing "{text}": value out of range')
    return value


_DBI_FLAG_NAMES = {
    "MDB_REVERSEKEY": 0x02,
    "MDB_DUPSORT": 0x04,
    "MDB_INTEGERKEY": 0x08,
    "MDB_DUPFIXED": 0x10,
    "MDB_INTEGERDUP": 0x20,
    "MDB_REVERSEDUP": 0x40,
}


def parse_dbiflags(text: str) -> int:
    """LS ``dbiflags.Flags.UnmarshalText``: ``MDB_DUPSORT|MDB_INTEGERKEY`` (also ``,``/``+``/space)."""
    flags = 0
    for part in re.split(r"[|,+ ]", text):
        p = part.strip().upper()
        if not p:
            continue
        if p in _DBI_FLAG_NAMES:
            flags |= _DBI_FLAG_NAMES[p]
            continue
        try:
            flags |= int(p, 0)
        except ValueError:
            raise GoValueError(f"unknown DBI flag: {p}") from None
    return flags


# --------------------------------------------------------------------------------------------
# Schema of LS config.Config (field name -> type), mirroring the Go structs and their yaml tags.

Kind = str | tuple[Any, ...]

_HEALTH_CONFIG: tuple[Any, ...] = (
    "struct",
    "healthtracker.HealthConfig",
    {"interval": "duration", "error_duration": "duration", "warn_duration": "duration"},
)
_START_CONFIG: tuple[Any, ...] = (
    "struct",
    "starttracker.StartConfig",
    {
        "interval": "duration",
        "error_duration": "duration",
        "warn_duration": "duration",
        "report_healthz": "bool",
        "report_metadata": "bool",
    },
)
_LMDB: tuple[Any, ...] = (
    "struct",
    "config.LMDB",
    {
        "path": "string",
        "options": (
            "struct",
            "lmdbenv.Options",
            {
                "dir_mask": "filemode",
                "file_mask": "filemode",
                "map_size": "bytesize",
                "max_dbs": "int",
                "no_subdir": "bool",
                "create": "bool",
            },
        ),
        "dbi_options": (
            "map",
            ("struct", "config.DBIOptions", {"override_create_flags": "dbiflags"}),
        ),
        "schema_tracks_changes": "bool",
        "dupsort_hack": "bool",
        "header_extra_padding_block": "bool",
    },
)
CONFIG_SCHEMA: tuple[Any, ...] = (
    "struct",
    "config.Config",
    {
        "instance": "string",
        "lmdbs": ("map", _LMDB),
        "sweeper": (
            "struct",
            "config.Sweeper",
            {
                "enabled": "bool",
                "retention_days": "float",
                "interval": "duration",
                "first_interval": "duration",
                "lock_duration": "duration",
                "release_duration": "duration",
                "retention_load_cutoff_duration": "duration",
            },
        ),
        "storage": (
            "struct",
            "config.Storage",
            {
                "type": "string",
                "options": ("map", "any"),
                "cleanup": (
                    "struct",
                    "config.Cleanup",
                    {
                        "enabled": "bool",
                        "interval": "duration",
                        "must_keep_interval": "duration",
                        "remove_old_instances_interval": "duration",
                    },
                ),
                "root_path": "string",
            },
        ),
        "http": ("struct", "config.HTTP", {"address": "string"}),
        "log": (
            "struct",
            "logger.Config",
            {"level": "string", "format": "string", "timestamp": "string"},
        ),
        "health": (
            "struct",
            "config.Health",
            {
                "storage_list": _HEALTH_CONFIG,
                "storage_load": _HEALTH_CONFIG,
                "storage_store": _HEALTH_CONFIG,
                "start": _START_CONFIG,
            },
        ),
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
    },
)

_GO_TYPE = {
    "string": "string",
    "bool": "bool",
    "int": "int",
    "float": "float32",
    "duration": "time.Duration",
    "bytesize": "datasize.ByteSize",
    "filemode": "fs.FileMode",
    "dbiflags": "dbiflags.Flags",
}

S = 1_000_000_000
MS = 1_000_000
_H = 3600 * S


def _health(error: int, warn: int, interval: int) -> dict[str, Any]:
    return {"interval": interval, "error_duration": error, "warn_duration": warn}


def default_config() -> dict[str, Any]:
    """LS ``config.Default()``."""
    return {
        "instance": "",
        "lmdbs": {},
        "sweeper": {
            "enabled": False,
            "retention_days": 370.0,
            "interval": 6 * _H,
            "first_interval": 10 * 60 * S,
            "lock_duration": 50 * MS,
            "release_duration": 50 * MS,
            "retention_load_cutoff_duration": 0,
        },
        "storage": {
            "type": "",
            "options": None,  # a nil Go map until the YAML names a mapping (see standin._load_config)
            "cleanup": {
                "enabled": False,
                "interval": 5 * 60 * S,
                "must_keep_interval": 10 * 60 * S,
                "remove_old_instances_interval": 7 * 24 * _H,
            },
            "root_path": "",
        },
        "http": {"address": ""},
        "log": {"level": "info", "format": "human", "timestamp": "short"},
        "health": {
            "storage_list": _health(5 * 60 * S, 60 * S, 5 * S),
            "storage_load": _health(5 * 60 * S, 60 * S, 5 * S),
            "storage_store": _health(5 * 60 * S, 60 * S, 5 * S),
            "start": {
                "interval": 1 * S,
                "error_duration": 5 * 60 * S,
                "warn_duration": 60 * S,
                "report_healthz": False,
                "report_metadata": True,
            },
        },
        "lmdb_poll_interval": 1 * S,
        "lmdb_log_stats_interval": 30 * 60 * S,
        "storage_poll_interval": 1 * S,
        "storage_retry_interval": 5 * S,
        "storage_retry_count": 100,
        "storage_retry_forever": False,
        "storage_force_snapshot_interval": 4 * _H,
        "memory_downloaded_snapshots": 2,
        "memory_decompressed_snapshots": 3,
        "lmdb_scrape_smaps": True,
        "only_once": False,
    }


def _zero(kind: Kind) -> Any:
    if isinstance(kind, tuple):
        if kind[0] == "struct":
            return {k: _zero(v) for k, v in kind[2].items()}
        return {}
    return {
        "string": "",
        "bool": False,
        "int": 0,
        "float": 0.0,
        "duration": 0,
        "bytesize": 0,
        "filemode": 0,
        "dbiflags": None,
        "any": None,
    }[kind]


class ConfigLoadError(Exception):
    """The config file could not be read or decoded (LS: ``Load config file "x": ...``)."""


class ConfigCheckError(Exception):
    """The config decoded but is invalid (LS: ``Config file error: ...``)."""


_TAG_SHORT = {
    "tag:yaml.org,2002:str": "!!str",
    "tag:yaml.org,2002:int": "!!int",
    "tag:yaml.org,2002:float": "!!float",
    "tag:yaml.org,2002:bool": "!!bool",
    "tag:yaml.org,2002:null": "!!null",
    "tag:yaml.org,2002:map": "!!map",
    "tag:yaml.org,2002:seq": "!!seq",
    "tag:yaml.org,2002:timestamp": "!!timestamp",
    "tag:yaml.org,2002:binary": "!!binary",
}


class _Decoder:
    """A yaml.v2 ``UnmarshalStrict`` over PyYAML nodes; collects every type error like yaml.v2."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        import yaml

        self._yaml = yaml
        self._constructor = yaml.SafeLoader("")

    def _err(self, node: Any, what: str) -> None:
        self.errors.append(f"line {node.start_mark.line + 1}: {what}")

    def _mismatch(self, node: Any, go_type: str) -> None:
        tag = _TAG_SHORT.get(node.tag, node.tag)
        if isinstance(node, self._yaml.ScalarNode):
            val = node.value if len(node.value) <= 10 else node.value[:7] + "..."
            self._err(node, f"cannot unmarshal {tag} `{val}` into {go_type}")
        else:
            self._err(node, f"cannot unmarshal {tag} into {go_type}")

    def _is_null(self, node: Any) -> bool:
        return isinstance(node, self._yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def _resolved(self, node: Any) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def decode(self, node: Any, kind: Kind, current: Any) -> Any:
        """Decode ``node`` into a value of ``kind``, merging into ``current`` like yaml.v2 does
        for structs (fields not named keep their current value)."""
        y = self._yaml
        if self._is_null(node):
            if kind == ("map", "any"):
                return None  # storage.options: null leaves a nil Go map (LS panics assigning into it)
            return _zero(kind)  # yaml.v2: null resets the target to its zero value
        if isinstance(kind, tuple):
            if not isinstance(node, y.MappingNode):
                self._mismatch(node, kind[1] if kind[0] == "struct" else "map[string]...")
                return current
            if kind[0] == "struct":
                _, type_name, fields = kind
                out = dict(current) if isinstance(current, dict) else _zero(kind)
                seen: set[str] = set()
                for knode, vnode in node.value:
                    key = knode.value if isinstance(knode, y.ScalarNode) else str(knode)
                    if key not in fields:
                        self._err(knode, f"field {key} not found in type {type_name}")
                        continue
                    if key in seen:
                        self._err(knode, f"field {key} already set in type {type_name}")
                        continue
                    seen.add(key)
                    out[key] = self.decode(vnode, fields[key], out.get(key))
                return out
            # map[string]T
            vkind = kind[1]
            mout: dict[str, Any] = dict(current) if isinstance(current, dict) else {}
            mseen: set[str] = set()
            for knode, vnode in node.value:
                key = knode.value if isinstance(knode, y.ScalarNode) else str(knode)
                if key in mseen:
                    self._err(knode, f'key "{key}" already set in map')
                    continue
                mseen.add(key)
                if vkind == "any":
                    self._check_dups(vnode)
                    mout[key] = self._resolved(vnode)
                else:
                    mout[key] = self.decode(vnode, vkind, mout.get(key))
            return mout
        go_type = _GO_TYPE.get(kind, kind)
        if kind == "any":
            self._check_dups(node)
            return self._resolved(node)
        if not isinstance(node, y.ScalarNode):
            self._mismatch(node, go_type)
            return current
        tag = node.tag
        text = node.value
        try:
            match kind:
                case "string":
                    return text  # yaml.v2 puts the raw text of any scalar into a string
                case "bool":
                    if tag == "tag:yaml.org,2002:bool":
                        return bool(self._resolved(node))
                case "int" | "filemode":
                    if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                        v = self._resolved(node)
                        if isinstance(v, float) and not math.isfinite(v):
                            raise GoValueError("not finite")
                        if kind == "filemode" and int(v) < 0:
                            raise GoValueError("negative")
                        return int(v)
                case "float":
                    if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                        return float(self._resolved(node))
                case "duration":
                    if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                        return int(self._resolved(node))  # a bare number is nanoseconds
                    if tag == "tag:yaml.org,2002:str":
                        return parse_go_duration(text)
                case "bytesize":
                    return parse_bytesize(text)  # TextUnmarshaler gets the raw text
                case "dbiflags":
                    return parse_dbiflags(text)
        except (GoValueError, ValueError, OverflowError) as exc:
            if kind in ("bytesize", "dbiflags"):
                self._err(node, str(exc))
                return current
        self._mismatch(node, go_type)
        return current

    def _check_dups(self, node: Any) -> None:
        y = self._yaml
        if isinstance(node, y.MappingNode):
            seen: set[str] = set()
            for knode, vnode in node.value:
                key = knode.value if isinstance(knode, y.ScalarNode) else str(knode)
                if key in seen:
                    self._err(knode, f'key "{key}" already set in map')
                seen.add(key)
                self._check_dups(vnode)
        elif isinstance(node, y.SequenceNode):
            for item in node.value:
                self._check_dups(item)


def decode_strict(text: str, kind: Kind, base: Any) -> Any:
    """yaml.v2 ``UnmarshalStrict(text, &base)``: raises ConfigLoadError with yaml.v2-like text."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigLoadError(f"yaml: {line}{problem}") from None
    if root is None:
        return base  # empty document: nothing changes
    dec = _Decoder()
    out = dec.decode(root, kind, copy.deepcopy(base))
    if dec.errors:
        raise ConfigLoadError("yaml: unmarshal errors:\n  " + "\n  ".join(dec.errors))
    return out


# --------------------------------------------------------------------------------------------
# The typed view the stand-in uses


@dataclass(frozen=True, slots=True)
class LMDBOptions:
    dir_mask: int
    file_mask: int
    map_size: int
    max_dbs: int
    no_subdir: bool
    create: bool


@dataclass(frozen=True, slots=True)
class LMDBConfig:
    name: str
    path: str
    options: LMDBOptions
    schema_tracks_changes: bool
    dupsort_hack: bool
    header_extra_padding_block: bool
    override_create_flags: dict[str, int | None]


@dataclass(frozen=True, slots=True)
class Config:
    raw: dict[str, Any]  # the decoded tree (defaults merged), for keys the stand-in only accepts
    instance: str
    lmdbs: tuple[LMDBConfig, ...]
    storage_type: str
    storage_options: dict[str, Any]
    storage_root_path: str  # deprecated storage.root_path
    http_address: str
    log_level: str
    log_format: str
    log_timestamp: str
    lmdb_poll_interval: int
    storage_poll_interval: int
    storage_retry_interval: int
    storage_retry_count: int
    storage_retry_forever: bool
    storage_force_snapshot_interval: int
    only_once: bool
    start_health: dict[str, Any] = field(default_factory=dict)
    storage_health: dict[str, dict[str, Any]] = field(default_factory=dict)


LOG_LEVELS = ("debug", "info", "warning", "error", "fatal")
# logrus.ParseLevel accepts these too
_LOGRUS_LEVELS = {"panic", "fatal", "error", "warn", "warning", "info", "debug", "trace"}
LOG_FORMATS = ("human", "logfmt", "json")
LOG_TIMESTAMPS = ("short", "disable", "full")


def _split_host_port(addr: str) -> None:
    """Go ``net.SplitHostPort`` validation, raising with Go's wording."""
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ConfigCheckError(f"http.address: address {addr}: missing ']' in address")
        rest = addr[end + 1 :]
        if not rest.startswith(":"):
            raise ConfigCheckError(f"http.address: address {addr}: missing port in address")
        return
    i = addr.rfind(":")
    if i < 0:
        raise ConfigCheckError(f"http.address: address {addr}: missing port in address")
    if ":" in addr[:i]:
        raise ConfigCheckError(f"http.address: address {addr}: too many colons in address")


def check(raw: dict[str, Any]) -> None:
    """LS ``Config.Check()`` (and ``logger.Config.Check()``), same order and wording."""
    log = raw["log"]
    if str(log["level"]).lower() not in _LOGRUS_LEVELS:
        raise ConfigCheckError("log.level: must be one of: " + ", ".join(LOG_LEVELS))
    if log["format"] not in LOG_FORMATS:
        raise ConfigCheckError("log.format: must be one of: " + ", ".join(LOG_FORMATS))
    if log["timestamp"] and log["timestamp"] not in LOG_TIMESTAMPS:
        raise ConfigCheckError("log.timestamp: must be one of: " + ", ".join(LOG_TIMESTAMPS))
    if len(raw["lmdbs"]) < 1:
        raise ConfigCheckError("no LMDBs configured")
    for name, lc in raw["lmdbs"].items():
        prefix = f'lmdb "{name}"'
        if not lc["path"]:
            raise ConfigCheckError(f"{prefix}: no path configured")
        for mask in ("file_mask", "dir_mask"):
            v = lc["options"][mask]
            if v > 0o777:
                raise ConfigCheckError(
                    f"lmdb.options.{mask}: too large value, possible use of decimal ({v}) "
                    f"instead of octal ({v:#o})".replace("0o", "0")
                )
        if lc["schema_tracks_changes"] and lc["dupsort_hack"]:
            raise ConfigCheckError(
                "lmdb.schema_tracks_changes: cannot be used together with the dupsort_hack option"
            )
    if raw["http"]["address"]:
        _split_host_port(raw["http"]["address"])
    if raw["lmdb_poll_interval"] < 100 * MS:
        raise ConfigCheckError("lmdb_poll_interval: too short interval")
    if raw["storage_poll_interval"] < 100 * MS:
        raise ConfigCheckError("storage_poll_interval: too short interval")
    if raw["storage_retry_interval"] < 100 * MS:
        raise ConfigCheckError("storage_retry_interval: too short interval")
    dt = raw["storage_force_snapshot_interval"]
    if dt != 0 and dt < 60 * S:
        raise ConfigCheckError("storage_force_snapshot_interval: too short interval (minimum 1m if enabled)")
    if raw["storage_retry_count"] < 1:
        raise ConfigCheckError("storage_retry_count: positive number required")
    if raw["memory_downloaded_snapshots"] < 1:
        raise ConfigCheckError("memory_downloaded_snapshots: positive number required")
    if raw["memory_decompressed_snapshots"] < 1:
        raise ConfigCheckError("memory_decompressed_snapshots: positive number required")


def load_text(text: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Expand, decode strictly over the defaults. Raises ConfigLoadError."""
    expanded = go_expand_env(text, environ)
    result: dict[str, Any] = decode_strict(expanded, CONFIG_SCHEMA, default_config())
    return result


def build(raw: dict[str, Any]) -> Config:
    lmdbs = []
    for name, lc in raw["lmdbs"].items():
        o = lc["options"]
        lmdbs.append(
            LMDBConfig(
                name=name,
                path=lc["path"],
                options=LMDBOptions(
                    dir_mask=o["dir_mask"] or 0o775,
                    file_mask=o["file_mask"] or 0o664,
                    map_size=o["map_size"],
                    max_dbs=o["max_dbs"] or 64,
                    no_subdir=o["no_subdir"],
                    create=o["create"],
                ),
                schema_tracks_changes=lc["schema_tracks_changes"],
                dupsort_hack=lc["dupsort_hack"],
                header_extra_padding_block=lc["header_extra_padding_block"],
                override_create_flags={
                    k: v.get("override_create_flags") for k, v in (lc.get("dbi_options") or {}).items()
                },
            )
        )
    st = raw["storage"]
    options = dict(st["options"] or {})
    if st["root_path"]:
        options["root_path"] = st["root_path"]
    return Config(
        raw=raw,
        instance=raw["instance"],
        lmdbs=tuple(lmdbs),
        storage_type=st["type"],
        storage_options=options,
        storage_root_path=st["root_path"],
        http_address=raw["http"]["address"],
        log_level=raw["log"]["level"],
        log_format=raw["log"]["format"],
        log_timestamp=raw["log"]["timestamp"],
        lmdb_poll_interval=raw["lmdb_poll_interval"],
        storage_poll_interval=raw["storage_poll_interval"],
        storage_retry_interval=raw["storage_retry_interval"],
        storage_retry_count=raw["storage_retry_count"],
        storage_retry_forever=raw["storage_retry_forever"],
        storage_force_snapshot_interval=raw["storage_force_snapshot_interval"],
        only_once=raw["only_once"],
        start_health=dict(raw["health"]["start"]),
        storage_health={k: dict(raw["health"][k]) for k in ("storage_list", "storage_load", "storage_store")},
    )


def load_file(path: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise ConfigLoadError(f"open yaml file: open {path}: {reason}") from None
    return load_text(text, environ)


_UNSAFE = re.compile(r"[^a-zA-Z0-9-]")


def sanitize_instance(name: str) -> str:
    """LS ``syncer.instanceID()``: every character outside [a-zA-Z0-9-] becomes '-'."""
    return _UNSAFE.sub("-", name)
