"""A faithful Lightning Stream v1.0 stand-in, runnable as a program.

    lightningstream-standin [-c FILE] [-i NAME] [--timeout D] [--minimum-pid N] [--log-level L]
                            [--log-format F] [--log-timestamp T] [--debug] [--log-config]
                            {sync [--only-once] [--only-db DB]... | receive [--only-once] |
                             snapshots list [-p PREFIX] [-l] [-t] | version}
    python -m lssupervisor.testing.standin ...

What it reproduces and what it does not is in docs/standin.md. Test knobs (environment; they act
only on LS's syncing commands ``sync`` and ``receive``, never on ``lightningstream -c FILE`` with no
command, which lssupervisor runs to validate a candidate config, nor on ``version``/``snapshots``):

    LSSTANDIN_IGNORE_SIGTERM=1      ignore SIGTERM, SIGINT and SIGHUP (a hung LS; only KILL ends it)
    LSSTANDIN_CRASH_AFTER_MS=N      after N ms print a Go-style panic and exit 2 (Go's panic status)
    LSSTANDIN_EXIT_CODE=C           exit code for the crash knob instead of 2
    LSSTANDIN_RECORD=/path/f.jsonl  append {"pid","ppid","event":"start","time_ns","config","argv"}
                                    at start and hold a shared flock on /path/f.jsonl.lock for life
                                    (every command: it observes, it changes nothing; written after
                                    the other knobs are in place)
    LSSTANDIN_REEXEC=1              re-exec as a child and wait (the --minimum-pid trap) regardless
                                    of the PID
    LSSTANDIN_HEALTH_INTERVAL_MS=N  lower the 1 s minimum healthz evaluation interval
    LSSTANDIN_HEALTHZ_WEDGE=1       /healthz never answers once startup completed (LS v1.0.0's deadlock)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

VERSION = "v1.0.0-standin"
TIMEOUT_EXIT_CODE = 75
MAXIMUM_MIN_PID = 200
SKIP_PID_CHECK_ENV = "LIGHTNINGSTREAM_NO_PID_CHECK"

_record_lock_fd: int | None = None  # kept open for the whole process life


class _CobraParser(argparse.ArgumentParser):
    """cobra prints ``Error: ...`` and exits 1 on a bad command line (argparse would exit 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"Error: {message}\nRun '{self.prog} --help' for usage.\n")
        sys.exit(1)


def _duration_arg(text: str) -> int:
    from lssupervisor.testing.standin.config import GoValueError, parse_go_duration

    try:
        return parse_go_duration(text)
    except GoValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    common = _CobraParser(add_help=False)
    # Global (persistent) flags: accepted before and after the subcommand, like cobra.
    sup = argparse.SUPPRESS
    common.add_argument("-c", "--config", default=sup, help="Config file (default lightningstream.yaml)")
    common.add_argument(
        "-i",
        "--instance",
        default=sup,
        help="Instance name, defaults to hostname. MUST be unique for each instance",
    )
    common.add_argument("--debug", action="store_true", default=sup, help="Enable debug logging")
    common.add_argument(
        "--log-config", action="store_true", default=sup, help="Log the evaluated configuration on startup"
    )
    common.add_argument(
        "--minimum-pid",
        type=int,
        default=sup,
        help=f"Fork until we reach a minimum PID (maximum {MAXIMUM_MIN_PID})",
    )
    common.add_argument(
        "--timeout",
        type=_duration_arg,
        default=sup,
        help=f"Timeout for command execution (exit code {TIMEOUT_EXIT_CODE})",
    )
    common.add_argument("--log-level", default=sup, help="Log level (default: info)")
    common.add_argument("--log-format", default=sup, help="Log format (default: human; human, logfmt, json)")
    common.add_argument("--log-timestamp", default=sup, help="Log timestamp (default: short)")

    p = _CobraParser(
        prog="lightningstream",
        parents=[common],
        description="This tool syncs one or more LMDB databases with an S3 bucket "
        "(Lightning Stream stand-in for tests)",
    )
    p.add_argument("--version", action="version", version=f"lightningstream version {VERSION}")
    sub = p.add_subparsers(dest="command", parser_class=_CobraParser)
    s = sub.add_parser("sync", parents=[common], help="Continuous bidirectional syncing")
    s.add_argument("--only-once", action="store_true", help="Only do a single run and exit")
    s.add_argument("--only-db", action="append", default=[], help="Only sync this named db (can be repeated)")
    s.add_argument("--wait-for-marker-file", default="", help="Marker file to wait for in storage")
    r = sub.add_parser("receive", parents=[common], help="Like sync, but never write snapshots")
    r.add_argument("--only-once", action="store_true", help="Only do a single run and exit")
    r.add_argument("--wait-for-marker-file", default="", help="Marker file to wait for in storage")
    sn = sub.add_parser("snapshots", parents=[common], help="Remote snapshot operations (list)")
    snsub = sn.add_subparsers(dest="snapshots_command", parser_class=_CobraParser)
    sl = snsub.add_parser("list", parents=[common], help="List snapshots")
    sl.add_argument("-p", "--prefix", default="", help="Prefix filter")
    sl.add_argument("-l", "--long", action="store_true", help="Add extra information, like size")
    sl.add_argument("-t", "--time", action="store_true", help="Sort by snapshot time")
    sub.add_parser("version", parents=[common], help="Print the version number")
    return p


