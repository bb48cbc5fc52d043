"""Trusted inputs (invariant I8): only files that root or our own user could have written decide what
lssupervisor runs.

Theory of operation
-------------------
lssupervisor executes Python from ``migrations/`` and commands from ``hooks:``, often because a file
appeared (the watcher). Whoever can write one of those files, or any directory on the way to it, runs
code as our user, which is root in many containers. So, as sshd's ``StrictModes`` does for
``authorized_keys``, every input that is executed or decides what is executed is checked before use:

- our config, the LS template, ``schema.target_file`` (or, while it does not exist, the directories
  where someone could create it), the migrations directory and every migration file in it, each hook's
  executable (looked up on ``PATH`` like ``execvp`` when it is a bare name) and the LS binary; and the
  directories we write and read back (``state_dir``, ``backup.dir``: the rendered LS config there tells
  LS where to send the credentials in its environment);
- each path is walked from ``/`` one component at a time. Every directory passed through and the final
  file must be owned by root or by the user lssupervisor runs as (its effective uid), and must not be
  writable by group or others. A symlink met on the way must itself be owned by root or us; its target
  is then walked the same way (so a ``..data`` symlink of a Kubernetes volume is followed and checked);
- three exceptions, each one a reason why the write bits cannot be used against us:

  1. a **sticky directory owned by root** (``/tmp``) may be writable by everyone when it is only passed
     through: others can add entries there but cannot rename or remove ours (sshd itself refuses even
     that; we allow it because ``tmp_path``-style setups and ``/tmp/...`` configs are common and the
     sticky bit gives the same guarantee for the entry under it, which is checked);
  2. the **root directory of a read-only mount** cannot be written through it by anyone in this mount
     namespace (Kubernetes mounts ConfigMap, Secret, projected and ``readOnly`` volumes that way, their
     directory world-writable with ``fsGroup`` bits, while its host side sits under the kubelet's
     root-only directories). Only the mount point: any path below it must pass on its own, since a
     read-only *view* (systemd's ``ProtectSystem=``) does not stop the host's other users;
  3. ``security.trusted_group``: an operator may name one group whose members are trusted, which then
     may own a path and hold its group write bit. Never silent: ``check`` reports it in use.

``__pycache__`` is never trusted because it is never used: migrations are compiled from the bytes whose
sha256 history records (:mod:`lssupervisor.worker.migrations`).

:func:`check_inputs` lists every violation (``lssupervisor check`` prints them all, with the exact
``chown``/``chmod`` that fixes each); :func:`require` turns a non-empty list into one
:class:`~lssupervisor.errors.UntrustedInput` line for ``run`` (refuses to start, or to reload into it;
the reason shows in ``status``).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lssupervisor.errors import ConfigError, UntrustedInput
from lssupervisor.fsutil import is_read_only_mount_point

if TYPE_CHECKING:
    from lssupervisor.config import Config

_MAX_SYMLINKS = 40  # Linux's own limit (ELOOP)
_FIX_MISSING = "create it, or fix the path in the config"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def resolve_group(value: str) -> int:
    """A group name or a numeric gid (``security.trusted_group``). ConfigError when unknown."""
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(
            f"security.trusted_group: no group named {value!r} on this system (give a group name or a gid)"
        ) from None


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may have written a trusted input: root, ``euid``, and members of ``trusted_gid`` if set."""

    euid: int
    trusted_gid: int | None = None

    @classmethod
    def current(cls, trusted_gid: int | None = None) -> Policy:
        return cls(euid=os.geteuid(), trusted_gid=trusted_gid)

    @classmethod
    def for_config(cls, cfg: Config) -> Policy:
        group = cfg.security.trusted_group
        return cls.current(resolve_group(group) if group else None)

    @property
    def owner_hint(self) -> str:
        """Who is accepted as owner, for messages."""
        who = "root" if self.euid == 0 else f"root or {user_name(self.euid)} (uid {self.euid})"
        if self.trusted_gid is not None:
            who += f" (or group {group_name(self.trusted_gid)}, security.trusted_group)"
        return who

    @property
    def owner_fix(self) -> str:
        """The owner to suggest in a ``chown``."""
        return "root" if self.euid == 0 else user_name(self.euid)


