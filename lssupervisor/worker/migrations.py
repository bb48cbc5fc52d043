"""Migration files shipped by the application: discover, validate, load, check, plan.

Theory of operation
-------------------
A migration source is a directory, or an importable package (its directory is used), holding files
``NNNN_slug.py`` (``_*.py``, ``test_*.py``, ``*_test.py`` and ``conftest.py`` are ignored; any other
``.py`` file is an error, so a misnamed migration is never skipped silently). Each file declares, as
**literals** at module level::

    \"\"\"Split the name field into first and last.\"\"\"   # docstring = description (required)
    VERSION = 3                # contiguous from 1, equal to the number in the file name
    LMDB = "main"              # optional; required when the LS config has several lmdbs
    STRATEGY = "prefix"        # "prefix" (default) | "new-dbi" | "in-place"
    REPLACES = ["users"]       # new-dbi only: DBIs this step makes obsolete (``prune`` retires them)

    def upgrade(m): ...        # m is a lssupervisor.worker.migrator.MigrationApi

Two phases, kept apart (as alembic does):

- :func:`scan` reads and validates files WITHOUT running them: names, literals (parsed with
  ``ast``), ``upgrade`` present, ownership/permissions, sha256 checksum, gaps and duplicates. It collects
  every problem (``lssupervisor check`` lists them all); :func:`discover` is :func:`scan` that raises
  one MigrationLoadError naming them all. The daemon (which never opens an LMDB) can use it to plan and
  to check safely.
- :func:`load` = :func:`discover` + import of every file under a private module name
  (``_lssupervisor_mig_<hash>_<stem>``: two migration directories never clash, and a changed file is a new
  module). Import errors are reported with file and line. Only a worker process should call it.

:func:`check_checksums` compares applied history with the files (Flyway's ``validate``).
:func:`plan` turns the current version of each LMDB and a target into ordered :class:`Step` s.

Versions are global to the application (one number goes into the storage prefix). A migration belongs
to one LMDB; for the other LMDBs that version changes nothing, so their marker just moves along (a
step for LMDB ``L`` brings its marker from ``from_version`` to ``to_version`` and runs at most one
migration; a step without migration is a marker-only step).
"""

from __future__ import annotations

import ast
import enum
import hashlib
import importlib.util
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from lssupervisor import trust
from lssupervisor.errors import ChecksumMismatch, MigrationError, MigrationLoadError, SchemaTooNew

FILE_RE = re.compile(r"^(?P<number>[0-9]{4,})_(?P<slug>[A-Za-z0-9][A-Za-z0-9_]*)\.py$")

# The signature of a migration's entry point; the argument is a lssupervisor.worker.migrator.MigrationApi.
UpgradeFn = Callable[[Any], None]


