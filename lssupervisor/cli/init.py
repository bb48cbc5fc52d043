"""``lssupervisor init DIR``: write a ready-to-run, commented config set.

Writes ``DIR/lssupervisor.yaml``, ``DIR/lightningstream.yaml.in`` (an LS template whose storage location
carries the schema version), ``DIR/migrations/`` and ``DIR/state/`` (or ``state_dir: --state-dir``, for
the systemd units' ``/var/lib/lssupervisor``). Secrets are never written: for s3,
the template reads the credentials from LS's environment (``${AWS_ACCESS_KEY_ID}``...), which
lssupervisor passes on from its own and refuses to start LS without.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from lssupervisor.config import load_config, parse_address
from lssupervisor.errors import UsageError
from lssupervisor.fsutil import write_atomic
from lssupervisor.lsconfig.render import check_prefix_safety, load_template
from lssupervisor.lsconfig.values import sanitize_instance

VARIABLE = "APP_SCHEMA_VERSION"
_LMDB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
CONFIG_NAME = "lssupervisor.yaml"
TEMPLATE_NAME = "lightningstream.yaml.in"


@dataclass(frozen=True, slots=True)
class Storage:
    type: str  # fs | s3
    lines: tuple[str, ...]  # the storage.options block, indented for the template
    where: str  # for the summary


def _q(value: str) -> str:
    """A YAML double-quoted scalar (safe for any path or URL)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_storage(url: str) -> Storage:
    """``fs:///abs/dir`` or ``s3://BUCKET/PREFIX?endpoint=URL&region=R`` into the template's storage."""
    parts = urllib.parse.urlsplit(url)
    version = "${" + VARIABLE + "}"
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    match parts.scheme:
        case "fs":
            if parts.netloc or not parts.path.startswith("/") or parts.query:
                raise UsageError(f"--storage {url!r}: expected fs:///absolute/dir (three slashes)")
            root = parts.path.rstrip("/") or "/"
            return Storage(
                type="fs",
                lines=(
                    "    # One directory per schema version: instances on different schema versions",
                    "    # never merge each other's data (the fs backend has no global_prefix).",
                    f"    root_path: {_q(root.rstrip('/') + '/v' + version)}",
                ),
                where=f"fs {root}/v<version>",
            )
        case "s3":
            if not parts.netloc:
                raise UsageError(f"--storage {url!r}: expected s3://BUCKET/PREFIX?endpoint=URL&region=R")
            unknown = sorted(set(query) - {"endpoint", "region"})
            if unknown:
                raise UsageError(
                    f"--storage {url!r}: unknown parameter {unknown[0]!r} (known: endpoint, region)"
                )
            prefix = parts.path.strip("/")
            global_prefix = f"{prefix}/v{version}/" if prefix else f"v{version}/"
            lines = [
                f"    bucket: {_q(parts.netloc)}",
                "    # One prefix per schema version: instances on different schema versions never merge",
                "    # each other's data. LS prepends it to object names as is (hence the final slash).",
                f"    global_prefix: {_q(global_prefix)}",
            ]
            if query.get("endpoint", [""])[0]:
                lines.append(f"    endpoint_url: {_q(query['endpoint'][0])}")
            if query.get("region", [""])[0]:
                lines.append(f"    region: {_q(query['region'][0])}")
            lines += [
                "    # Credentials come from the environment LS gets (lssupervisor passes its own on): set",
                "    # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for lssupervisor, e.g. with systemd's",
                "    # EnvironmentFile=. lssupervisor refuses to start LS while either is unset. Quoted:",
                "    # LS expands them before parsing YAML: a secret with ' #' or a leading '*' stays text.",
                '    access_key: "${AWS_ACCESS_KEY_ID}"',
                '    secret_key: "${AWS_SECRET_ACCESS_KEY}"',
            ]
            return Storage(type="s3", lines=tuple(lines), where=f"s3 {parts.netloc}/{prefix}/v<version>/")
        case _:
            raise UsageError(
                f"--storage {url!r}: expected fs:///abs/dir or s3://BUCKET/PREFIX?endpoint=URL&region=R"
            )