@dataclass(frozen=True, slots=True)
class Violation:
    """One reason an input is not trusted."""

    what: str  # which input: "config", "LS template", "migration file", "hooks.pre_migrate[0]"...
    input: str  # the input's path (or the hook's argv[0]) as configured
    path: str  # the path that fails: the input itself, a parent directory or a symlink on the way
    problem: str  # "writable by group and others", "owned by nobody (uid 65534), expected root"...
    fix: str  # the command(s) that fix it, or what to do
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    kind: str = "file"  # of ``path``: "file", "directory" or "symlink"

    def line(self) -> str:
        facts = ""
        if self.mode is not None and self.uid is not None and self.gid is not None:
            facts = (
                f" [owner {user_name(self.uid)}, group {group_name(self.gid)}, "
                f"mode {stat.S_IMODE(self.mode):04o}]"
            )
        subject = "" if self.path == self.input else f"{self.kind} {self.path} on the way "
        return f"untrusted {self.what} {self.input}: {subject}{self.problem}{facts}; fix: {self.fix}"


def _read_only_mount_point(path: str) -> bool:
    """The root directory of a read-only mount. Not any path on one: under systemd's ProtectSystem=
    all of /etc is read-only in our namespace, yet a 0777 /etc/lssupervisor stays writable for every
    user of the host. A Kubernetes volume's world-writable directory is the mount point itself, and
    its host side lives under the kubelet's root-only directories."""
    try:
        if not os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return is_read_only_mount_point(path)


def _kind(mode: int) -> str:
    return "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "file"


def _judge(
    path: str, st: os.stat_result, policy: Policy, *, passed_through: bool, what: str, given: str
) -> list[Violation]:
    """Is this one directory entry (lstat of ``path``) acceptable? A symlink only needs an owner."""
    out: list[Violation] = []
    mode = st.st_mode
    kind = _kind(mode)

    def violation(problem: str, fix: str) -> Violation:
        return Violation(what, given, path, problem, fix, mode, st.st_uid, st.st_gid, kind)

    group_ok = policy.trusted_gid is not None and st.st_gid == policy.trusted_gid
    if st.st_uid not in (0, policy.euid) and not group_ok:
        owner = f"{user_name(st.st_uid)} (uid {st.st_uid})"
        fix = f"chown {'-h ' if kind == 'symlink' else ''}{policy.owner_fix} {path}"
        out.append(violation(f"owned by {owner}, expected {policy.owner_hint}", fix))
    if kind == "symlink":
        return out  # a symlink's own mode is always 0777 and means nothing
    writable = mode & 0o022
    if group_ok:
        writable &= ~0o020
    if writable and passed_through and kind == "directory" and mode & stat.S_ISVTX and st.st_uid == 0:
        writable = 0  # /tmp: others cannot rename or remove the entry under it (checked next)
    if writable and kind == "directory" and _read_only_mount_point(path):
        writable = 0  # a read-only volume's root (Kubernetes ConfigMap/Secret/readOnly volumes)
    if writable:
        who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[writable]
        bits = {0o020: "g-w", 0o002: "o-w", 0o022: "go-w"}[writable]
        out.append(violation(f"writable by {who}", f"chmod {bits} {path}"))
    return out


@dataclass(frozen=True, slots=True)
class Walked:
    """The result of walking one input path."""

    violations: tuple[Violation, ...]
    resolved: str | None  # the real path, None when it does not exist
    st: os.stat_result | None  # stat of the resolved path


def walk(path: str | os.PathLike[str], policy: Policy, what: str, *, given: str | None = None) -> Walked:
    """Check ``path`` and every directory and symlink on the way to it from ``/`` (see the module
    docstring). A missing path is no violation here: the ancestors that exist are checked and
    ``resolved`` is None (the caller decides whether a missing input is an error)."""
    text = os.fspath(path)
    shown = given if given is not None else text
    out: list[Violation] = []
    pending = [c for c in os.path.abspath(text).split("/") if c]
    pending.reverse()  # a stack: the next component is pending[-1]
    current = "/"
    st = os.lstat("/")
    out.extend(_judge("/", st, policy, passed_through=bool(pending), what=what, given=shown))
    links = 0
    while pending:
        comp = pending.pop()
        if comp == ".":
            continue
        if comp == "..":
            current = os.path.dirname(current)  # current is a real path: its parent was checked
            st = os.lstat(current)
            continue
        candidate = os.path.join(current, comp)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return Walked(tuple(out), None, None)
        except NotADirectoryError:
            return Walked(tuple(out), None, None)
        if stat.S_ISLNK(st.st_mode):
            out.extend(_judge(candidate, st, policy, passed_through=True, what=what, given=shown))
            links += 1
            if links > _MAX_SYMLINKS:
                loop = Violation(what, shown, candidate, "too many levels of symlinks", "fix the links")
                out.append(dataclasses.replace(loop, kind="symlink"))
                return Walked(tuple(out), None, None)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed([c for c in target.split("/") if c]))
            continue
        out.extend(_judge(candidate, st, policy, passed_through=bool(pending), what=what, given=shown))
        current = candidate
    return Walked(tuple(out), current, st)