class Strategy(enum.Enum):
    """How a migration's writes get their LS timestamps (see docs/migrations.md)."""

    PREFIX = "prefix"  # new storage prefix per version: keep timestamps
    NEW_DBI = "new-dbi"  # same prefix, write only DBIs new in this step: keep source timestamps
    IN_PLACE = "in-place"  # same prefix, rewrite in place: fresh timestamps


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file, validated. ``upgrade`` is None until :func:`load` imported it."""

    version: int
    slug: str
    path: Path
    description: str
    lmdb: str
    strategy: Strategy
    checksum: str  # sha256 hex of the file bytes
    upgrade: UpgradeFn | None = field(default=None, compare=False, repr=False)
    # new-dbi: the DBIs this step replaces; once every instance is past it, `prune` tombstones them.
    replaces: tuple[str, ...] = ()
    # The bytes the checksum was taken of: what import_migration compiles (never re-read, I8).
    source: bytes = field(default=b"", compare=False, repr=False)

    @property
    def name(self) -> str:
        """The file stem, e.g. ``0003_split_names`` (recorded in markers and history)."""
        return self.path.stem


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """All migrations of one source, ordered by version (1..n, no gaps)."""

    source: str
    directory: Path
    migrations: tuple[Migration, ...]

    @property
    def newest(self) -> int:
        """The newest known version (0 when there are no migrations)."""
        return self.migrations[-1].version if self.migrations else 0

    def get(self, version: int) -> Migration:
        return self.migrations[version - 1]

    def by_name(self, name: str) -> Migration | None:
        for mig in self.migrations:
            if mig.name == name:
                return mig
        return None

    def for_lmdb(self, lmdb: str) -> tuple[Migration, ...]:
        return tuple(m for m in self.migrations if m.lmdb == lmdb)

    @property
    def loaded(self) -> bool:
        return all(m.upgrade is not None for m in self.migrations)


@dataclass(frozen=True, slots=True)
class Step:
    """One write transaction on one LMDB: run ``migration`` (None = marker only) and move the marker
    from ``from_version`` to ``to_version``."""

    lmdb: str
    from_version: int
    to_version: int
    migration: Migration | None

    def describe(self) -> str:
        what = self.migration.name if self.migration else "marker only"
        return f"{self.lmdb}: {self.from_version} -> {self.to_version} ({what})"


@dataclass(frozen=True, slots=True)
class Plan:
    """Ordered steps per LMDB. ``current`` and ``target`` are per LMDB name."""

    current: Mapping[str, int]
    target: int
    steps: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not self.steps

    def for_lmdb(self, lmdb: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.lmdb == lmdb)


# ---------------------------------------------------------------------------------------------------
# discovery


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A directory path, or the dotted name of an importable package (its directory).

    Importing a package runs its ``__init__``; the migration files themselves are not imported here.
    """
    path = Path(source)
    if path.is_dir():
        return path.resolve()
    text = os.fspath(source)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", text):
        try:
            spec = importlib.util.find_spec(text)
        except (ImportError, ValueError) as exc:
            raise MigrationLoadError(
                f"migrations {text!r}: not a directory and not an importable package ({exc})"
            ) from exc
        if spec is not None and spec.submodule_search_locations:
            locations = list(spec.submodule_search_locations)
            return Path(locations[0]).resolve()
    raise MigrationLoadError(
        f"migrations {text!r}: not a directory and not an importable package; "
        "set the migrations path to the directory of NNNN_slug.py files"
    )


def _policy(policy: trust.Policy | None) -> trust.Policy:
    return policy if policy is not None else trust.Policy.current()


def check_trusted(path: Path, policy: trust.Policy | None = None, what: str = "migration file") -> str:
    """Refuse a file or directory that anyone but root, us (or the trusted group) could have written,
    itself or through any directory or symlink on the way to it: we execute it as code (I8). Returns
    the real path (symlinks resolved, each one checked)."""
    walked = trust.walk(path, _policy(policy), what)
    if walked.violations:
        raise MigrationLoadError(walked.violations[0].line())
    if walked.resolved is None:
        raise MigrationLoadError(f"{path}: {what} does not exist")
    return walked.resolved


def _as_given(source: str | os.PathLike[str], directory: Path) -> Path:
    """The path to walk for trust: as configured (so a symlink on the way is checked too), or the
    package's directory."""
    given = Path(source)
    return given if given.is_dir() else directory


def _candidates(directory: Path) -> list[Path]:
    """The files of ``directory`` that discovery treats as migrations (or refuses as misnamed)."""
    out: list[Path] = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.endswith(".py") or name.startswith(("_", ".")):
            continue  # __init__.py, editor files, caches (never used: see load)
        if name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py":
            continue  # tests of the migrations may live beside them; we never run those
        out.append(entry)
    return out


def trust_violations(
    source: str | os.PathLike[str], policy: trust.Policy | None = None
) -> list[trust.Violation]:
    """Every trust violation of the migrations directory and its migration files (for ``check``,
    which reports them all; :func:`discover` refuses at the first)."""
    pol = _policy(policy)
    directory = resolve_source(source)
    out = list(trust.check_file(_as_given(source, directory), pol, "migrations directory"))
    if out:
        return out
    for entry in _candidates(directory):
        out.extend(trust.check_file(entry, pol, "migration file"))
    return out


_NOT_LITERAL = object()