# ------------------------------------------------------------------------------------- knobs


# The commands the behaviour knobs act on: LS's syncing runs. A knob meant for "the LS that syncs" must
# not turn the daemon's config validation (`lightningstream -c candidate`, no command) into another
# failure: a crash timer shorter than a slow validation run made the daemon park for a config reason.
KNOB_COMMANDS = frozenset({"sync", "receive"})


def _apply_signal_knobs(knobs: bool) -> None:
    # LS installs no signal handler: TERM/HUP/INT kill at once. Python turns SIGINT into
    # KeyboardInterrupt, so restore the default.
    if knobs and os.environ.get("LSSTANDIN_IGNORE_SIGTERM") == "1":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_crash_timer() -> None:
    raw = os.environ.get("LSSTANDIN_CRASH_AFTER_MS")
    if not raw:
        return
    delay = int(raw) / 1000.0
    code = int(os.environ.get("LSSTANDIN_EXIT_CODE", "2"))

    def crash() -> None:
        try:
            sys.stderr.write(
                "panic: lightningstream stand-in: simulated crash "
                "(LSSTANDIN_CRASH_AFTER_MS)\n\ngoroutine 1 [running]:\nmain.main()\n"
            )
            sys.stderr.flush()
        finally:
            os._exit(code)

    t = threading.Timer(delay, crash)
    t.daemon = True
    t.start()


def _record_start(config: str) -> None:
    global _record_lock_fd
    path = os.environ.get("LSSTANDIN_RECORD")
    if not path:
        return
    import fcntl

    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    conflict = False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        conflict = True  # someone holds LOCK_EX: the test wants to see this violation recorded
    _record_lock_fd = fd
    line: dict[str, Any] = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "event": "start",
        "time_ns": time.time_ns(),
        "config": os.path.abspath(config),
        "argv": sys.argv,
    }
    if conflict:
        line["lock_conflict"] = True
    data = (json.dumps(line) + "\n").encode()
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(wfd, data)  # one write with O_APPEND: lines of concurrent processes do not mix
    finally:
        os.close(wfd)
    if conflict:
        fcntl.flock(fd, fcntl.LOCK_SH)  # then wait like a process that runs anyway


def _self_argv() -> list[str]:
    orig = getattr(sys, "orig_argv", None)
    if orig and len(orig) > 1:
        return [sys.executable, *orig[1:]]
    return [sys.executable, "-m", "lssupervisor.testing.standin", *sys.argv[1:]]


