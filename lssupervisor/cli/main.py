"""The ``lssupervisor`` command line.

Every subcommand is declared here (arguments and help) and dispatches to a handler
``cmd_<name>(args) -> int`` in the module that owns the behaviour, imported lazily so that
``lssupervisor status`` does not pay for importing the daemon. Expected failures
(``SupervisorError``) print one line on stderr and exit with their documented code; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lssupervisor import __version__, resources
from lssupervisor.errors import ExitCode, SupervisorError

DEFAULT_CONFIG = "/etc/lssupervisor/lssupervisor.yaml"

# subcommand -> "module:function"
HANDLERS: dict[str, str] = {
    "init": "lssupervisor.cli.init:cmd_init",
    "check": "lssupervisor.cli.check:cmd_check",
    "new": "lssupervisor.cli.new:cmd_new",
    "render-config": "lssupervisor.cli.render:cmd_render_config",
    "config-reference": "lssupervisor.cli.render:cmd_config_reference",
    "run": "lssupervisor.cli.run:cmd_run",
    "status": "lssupervisor.cli.status:cmd_status",
    "reload": "lssupervisor.cli.control:cmd_reload",
    "reconcile": "lssupervisor.cli.control:cmd_reconcile",
    "pause": "lssupervisor.cli.control:cmd_pause",
    "resume": "lssupervisor.cli.control:cmd_resume",
    "plan": "lssupervisor.cli.offline:cmd_plan",
    "migrate": "lssupervisor.cli.offline:cmd_migrate",
    "stamp": "lssupervisor.cli.offline:cmd_stamp",
    "history": "lssupervisor.cli.offline:cmd_history",
    "backups": "lssupervisor.cli.offline:cmd_backups",
    "rollback": "lssupervisor.cli.offline:cmd_rollback",
    "fleet": "lssupervisor.cli.storage:cmd_fleet",
    "prune": "lssupervisor.cli.storage:cmd_prune",
    "demo": "lssupervisor.cli.demo:cmd_demo",
    "files": "lssupervisor.cli.files:cmd_files",
    "install-units": "lssupervisor.cli.files:cmd_install_units",
}


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line; ours is EX_USAGE (64), as documented."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("LSSUPERVISOR_CONFIG", DEFAULT_CONFIG),
        help=f"lssupervisor config file (default: $LSSUPERVISOR_CONFIG or {DEFAULT_CONFIG})",
    )


def _strategy(text: str) -> object:
    from lssupervisor.cli.new import parse_strategy

    return parse_strategy(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lssupervisor",
        description="Supervise Lightning Stream and migrate the LMDB schema it syncs, safely.",
    )
    parser.add_argument("--version", action="version", version=f"lssupervisor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_setup_commands, _daemon_commands, _offline_commands, _shipped_commands):
        add(sub)
    return parser


# One function per command family (the sections of `lssupervisor --help`).
_Sub = argparse._SubParsersAction  # the type argparse gives no public name


def _setup_commands(sub: _Sub[_Parser]) -> None:
    p = sub.add_parser("init", help="write a ready-to-run config set into DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--lmdb", required=True, metavar="PATH", help="the application's LMDB (directory)")
    p.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="fs:///abs/dir or s3://BUCKET/PREFIX?endpoint=URL&region=R",
    )
    p.add_argument("--instance", metavar="NAME", help="LS instance name (default: the host name)")
    p.add_argument("--lmdb-name", default="main", metavar="NAME", help="LS name of the LMDB (default main)")
    p.add_argument("--lightningstream", metavar="BIN", help="LS binary (default: lightningstream on PATH)")
    p.add_argument("--http", metavar="ADDR", help="our HTTP address (default 127.0.0.1:8265; '' disables)")
    p.add_argument("--ls-http", metavar="ADDR", help="LS's own http.address (enables readiness via /healthz)")
    p.add_argument("--shadow", action="store_true", help="LMDB values carry no LS header (shadow mode)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state_dir to write (default DIR/state; the systemd units use /var/lib/lssupervisor)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = sub.add_parser("check", help="validate config, LS template and migrations; non-zero on any error")
    _add_config(p)
    p.add_argument("--offline", action="store_true", help="do not probe the storage (no network access)")

    p = sub.add_parser("new", help="write the next migration file (NNNN_slug.py) to fill in")
    _add_config(p)
    p.add_argument("message", metavar="MESSAGE", help="what the migration does (its docstring)")
    p.add_argument(
        "--strategy",
        type=_strategy,
        default="prefix",
        metavar="{prefix,new_dbi,in_place}",
        help="how its writes get LS timestamps (docs/migrations.md; default prefix)",
    )
    p.add_argument("--lmdb", metavar="NAME", help="the LMDB it changes (required with several lmdbs)")

    p = sub.add_parser("render-config", help="print the LS config rendered for a schema version")
    _add_config(p)
    p.add_argument("--version", dest="schema_version", type=int, metavar="N",
                   help="schema version (default: the version the LMDB has)")

    sub.add_parser("config-reference", help="print the configuration reference (markdown)")


def _daemon_commands(sub: _Sub[_Parser]) -> None:
    p = sub.add_parser("run", help="run the supervisor daemon (foreground)")
    _add_config(p)
    p.add_argument("--log-format", choices=["text", "json"], help="override log.format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log.level")

    p = sub.add_parser("status", help="print the daemon's state")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print the full state document as JSON")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="read the state from DIR (default: the config's state_dir; read leniently from a config "
        "that does not load)",
    )

    for name, text in (
        ("reload", "tell the daemon to reload its config and reconcile (SIGHUP)"),
        ("reconcile", "tell the daemon to reconcile now (SIGUSR1)"),
        ("pause", "stop LS and hold it stopped, across restarts too (persisted flag)"),
        ("resume", "clear the pause flag (and a PARKED state) and reconcile"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config(p)


def _offline_commands(sub: _Sub[_Parser]) -> None:
    """Offline migration and storage commands: they take the lock and refuse while the daemon runs."""
    p = sub.add_parser("plan", help="show the migration plan from each LMDB's version to the target")
    _add_config(p)
    p.add_argument("--to", type=int, metavar="N", help="target version (default: the configured target)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("migrate", help="migrate the LMDBs (LS must be stopped; takes the lock)")
    _add_config(p)
    p.add_argument("--to", type=int, metavar="N", help="target version (default: the configured target)")
    p.add_argument("--dry-run", action="store_true", help="run on a compact copy; the live LMDB is untouched")
    p.add_argument("--no-backup", action="store_true", help="skip the backup (not recommended)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stamp", help="record that the LMDB is at version N without running migrations")
    _add_config(p)
    p.add_argument("version", type=int, metavar="N")
    p.add_argument("--lmdb", metavar="NAME", help="only this LMDB (default: all)")

    p = sub.add_parser("history", help="print applied migrations (history.jsonl)")
    _add_config(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("backups", help="list backups")
    _add_config(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", help="restore a backup (default: the newest) with LS stopped")
    _add_config(p)
    p.add_argument("backup", nargs="?", metavar="BACKUP")

    p = sub.add_parser(
        "fleet", help="schema markers seen in the local LMDB; --storage: what the storage holds per version"
    )
    _add_config(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--storage", action="store_true",
                   help="list the shared storage: per version, per instance, snapshots and their age")
    p.add_argument("--stale-after", metavar="DURATION",
                   help="with --storage: an instance silent this long is stale (default: fleet.stale_after)")

    p = sub.add_parser("prune", help="delete the storage of schema versions below N (dry run without --yes)")
    _add_config(p)
    p.add_argument("--below", type=int, required=True, metavar="N", help="retire every version below N")
    p.add_argument("--grace", default="24h", metavar="DURATION",
                   help="refuse while any object to delete is younger than this (default 24h)")
    p.add_argument("--ignore-instance", action="append", default=[], metavar="NAME",
                   help="an instance that is gone for good: it does not hold prune back (repeatable)")
    p.add_argument("--yes", action="store_true", help="delete (without it: print what would be deleted)")
    p.add_argument("--json", action="store_true")


def _shipped_commands(sub: _Sub[_Parser]) -> None:
    """The files that ship with lssupervisor (for pip users: no checkout), and the demo."""
    p = sub.add_parser("files", help="where the shipped files are: units, example configs, demo, alerts")
    p.add_argument("name", nargs="?", choices=list(resources.SHIPPED),
                   help="print only this directory")

    p = sub.add_parser(
        "install-units", help="install the systemd units (plus an ExecStart= drop-in when needed)"
    )
    p.add_argument("dir", nargs="?", default="/etc/systemd/system", metavar="DIR",
                   help="unit directory (default /etc/systemd/system)")
    p.add_argument(
        "--force", action="store_true", help="replace unit files that differ from the shipped ones"
    )

    p = sub.add_parser("demo", help="narrated demo of a rolling migration with two instances")
    p.add_argument("--dir", metavar="DIR", help="work directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--storage", choices=["fs", "s3"], default="fs",
                   help="fs (a directory) or s3 (a bucket on a local S3-API server; needs moto[server])")


def resolve_handler(command: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = HANDLERS[command].split(":")
    module = importlib.import_module(module_name)
    handler: Callable[[argparse.Namespace], int] = getattr(module, func_name)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return resolve_handler(args.command)(args)
    except SupervisorError as exc:
        print(f"lssupervisor: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