def _inspect(
    path: Path, source: bytes, problems: list[str]
) -> tuple[str, dict[str, tuple[Any, int]], bool] | None:
    """Docstring, top-level literal assignments we care about (value, line), has ``def upgrade(m)``.

    Every problem is appended to ``problems`` (so one look names them all); None when the file does
    not even parse."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        problems.append(f"{path}:{exc.lineno}: syntax error: {exc.msg}")
        return None
    doc = ast.get_docstring(tree) or ""
    assigned: dict[str, tuple[Any, int]] = {}
    has_upgrade = False

    def record(target: ast.expr, value: ast.expr, lineno: int) -> None:
        # "VERSION = 3" and "VERSION: int = 3" are the same assignment: a second one of either form is
        # refused, or which value we read would depend on which form came last.
        if isinstance(target, ast.Name) and target.id in ("VERSION", "LMDB", "STRATEGY", "REPLACES"):
            if target.id in assigned:
                problems.append(f"{path}:{lineno}: {target.id} assigned twice")
                return
            try:
                assigned[target.id] = (ast.literal_eval(value), lineno)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                problems.append(
                    f"{path}:{value.lineno}: {target.id} must be a literal (it is read without running "
                    "the file)"
                )
                assigned[target.id] = (_NOT_LITERAL, lineno)

    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            record(node.targets[0], node.value, node.lineno)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            record(node.target, node.value, node.lineno)
        elif isinstance(node, ast.FunctionDef) and node.name == "upgrade":
            args = node.args
            positional = len(args.posonlyargs) + len(args.args)
            if (
                positional != 1
                or args.vararg
                or (args.kwonlyargs and any(d is None for d in args.kw_defaults))
            ):
                problems.append(
                    f"{path}:{node.lineno}: upgrade must take exactly one argument: def upgrade(m)"
                )
            has_upgrade = True
        elif isinstance(node, ast.AsyncFunctionDef) and node.name == "upgrade":
            problems.append(f"{path}:{node.lineno}: upgrade must be a plain def, not async")
            has_upgrade = True
    return doc, assigned, has_upgrade


def _read_trusted(path: Path, policy: trust.Policy) -> bytes:
    """The file's bytes, read once through a descriptor whose file was checked: the path is walked
    (every parent and symlink trusted, so nobody else can swap the file), and the opened file must be
    the one that was checked (same device and inode) and trusted itself."""
    real = check_trusted(path, policy)
    try:
        # The real path has no symlink left: O_NOFOLLOW refuses one swapped in since the walk.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise MigrationLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MigrationLoadError(f"{path}: not a regular file")
        if st.st_uid not in (0, policy.euid) and st.st_gid != policy.trusted_gid:
            raise MigrationLoadError(f"{path}: changed owner while being read (uid {st.st_uid}); refusing it")
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise MigrationLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    finally:
        os.close(fd)


# Kept whole: collects every problem of a file instead of stopping at the first.
def _discover_file(  # noqa: PLR0912
    path: Path, number: int, slug: str, lmdb_names: Sequence[str], policy: trust.Policy
) -> tuple[Migration | None, list[str]]:
    """One file: the migration, or None and every problem found in it (trust included)."""
    problems = [v.line() for v in trust.check_file(path, policy, "migration file")]
    try:
        # An untrusted file is still read (reading is safe), so that its other faults count too; only a
        # trusted one is read through the checked descriptor and can become a Migration.
        data = path.read_bytes() if problems else _read_trusted(path, policy)
    except MigrationLoadError as exc:
        return None, [*problems, str(exc)]
    except OSError as exc:
        return None, [*problems, f"{path}: cannot read ({exc.strerror})"]
    checksum = hashlib.sha256(data).hexdigest()
    inspected = _inspect(path, data, problems)
    if inspected is None:
        return None, problems
    doc, assigned, has_upgrade = inspected
    if not doc.strip():
        problems.append(f"{path}: missing module docstring; its first line describes the migration")
    version: Any = None
    if "VERSION" not in assigned:
        problems.append(f"{path}: missing VERSION = {number}")
    else:
        version, line = assigned["VERSION"]
        if version is not _NOT_LITERAL and (type(version) is not int or version != number):
            problems.append(
                f"{path}:{line}: VERSION = {version!r} does not match the file name number {number}"
            )
    if not has_upgrade:
        problems.append(f"{path}: missing top-level def upgrade(m)")
    strategy = Strategy.PREFIX
    strategy_text, line = assigned.get("STRATEGY", (Strategy.PREFIX.value, 0))
    if strategy_text is not _NOT_LITERAL:
        try:
            strategy = Strategy(strategy_text)
        except (ValueError, TypeError):
            allowed = ", ".join(repr(s.value) for s in Strategy)
            problems.append(f"{path}:{line}: STRATEGY = {strategy_text!r} is not one of {allowed}")
    lmdb = ""
    known = ", ".join(repr(n) for n in lmdb_names) or "(none)"
    if "LMDB" in assigned:
        lmdb, line = assigned["LMDB"]
        if lmdb is not _NOT_LITERAL and (not isinstance(lmdb, str) or lmdb not in lmdb_names):
            problems.append(
                f"{path}:{line}: LMDB = {lmdb!r} is not an lmdb of the LS config (known: {known})"
            )
    elif len(lmdb_names) == 1:
        lmdb = lmdb_names[0]
    else:
        problems.append(
            f'{path}: LMDB = "..." is required because the LS config has {len(lmdb_names)} lmdbs ({known})'
        )
    replaces: tuple[str, ...] = ()
    if "REPLACES" in assigned:
        value, line = assigned["REPLACES"]
        if value is _NOT_LITERAL:
            pass  # reported above
        elif not isinstance(value, list | tuple) or not all(isinstance(d, str) and d for d in value):
            problems.append(f'{path}:{line}: REPLACES must be a list of DBI names, e.g. ["users"]')
        else:
            if strategy is not Strategy.NEW_DBI:
                problems.append(
                    f"{path}:{line}: REPLACES is for STRATEGY 'new-dbi' (the step writes new DBIs and the "
                    f"ones it names become obsolete); this migration is {strategy.value!r}"
                )
            for dbi in value:
                if dbi.startswith("_sync"):
                    problems.append(f"{path}:{line}: REPLACES {dbi!r}: LS's _sync* DBIs are not data")
            if len(set(value)) != len(value):
                problems.append(f"{path}:{line}: REPLACES names a DBI twice")
            replaces = tuple(value)
    if problems:
        return None, problems
    migration = Migration(
        version=version,
        slug=slug,
        path=path,
        description=doc.strip().splitlines()[0],
        lmdb=lmdb,
        strategy=strategy,
        checksum=checksum,
        replaces=replaces,
        source=data,
    )
    return migration, []


@dataclass(frozen=True, slots=True)
class Scan:
    """Everything discovery saw in a migration directory: the valid migrations and every problem
    (one line each, naming the file and, where there is one, the line), in file order.

    ``versions`` are the numbers of every well-named file, valid or not: the next free version is
    ``max(versions) + 1``, and a gap is reported only where no file claims the number."""

    source: str
    directory: Path
    migrations: tuple[Migration, ...]
    problems: tuple[str, ...]
    versions: tuple[int, ...]

    @property
    def next_version(self) -> int:
        return max(self.versions, default=0) + 1

    def as_set(self) -> MigrationSet:
        """The migrations, once there are no problems (else one MigrationLoadError naming them all)."""
        if self.problems:
            raise problems_error(self.directory, self.problems)
        return MigrationSet(source=self.source, directory=self.directory, migrations=self.migrations)


def problems_error(directory: Path, problems: Sequence[str]) -> MigrationLoadError:
    """One error for one or more problems: a single problem is its own message; several are counted
    and listed in one line (a log line, a PARKED reason), each still naming its file."""
    if len(problems) == 1:
        return MigrationLoadError(problems[0])
    return MigrationLoadError(
        f"{len(problems)} problems in the migrations in {directory}: " + "; ".join(problems)
    )


def scan(
    source: str | os.PathLike[str], lmdb_names: Sequence[str], policy: trust.Policy | None = None
) -> Scan:
    """Find and validate every migration of ``source`` without running any of them, collecting every
    problem instead of stopping at the first (``lssupervisor check`` lists them all).

    ``lmdb_names`` are the ``lmdbs`` of the LS config; ``policy`` says who may have written the files
    (default: root and our effective uid). A source that is not a directory or package raises
    MigrationLoadError (there is nothing to scan)."""
    pol = _policy(policy)
    directory = resolve_source(source)
    problems = [v.line() for v in trust.check_file(_as_given(source, directory), pol, "migrations directory")]
    found: dict[int, Migration] = {}
    owners: dict[int, str] = {}  # version -> the first file name claiming it
    for entry in _candidates(directory):
        name = entry.name
        if not entry.is_file():
            problems.append(f"{entry}: not a regular file")
            continue
        match = FILE_RE.match(name)
        if match is None:
            problems.append(
                f"{entry}: bad migration file name; expected NNNN_slug.py (e.g. 0003_split_names.py)"
            )
            continue
        number = int(match["number"])
        if number in owners:
            problems.append(f"{entry}: duplicate version {number} (also {owners[number]})")
        else:
            owners[number] = name
        migration, file_problems = _discover_file(entry, number, match["slug"], lmdb_names, pol)
        problems.extend(file_problems)
        if migration is not None and number not in found:
            found[number] = migration
    expected = 1
    for number in sorted(owners):
        if number > expected:
            missing = f"{expected} is" if number == expected + 1 else f"{expected} to {number - 1} are"
            problems.append(
                f"{directory}: gap in migration versions: {missing} missing before {owners[number]}"
            )
        expected = number + 1
    replaced: dict[tuple[str, str], str] = {}
    for number in sorted(found):
        mig = found[number]
        for dbi in mig.replaces:
            earlier = replaced.get((mig.lmdb, dbi))
            if earlier is not None:
                problems.append(
                    f"{mig.path}: REPLACES {dbi!r}, already replaced by {earlier}: a retired DBI is dead for "
                    "good (prune tombstones every entry of it), never write it again"
                )
            replaced[(mig.lmdb, dbi)] = mig.name
    return Scan(
        source=os.fspath(source),
        directory=directory,
        migrations=tuple(found[n] for n in sorted(found)),
        problems=tuple(problems),
        versions=tuple(sorted(owners)),
    )


def unwritten_line(path: Path) -> int | None:
    """The line of a ``raise NotImplementedError`` directly in ``upgrade``'s body (what the scaffold of
    ``lssupervisor new`` leaves there), or None. Read with ``ast``, never run; None for a file that
    does not parse (discovery reports that)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "upgrade":
            for stmt in node.body:
                if isinstance(stmt, ast.Raise) and stmt.exc is not None:
                    exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
                    if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                        return stmt.lineno
    return None