def render_template(
    *, instance: str, lmdb_name: str, lmdb_path: str, no_subdir: bool, native: bool, storage: Storage,
    ls_http: str | None,
) -> str:
    mode = (
        "    # true: every value starts with LS's 24-byte header (native mode). false: shadow mode."
    )
    lines = [
        "# Lightning Stream config TEMPLATE, written by `lssupervisor init`.",
        "#",
        "# lssupervisor renders it for the schema version the LMDB has: it replaces the variable",
        f"# {VARIABLE} (written with a dollar sign and braces below) by the version number and writes the",
        "# result to state/lightningstream.yaml (mode 0600); LS is started on that file. Every other",
        "# variable is left for LS to expand from its environment; lssupervisor refuses an unset one.",
        "# LS expands variables even inside comments: keep dollar signs out of comments.",
        "# Check changes with: lssupervisor check -c lssupervisor.yaml",
        "",
        "# Unique per instance; LS keeps only [a-zA-Z0-9-]. Schema markers are keyed by it: keep it stable.",
        f"instance: {_q(instance)}",  # quoted: a name like null or ~ must not read as YAML null
        "",
        "lmdbs:",
        f"  {_q(lmdb_name)}:",
        "    # The application's LMDB. It stays here across schema versions; only the storage moves.",
        f"    path: {_q(lmdb_path)}",
        "    options:",
        f"      no_subdir: {'true' if no_subdir else 'false'}",
        "      create: true",
        mode,
        f"    schema_tracks_changes: {'true' if native else 'false'}",
        "",
        "storage:",
        f"  type: {storage.type}",
        "  options:",
        *storage.lines,
    ]
    if ls_http:
        lines += [
            "",
            "# LS's own status server: lssupervisor polls its /healthz to know when LS is ready.",
            "http:",
            f"  address: {_q(ls_http)}",
        ]
    return "\n".join(lines) + "\n"


def render_config(*, binary: str, http: str | None, ls_http: str | None, state_dir: str | None = None) -> str:
    lines = [
        "# lssupervisor configuration, written by `lssupervisor init`.",
        "# Every option, its default and meaning: docs/configuration.md (`lssupervisor config-reference`).",
        "# Relative paths are relative to this file's directory. Check changes with:",
        "#   lssupervisor check -c lssupervisor.yaml",
        "",
        "# Lock, state.json, history.jsonl, backups and the rendered LS config live here.",
        f"state_dir: {_q(state_dir) if state_dir else 'state'}",
        "",
        "lightningstream:",
        "  # The Lightning Stream binary: an absolute path, or a name looked up on PATH.",
        f"  binary: {_q(binary)}",
        "  args: [sync]",
        "  # The LS config template; the schema version goes where the template says.",
        f"  template: {TEMPLATE_NAME}",
    ]
    if not ls_http:
        lines += [
            "  # LS serves no HTTP (no http.address in the template), so it counts as ready after",
            "  # running this long.",
            "  settle_time: 3s",
        ]
    lines += [
        "  # Credentials are not configured here: LS reads them from the environment lssupervisor",
        "  # passes on (see the template).",
        "",
        "schema:",
        "  # The template variable that carries the schema version.",
        f"  variable: {VARIABLE}",
        "  # After a failed migration keep LS down until an operator acts (`park`) or restart it on",
        "  # the version the LMDB has (`resume`).",
        "  on_failure: park",
        "",
        "migrations:",
        "  # The application's migration files NNNN_slug.py (see docs/migrations.md).",
        "  path: migrations",
        "",
        "backup:",
        "  # A verified compact copy of each LMDB before a migration writes (kept in state/backups).",
        "  enabled: true",
        "  keep: 5",
        "",
        "http:",
        "  # Our status server (/livez /readyz /status /metrics); empty disables it.",
        f"  address: {_q(http if http is not None else '127.0.0.1:8265')}",
    ]
    return "\n".join(lines) + "\n"