def _ensure_minimum_pid(minimum: int, knobs: bool) -> None:
    """LS ``ensureMinimumPID``: burn PIDs, re-run ourselves as a child, wait, exit with its code.
    The parent forwards no signal: signalling only the parent orphans the child (the trap)."""
    from lssupervisor.testing.standin.log import log

    forced = (
        knobs and os.environ.get("LSSTANDIN_REEXEC") == "1" and not os.environ.get(SKIP_PID_CHECK_ENV)
    )
    if minimum <= 0 and not forced:
        return
    pid = os.getpid()
    if minimum > MAXIMUM_MIN_PID:
        minimum = MAXIMUM_MIN_PID
        log.warn("Adjusted minimum PID to limit", minimum_pid=minimum, pid=pid)
    if pid >= minimum and not forced:
        log.info("PID satisfies minimum", minimum_pid=minimum, pid=pid)
        return
    if os.environ.get(SKIP_PID_CHECK_ENV):
        log.warn("PID does NOT satisfy minimum, but requested to skip check", minimum_pid=minimum, pid=pid)
        return
    n = max(0, minimum - pid)
    if n:
        log.info("Spawning processes to increase PID", n=n, pid=pid)
        for _ in range(n):
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
    log.info("Starting new instance", pid=pid)
    import subprocess

    env = dict(os.environ)
    env[SKIP_PID_CHECK_ENV] = "1"
    try:
        proc = subprocess.Popen(_self_argv(), env=env, restore_signals=False)
    except OSError as exc:
        log.fatal("Error running as subcommand", error=str(exc), pid=pid)
    code = proc.wait()
    if code != 0:
        # Go's ExitError.ExitCode() is -1 for a signalled child; os.Exit(-1) is status 255.
        exit_code = code if code > 0 else 255
        log.warn("Exiting with exit code", exitcode=code if code > 0 else -1, pid=pid)
        os._exit(exit_code)
    os._exit(0)


def _apply_timeout(timeout_ns: int) -> None:
    from lssupervisor.testing.standin.config import format_go_duration
    from lssupervisor.testing.standin.log import log

    if timeout_ns <= 0:
        return
    log.info("Setting command timeout", timeout=format_go_duration(timeout_ns))

    def expire() -> None:
        log.warn("Timeout reached")
        log.error("Exiting due to timeout")
        os._exit(TIMEOUT_EXIT_CODE)

    t = threading.Timer(timeout_ns / 1e9, expire)
    t.daemon = True
    t.start()


# ------------------------------------------------------------------------------------- commands


def _load_config(args: argparse.Namespace, knobs: bool) -> Any:
    """LS root ``PersistentPreRun``: load, check, apply flags, log setup, min PID, timeout."""
    from lssupervisor.testing.standin import config as sc
    from lssupervisor.testing.standin.log import log

    path = getattr(args, "config", "lightningstream.yaml")
    try:
        raw = sc.load_file(path)
    except sc.ConfigLoadError as exc:
        log.fatal(f'Load config file "{path}": {exc}')
    try:
        sc.check(raw)
    except sc.ConfigCheckError as exc:
        log.fatal(f"Config file error: {exc}")
    if raw["storage"]["root_path"]:
        if raw["storage"]["options"] is None:
            # LS: conf.Storage.Options["root_path"] = ... on a nil map (no `options:` mapping).
            sys.stderr.write("panic: assignment to entry in nil map\n\ngoroutine 1 [running]:\n")
            sys.stderr.flush()
            os._exit(2)
        log.warn("storage.root_path is deprecated and will be removed, use storage.options.root_path instead")
    for flag, key in (("log_level", "level"), ("log_format", "format"), ("log_timestamp", "timestamp")):
        v = getattr(args, flag, "")
        if v:
            raw["log"][key] = v
    if getattr(args, "debug", False):
        raw["log"]["level"] = "debug"
    if getattr(args, "instance", ""):
        raw["instance"] = args.instance
    cfg = sc.build(raw)
    log.configure(cfg.log_level, cfg.log_format, cfg.log_timestamp)
    _ensure_minimum_pid(getattr(args, "minimum_pid", 0), knobs)
    log.debug("Running", version=VERSION)
    if getattr(args, "log_config", False):
        log.info("Effective configuration:\n" + json.dumps(raw, indent=2, default=str) + "\n")
    _apply_timeout(getattr(args, "timeout", 0))
    return cfg


def _backend(cfg: Any) -> Any:
    from lssupervisor.testing.standin.log import log
    from lssupervisor.testing.standin.storage import StorageError, get_backend

    try:
        return get_backend(cfg.storage_type, cfg.storage_options)
    except StorageError as exc:
        log.fatal("Error", error=str(exc))


def _counter(health: Any, db: str) -> Any:
    def count(what: str) -> None:
        health.count(db, what)

    return count