def discover(
    source: str | os.PathLike[str], lmdb_names: Sequence[str], policy: trust.Policy | None = None
) -> MigrationSet:
    """Find and validate every migration of ``source`` without running any of them.

    ``lmdb_names`` are the ``lmdbs`` of the LS config; ``policy`` as for :func:`scan`. Raises one
    MigrationLoadError naming every problem (each with its file and line), so a fix-and-retry loop sees
    them all at once."""
    return scan(source, lmdb_names, policy).as_set()


# ---------------------------------------------------------------------------------------------------
# loading (executes the files)


def _module_name(mig: Migration) -> str:
    where = hashlib.sha256(str(mig.path.parent).encode()).hexdigest()[:12]
    return f"_lssupervisor_mig_{where}_{mig.path.stem}_{mig.checksum[:12]}"


def _import_error(mig: Migration, exc: BaseException) -> MigrationLoadError:
    line = 0
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(mig.path):
            line = frame.lineno or 0
    if isinstance(exc, SyntaxError) and exc.lineno:
        line = exc.lineno
    where = f"{mig.path}:{line}" if line else str(mig.path)
    return MigrationLoadError(f"{where}: import failed: {type(exc).__name__}: {exc}")


def import_migration(mig: Migration) -> Migration:
    """Execute one discovered migration; returns it with ``upgrade`` set. Runs module-level code.

    The code is compiled from ``mig.source``, the very bytes whose sha256 is ``mig.checksum`` (what
    history and the marker record): the file is not read again, and no ``__pycache__`` is read or
    written (no import machinery is involved), so what runs is exactly what was hashed (I8)."""
    if mig.upgrade is not None:
        return mig
    if hashlib.sha256(mig.source).hexdigest() != mig.checksum:
        raise MigrationLoadError(f"{mig.path}: source bytes do not match the checksum taken at discovery")
    name = _module_name(mig)
    module: ModuleType | None = sys.modules.get(name)
    if module is None:
        module = ModuleType(name, mig.description)
        module.__file__ = str(mig.path)
        # Registered so that dataclasses/pickling inside the file work; the private name keeps two
        # migration directories (or two versions of one file) from ever sharing a module.
        sys.modules[name] = module
        try:
            code = compile(mig.source, str(mig.path), "exec", dont_inherit=True)
            exec(code, module.__dict__)
        except BaseException as exc:
            sys.modules.pop(name, None)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise _import_error(mig, exc) from exc
    upgrade = getattr(module, "upgrade", None)
    if not callable(upgrade):
        raise MigrationLoadError(f"{mig.path}: upgrade is not callable after import")
    if getattr(module, "VERSION", None) != mig.version:
        raise MigrationLoadError(f"{mig.path}: VERSION changed while importing (computed at import?)")
    return replace(mig, upgrade=upgrade)