def _default_binary() -> tuple[str, str | None]:
    """The LS binary to write, and a note for the person when it is not installed here."""
    found = shutil.which("lightningstream")
    if found:
        return found, None
    return "lightningstream", (
        "note: lightningstream is not on PATH; install it, or edit lightningstream.binary "
        "(for a demo without LS: --lightningstream lightningstream-standin)"
    )


def _instance(given: str | None) -> str:
    """--instance as given (refused if LS would rename it), else the host name made LS-safe."""
    if given is None:
        return sanitize_instance(socket.gethostname()) or "lssupervisor"
    if not given or sanitize_instance(given) != given:
        raise UsageError(f"--instance {given!r}: use only letters, digits and '-' (LS would rename it)")
    return given


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    config_path = target / CONFIG_NAME
    template_path = target / TEMPLATE_NAME
    if not args.force:
        for path in (config_path, template_path):
            if path.exists():
                raise UsageError(f"{path} already exists; use --force to overwrite it (the old one is kept "
                                 "as .prev)")

    instance = _instance(args.instance)
    for flag, value in (("--lmdb", args.lmdb), ("--storage", args.storage), ("--instance", instance)):
        if "$" in value:
            # LS expands $ everywhere in its config and a literal $ cannot be escaped.
            raise UsageError(f"{flag} {value!r}: a '$' cannot be written in an LS config")
    lmdb_path = os.path.abspath(args.lmdb)
    # An existing file is a no_subdir LMDB (PowerDNS's pdns.lmdb); anything else is an LMDB directory.
    no_subdir = os.path.isfile(lmdb_path)
    lmdb_name = args.lmdb_name
    if not _LMDB_NAME.fullmatch(lmdb_name):
        # LS names snapshot files after it; a '$' would be expanded by LS, '#' or ':' change the YAML.
        raise UsageError(f"--lmdb-name {lmdb_name!r}: use letters, digits, '_' and '-' (like main)")
    storage = parse_storage(args.storage)
    for flag, address in (("--http", args.http), ("--ls-http", args.ls_http)):
        if address:
            parse_address(address, flag)

    note = None
    if args.lightningstream:
        binary = args.lightningstream
        if os.sep in binary:
            binary = os.path.abspath(binary)
    else:
        binary, note = _default_binary()

    template_text = render_template(
        instance=instance, lmdb_name=lmdb_name, lmdb_path=lmdb_path, no_subdir=no_subdir,
        native=not args.shadow, storage=storage, ls_http=args.ls_http,
    )
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else None
    config_text = render_config(binary=binary, http=args.http, ls_http=args.ls_http, state_dir=state_dir)

    target.mkdir(parents=True, exist_ok=True)
    (target / "migrations").mkdir(mode=0o755, exist_ok=True)
    if state_dir is None:
        # A named state dir (a systemd StateDirectory=) is created by its owner, not here as root.
        (target / "state").mkdir(mode=0o700, exist_ok=True)
    write_atomic(template_path, template_text, mode=0o644)
    write_atomic(config_path, config_text, mode=0o644)

    # What we wrote must load and be prefix-safe; anything else is a bug here, not a user error.
    cfg = load_config(config_path)
    check_prefix_safety(load_template(Path(cfg.lightningstream.template), cfg.schema.variable))

    print(f"wrote {config_path}")
    print(f"wrote {template_path} (instance {instance}, LMDB {lmdb_path}, storage {storage.where})")
    print(f"created {target / 'migrations'}/" + ("" if state_dir else f" and {target / 'state'}/"))
    if note:
        print(note, file=sys.stderr)
    if storage.type == "s3":
        print("LS needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in lssupervisor's environment")
    print(f"next: lssupervisor check -c {config_path} && lssupervisor run -c {config_path}")
    return 0