def run_sync(cfg: Any, args: argparse.Namespace, receive_only: bool) -> int:
    from lssupervisor.testing.standin import sync as ss
    from lssupervisor.testing.standin.config import sanitize_instance
    from lssupervisor.testing.standin.health import Health, start_http_server
    from lssupervisor.testing.standin.log import log

    only_once = cfg.only_once or bool(getattr(args, "only_once", False))
    st = _backend(cfg)
    log.info("Storage backend initialised", storage_type=cfg.storage_type)
    marker = getattr(args, "wait_for_marker_file", "")
    if marker:
        log.info(f"waiting for marker file '{marker}' to be present in storage")
        while True:
            try:
                st.load(marker)
                log.info(f"marker file '{marker}' found, proceeding")
                break
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error(f"unable to check storage for marker file '{marker}'", error=str(exc))
            time.sleep(cfg.storage_poll_interval / 1e9)
    health = Health()
    instance = sanitize_instance(cfg.instance or ss.HOSTNAME)
    syncers = []
    only_dbs = list(getattr(args, "only_db", []) or [])
    for lc in cfg.lmdbs:
        if only_dbs and lc.name not in only_dbs:
            log.warn("Skipping because of --only-db flag", db=lc.name)
            continue
        log.info("Opening LMDB", db=lc.name, lmdbpath=lc.path)
        try:
            env = ss.open_env(lc)
        except ss.SyncError as exc:
            log.fatal("Error", error=str(exc))
        info = env.info()
        log.info("Env info", db=lc.name, MapSize=f"{info['map_size']} B", LastTxnID=info["last_txnid"])
        if not instance:
            log.fatal(
                "Error", error="instance name could not be determined, please provide one with --instance"
            )
        syncers.append(
            ss.Syncer(cfg, lc, env, st, instance, receive_only, only_once, health, _counter(health, lc.name))
        )

    def on_error(s: ss.Syncer, exc: BaseException) -> None:
        log.error("Sync failed", error=str(exc), db=s.name)
        log.fatal("Error", error=str(exc))

    threads = ss.run_syncers(syncers, on_error)
    health.set_meta("hostname", ss.HOSTNAME)
    health.set_meta("version", VERSION)
    if not only_once:
        if cfg.http_address:

            def list_blobs() -> list[tuple[str, int]]:
                return [(b.name, b.size) for b in st.list("")]

            start_http_server(cfg.http_address, health, list_blobs, [s.name for s in syncers])
        else:
            log.info("HTTP stats server disabled")
    else:
        log.info("Not starting the HTTP server, because OnlyOnce is set")
    log.info("All syncers running")
    for t in threads:
        t.join()
    return 0


def run_snapshots_list(cfg: Any, args: argparse.Namespace) -> int:
    from lssupervisor.testing.standin import snapshot as snap

    st = _backend(cfg)
    try:
        blobs = st.list(args.prefix)
    except OSError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    if args.time:

        def key(b: Any) -> tuple[int, int, str]:
            try:
                return (1, snap.parse_name(b.name).timestamp_ns, "")
            except snap.SnapshotError:
                return (0, 0, b.name)  # invalid names first, by name

        blobs = sorted(blobs, key=key)
    out = []
    for b in blobs:
        out.append(f"{b.size:12d}\t{b.name}" if args.long else b.name)
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    knobs = args.command in KNOB_COMMANDS
    _apply_signal_knobs(knobs)
    # Record next: a test counting starts must see every process, even one that crashes at once; and
    # a test that waits for the record knows the signal knobs are in place.
    _record_start(getattr(args, "config", "lightningstream.yaml"))
    if knobs:
        _start_crash_timer()
    if args.command == "version":
        print(VERSION)  # version loads no config
        return 0
    cfg = _load_config(args, knobs)
    match args.command:
        case "sync":
            return run_sync(cfg, args, receive_only=False)
        case "receive":
            return run_sync(cfg, args, receive_only=True)
        case "snapshots":
            if getattr(args, "snapshots_command", None) == "list":
                return run_snapshots_list(cfg, args)
            parser.parse_args(["snapshots", "--help"])
            return 0
        case None:
            parser.print_help()  # LS's root command: config validated, help printed, exit 0
            return 0
        case _:
            parser.error(f'unknown command "{args.command}" for "lightningstream"')


def main(argv: list[str] | None = None) -> NoReturn:
    """Program entry point (console script and ``python -m``)."""
    code = run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # daemon threads (HTTP, syncers, open LMDB envs) must not delay the exit


if __name__ == "__main__":
    main()