def load(
    source: str | os.PathLike[str], lmdb_names: Sequence[str], policy: trust.Policy | None = None
) -> MigrationSet:
    """:func:`discover`, then execute every file from the bytes discovery read and hashed
    (module-level code runs; ``upgrade`` does not)."""
    found = discover(source, lmdb_names, policy)
    return replace(found, migrations=tuple(import_migration(m) for m in found.migrations))


# ---------------------------------------------------------------------------------------------------
# validation against history


def check_checksums(migrations: MigrationSet, applied: Mapping[int, str] | Iterable[tuple[int, str]]) -> None:
    """Compare applied history (version -> sha256 recorded when it ran) with the files now.

    Raises ChecksumMismatch naming the file, the recorded and the actual checksum. A recorded version
    that has no file any more is not checked here (:func:`plan` reports SchemaTooNew for it).
    """
    pairs = applied.items() if isinstance(applied, Mapping) else applied
    for version, recorded in pairs:
        if not recorded or not 1 <= version <= migrations.newest:
            continue
        mig = migrations.get(version)
        if mig.checksum != recorded:
            raise ChecksumMismatch(
                f"{mig.path}: changed since it was applied: recorded sha256 {recorded}, "
                f"now {mig.checksum}; restore the applied file (never edit an applied migration, "
                "add a new one)"
            )