def check_file(
    path: str | os.PathLike[str], policy: Policy, what: str, *, must_exist: bool = True
) -> list[Violation]:
    """:func:`walk`, and a missing path is a violation when ``must_exist``."""
    walked = walk(path, policy, what)
    out = list(walked.violations)
    if walked.resolved is None and must_exist:
        shown = os.fspath(path)
        out.append(Violation(what, shown, shown, "does not exist", _FIX_MISSING))
    return out


def find_executable(argv0: str, environ: Mapping[str, str]) -> str | None:
    """Where ``execvp`` would find ``argv0``: a path as given (relative to our working directory), or
    the first executable of that name on ``environ``'s PATH."""
    if "/" in argv0:
        return os.path.abspath(argv0)
    return shutil.which(argv0, path=environ.get("PATH", os.defpath))


def check_executable(argv0: str, policy: Policy, what: str, environ: Mapping[str, str]) -> list[Violation]:
    found = find_executable(argv0, environ)
    if found is None:
        return [
            Violation(
                what,
                argv0,
                argv0,
                f"not found on PATH ({environ.get('PATH', os.defpath)})",
                "install it, or give its absolute path",
            )
        ]
    walked = walk(found, policy, what, given=argv0)
    out = list(walked.violations)
    if walked.resolved is None:
        out.append(Violation(what, argv0, found, "does not exist", "install it, or " + _FIX_MISSING))
    elif walked.st is not None and not stat.S_ISREG(walked.st.st_mode):
        out.append(Violation(what, argv0, walked.resolved, "not a regular file", "point it at the program"))
    return out


def check_inputs(cfg: Config, environ: Mapping[str, str], policy: Policy | None = None) -> list[Violation]:
    """Every violation among the inputs our config names, except the migrations (their directory and
    files are checked by migration discovery, :func:`lssupervisor.worker.migrations.trust_violations`,
    which also knows a package's directory)."""
    pol = policy if policy is not None else Policy.for_config(cfg)
    out: list[Violation] = []
    if cfg.source is not None:
        out += check_file(cfg.source, pol, "config")
    out += check_file(cfg.lightningstream.template, pol, "LS template")
    if cfg.schema.target_file is not None:
        # Absent, it still decides the target the moment someone creates it: its directories count.
        out += check_file(cfg.schema.target_file, pol, "schema.target_file", must_exist=False)
    for key, hooks in (
        ("hooks.pre_migrate", cfg.hooks.pre_migrate),
        ("hooks.post_migrate", cfg.hooks.post_migrate),
    ):
        for i, argv in enumerate(hooks):
            out += check_executable(argv[0], pol, f"{key}[{i}]", environ)
    # What we write and read back: the rendered LS config (LS trusts it, credentials in its environment
    # go where it says), state.json, the pause flag, history, and the backups a rollback restores.
    out += check_file(cfg.state_dir, pol, "state_dir", must_exist=False)
    if cfg.backup.dir is not None:
        out += check_file(cfg.backup.dir, pol, "backup.dir", must_exist=False)
    binary = cfg.lightningstream.binary
    found = find_executable(binary, environ)
    if found is not None and os.path.exists(found):
        # Not found: `check` warns, and starting LS fails with its own message.
        out += check_executable(binary, pol, "lightningstream.binary", environ)
    return out


def require(violations: Sequence[Violation]) -> None:
    """Raise UntrustedInput naming the first violation (and how many more) when there are any."""
    if not violations:
        return
    more = len(violations) - 1
    tail = f" (and {more} more: `lssupervisor check` lists them)" if more else ""
    raise UntrustedInput(violations[0].line() + tail)


def lines(violations: Iterable[Violation]) -> list[str]:
    return [v.line() for v in violations]
