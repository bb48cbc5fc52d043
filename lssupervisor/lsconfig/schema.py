"""The keys LS accepts (config/config.go and the structs it embeds), the backends' options, and LS's
own ``Check()``: a strict decoder that reports what LS would refuse."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from lssupervisor.durations import parse_ns as parse_go_duration
from lssupervisor.lsconfig.values import parse_bytesize

if TYPE_CHECKING:
    pass



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


def ls_defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = _zero(LS_CONFIG_KEYS)
    for key, value in _LS_DEFAULTS.items():
        cfg[key] = dict(value) if isinstance(value, dict) else value
    return cfg


class Decoder:
    """yaml.v2 ``UnmarshalStrict`` semantics over PyYAML nodes: unknown keys and type mismatches are
    errors with line numbers; a value written replaces the default, null means the zero value."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node, key: str, message: str) -> None:
        self.errors.append(f"line {node.start_mark.line + 1}: {key}: {message}")

    def _construct(self, node: yaml.Node, key: str) -> Any:
        """The plain value of ``node`` (safe constructors only). A tag such as ``!!python/object`` is
        an error here, never a traceback and never code."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            self.error(node, key, f"YAML tag {node.tag!r} is not allowed in an LS config")
            return None

    # Kept whole: one branch per LS config kind, like LS's YAML decoding.
    def decode(self, node: yaml.Node, kind: _Kind, current: Any, key: str) -> Any:  # noqa: PLR0911, PLR0912
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
            return self._construct(node, key)
        if not isinstance(node, yaml.ScalarNode):
            got = "mapping" if isinstance(node, yaml.MappingNode) else "list"
            self.error(node, key, f"expected {_KIND_TEXT.get(str(kind), 'a ' + str(kind))}, got a {got}")
            return current
        value = self._construct(node, key)
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


def check_dupes(node: yaml.Node | None, errors: list[str], key: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for knode, vnode in node.value:
            name = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
            dotted = f"{key}.{name}" if key else name
            if name in seen:
                errors.append(f"line {knode.start_mark.line + 1}: {dotted}: duplicate key")
            seen.add(name)
            check_dupes(vnode, errors, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            check_dupes(item, errors, key)


def node_at(node: yaml.Node | None, *keys: str) -> yaml.Node | None:
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


# Kept whole: LS's Config.Check(), rule by rule and in its order.
def ls_check(cfg: dict[str, Any]) -> list[str]:  # noqa: PLR0912
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