# ---------------------------------------------------------------------------------------------------
# planning


def plan(migrations: MigrationSet, current: Mapping[str, int], target: int | None = None) -> Plan:
    """Ordered steps that bring every LMDB in ``current`` (name -> marker version) to ``target``
    (default: the newest migration).

    Raises SchemaTooNew when a marker is newer than the newest migration (never migrate down), and
    MigrationError when ``target`` is unknown or below a current version.
    """
    newest = migrations.newest
    goal = newest if target is None else target
    if goal < 0 or goal > newest:
        raise MigrationError(
            f"target version {goal} is unknown: the migrations in {migrations.directory} go up to {newest}"
        )
    for lmdb, version in sorted(current.items()):
        if version > newest:
            raise SchemaTooNew(
                f"LMDB {lmdb!r} is at schema version {version}, newer than the newest migration "
                f"{newest} in {migrations.directory}; this application is too old for it: deploy the "
                "newer application or restore a backup taken before the migration (never migrated down)"
            )
        if version > goal:
            raise MigrationError(
                f"LMDB {lmdb!r} is at schema version {version}, above the target {goal}; migrations "
                "only go up: restore a backup of that version instead"
            )
    steps: list[Step] = []
    for lmdb, version in sorted(current.items()):
        if version == goal:
            continue
        mine = [m for m in migrations.for_lmdb(lmdb) if version < m.version <= goal]
        if not mine:
            steps.append(Step(lmdb, version, goal, None))
            continue
        start = version
        for i, mig in enumerate(mine):
            # Versions of other LMDBs between this migration and our next one change nothing here, so
            # the step moves the marker over them too (fewer transactions, same schema).
            end = mine[i + 1].version - 1 if i + 1 < len(mine) else goal
            steps.append(Step(lmdb, start, end, mig))
            start = end
    return Plan(current=dict(current), target=goal, steps=tuple(steps))
