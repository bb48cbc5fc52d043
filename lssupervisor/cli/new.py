"""``lssupervisor new "MESSAGE"``: write the next migration file, ready to fill in (as ``alembic
revision`` does).

The file is ``<migrations>/NNNN_<slug>.py`` with the next free version, the message as its docstring
(the first line is the description ``plan`` and ``history`` show), ``VERSION``, ``STRATEGY`` (``LMDB``
when the LS config has several) and, inside ``upgrade(m)``, the timestamp rule of the strategy and a
commented example taken from ``examples/migrations/``. The body raises ``NotImplementedError`` until
it is written: a scaffold shipped by mistake fails its step (nothing is written, the LMDB stays on
the old version) instead of moving the marker without migrating anything; ``check`` warns about it.

Refused, with one line, when:

- the directory already has problems (``lssupervisor check`` lists them): the next number would be a
  guess;
- a daemon runs with this config: it watches the directory and would run the unfinished file at once
  (write migrations in the application's source tree, with its own config, and ship them);
- ``prefix`` is asked for but the LS template's storage location does not carry the version (``check``
  would refuse the file); or the LS config has several LMDBs and ``--lmdb`` is missing.

stdout is only the path (``$EDITOR "$(lssupervisor new 'Split names')"``); the next steps go to stderr.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import sys
import textwrap
import unicodedata
from pathlib import Path

from lssupervisor.config import Config, load_config
from lssupervisor.errors import LockHeld, MigrationLoadError, SupervisorError, UsageError
from lssupervisor.worker import migrations
from lssupervisor.worker.migrations import Strategy

SLUG_MAX = 40

# The spellings the command line takes: the file's own ("new-dbi") and an identifier-like one.
STRATEGY_NAMES = {
    "prefix": Strategy.PREFIX,
    "new_dbi": Strategy.NEW_DBI,
    "new-dbi": Strategy.NEW_DBI,
    "in_place": Strategy.IN_PLACE,
    "in-place": Strategy.IN_PLACE,
}

# What each strategy means for what `m` writes, and an example from examples/migrations/<strategy>/
# (tested there), as comments inside upgrade(m).
_RULES = {
    Strategy.PREFIX: """\
STRATEGY "prefix": the LS storage prefix carries the schema version, so this version's data
syncs in a new, empty place. Entries you rewrite keep their timestamps; a new key takes the
timestamp of its source (the entry m.items() yielded or m.get() read last), so every instance
derives the same entry.""",
    Strategy.NEW_DBI: """\
STRATEGY "new-dbi": same storage prefix; write only DBIs that did not exist before this step
(old application versions keep using the old ones). Copies keep their sources' timestamps.""",
    Strategy.IN_PLACE: """\
STRATEGY "in-place": same prefix, same DBIs. Every entry you change gets a fresh timestamp
above its old one, or LS would reload its own older snapshot and silently revert the change;
the price: the rewrite wins over concurrent edits of that key made elsewhere. Unchanged values
are not written.""",
}

_EXAMPLES = {
    Strategy.PREFIX: """\
Example (examples/migrations/prefix/0001_split_names.py; it needs `import json` at the top): split
users' "name" into "first" and "last", and index users by last name.

    for key, value in m.items("users"):
        user = json.loads(value)
        if "name" not in user:
            continue  # already in the new shape
        first, _, last = user.pop("name").partition(" ")
        user["first"], user["last"] = first, last
        m.put("users", key, json.dumps(user, sort_keys=True).encode())
        # a derived key: it takes the timestamp of its source (this user)
        m.put("users_by_last", last.lower().encode() + b"/" + key, b"")""",
    Strategy.NEW_DBI: """\
Example (examples/migrations/new_dbi/0001_users_v2.py; it needs `import json` at the top): move
users from "name,email" CSV values in DBI users to JSON values in the new DBI users_v2.

    def to_json(key, value):
        name, _, email = value.decode().partition(",")
        if not email:
            return None  # a broken record is not carried over
        return key, json.dumps({"name": name, "email": email}, sort_keys=True).encode()

    copied = m.copy_dbi("users", "users_v2", to_json)
    m.log.info("copied %d users", copied)""",
    Strategy.IN_PLACE: """\
Example (examples/migrations/in_place/0001_normalise_emails.py; it needs `import json` at the
top): lower-case every user's email address.

    total = m.txn.stat(m.db("users"))["entries"]
    for done, (key, value) in enumerate(m.items("users"), start=1):
        user = json.loads(value)
        email = user.get("email", "")
        if email != email.lower():
            user["email"] = email.lower()
            m.put("users", key, json.dumps(user, sort_keys=True).encode())
        m.progress(done, total)""",
}


def parse_strategy(text: str) -> Strategy:
    """``--strategy``: prefix, new_dbi or in_place (the file's spellings new-dbi, in-place too)."""
    try:
        return STRATEGY_NAMES[text]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {text!r} (expected prefix, new_dbi or in_place)"
        ) from None


def slugify(message: str) -> str:
    """The file-name slug of a message: its first line, ASCII-folded, lower case, words joined by ``_``,
    at most SLUG_MAX characters (whole words); ``migration`` when nothing is left."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    folded = unicodedata.normalize("NFKD", first).encode("ascii", "ignore").decode()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", folded.lower()):
        longer = f"{slug}_{word}" if slug else word
        if len(longer) > SLUG_MAX:
            return slug or word[:SLUG_MAX]
        slug = longer
    return slug or "migration"


def _docstring(message: str) -> str:
    """``message`` as a module docstring that reads back exactly (``ast.get_docstring``)."""
    text = message.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if text.endswith('"'):
        text = text[:-1] + '\\"'
    literal = f'"""{text}"""'
    if _reads_back(literal, message):
        return literal
    return repr(message)  # control characters and the like: an escaped one-line literal reads back too


def _reads_back(literal: str, message: str) -> bool:
    try:
        tree = ast.parse(literal + "\n")
    except (SyntaxError, ValueError):
        return False
    return ast.get_docstring(tree) == inspect.cleandoc(message)


def _comment(text: str) -> str:
    """``text`` as comment lines inside ``upgrade``: prose paragraphs rewrapped to fit 88 columns,
    code blocks (indented 4) kept as they are."""
    out: list[str] = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if out:
            out.append("")
        if all(line.startswith("    ") for line in lines):
            out.extend(lines)
        else:
            out.extend(textwrap.wrap(" ".join(lines), width=88 - len("    # ")))
    return "\n".join(f"    # {line}".rstrip() for line in out)


def render(message: str, version: int, strategy: Strategy, lmdb: str | None) -> str:
    """The text of a new migration file."""
    name_line = f'LMDB = "{lmdb}"\n' if lmdb else ""
    replaces_line = (
        "# REPLACES = [\"users\"]  # DBIs this step makes obsolete; `lssupervisor prune` retires them later\n"
        if strategy is Strategy.NEW_DBI
        else ""
    )
    return (
        f"{_docstring(message)}\n"
        "\n"
        f"VERSION = {version}\n"
        f'STRATEGY = "{strategy.value}"\n'
        f"{name_line}"
        f"{replaces_line}"
        "\n"
        "\n"
        "def upgrade(m):\n"
        f"{_comment(_RULES[strategy])}\n"
        "    # The API `m` and the rules: docs/migrations.md; test it with lssupervisor.testing.fixtures.\n"
        "    #\n"
        f"{_comment(_EXAMPLES[strategy])}\n"
        "    #\n"
        "    # Until this raise is replaced, the step fails and the LMDB stays on the old version.\n"
        '    raise NotImplementedError("write upgrade(m): this is the scaffold `lssupervisor new` wrote")\n'
    )


def _migrations_dir(cfg: Config) -> Path:
    source = cfg.migrations.path if cfg.migrations.path is not None else cfg.migrations.package
    assert source is not None  # config validation requires one of them
    return migrations.resolve_source(source)


def _lmdb_names(cfg: Config) -> tuple[list[str], bool]:
    """The LS config's LMDB names, and whether its storage location carries the schema version."""
    from lssupervisor.lsconfig import render as lsconfig

    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    # Structure only: an unset ${AWS_SECRET_ACCESS_KEY} in an author's shell must not stop this.
    env = lsconfig.lenient_env(lsconfig.ls_environment(cfg, 0, os.environ))
    view = lsconfig.inspect_template(template, env)
    try:
        lsconfig.check_prefix_safety(template, env)
        versioned = True
    except SupervisorError:
        versioned = False
    return [spec.name for spec in view.lmdbs], versioned


def _refuse_if_daemon_runs(cfg: Config, directory: Path) -> None:
    from lssupervisor.daemon import lock

    held = lock.holder(cfg)
    if held is not None and held.purpose == "daemon":
        raise LockHeld(
            f"the daemon (pid {held.pid}) runs with {cfg.source or 'this config'} and "
            f"would run an unfinished migration in {directory} at once; write migrations in your "
            "application's source tree (with its own config) and ship them with a release",
            holder_pid=held.pid,
        )


def cmd_new(args: argparse.Namespace) -> int:
    message = args.message.strip()
    if not message:
        raise UsageError("the message must not be empty (it describes the migration)")
    cfg = load_config(args.config)
    directory = _migrations_dir(cfg)
    names, versioned = _lmdb_names(cfg)
    found = migrations.scan(directory, names)
    if found.problems:
        raise MigrationLoadError(
            f"{len(found.problems)} problem(s) in {directory} (first: "
            f"{found.problems[0]}); fix them first, `lssupervisor check -c {args.config}` lists them"
        )
    _refuse_if_daemon_runs(cfg, directory)
    strategy: Strategy = args.strategy
    if strategy is Strategy.PREFIX and not versioned:
        raise UsageError(
            f"the LS template's storage location does not contain "
            f"${{{cfg.schema.variable}}}, so `check` refuses prefix migrations; pass --strategy new_dbi "
            "or --strategy in_place (docs/migrations.md tells which), or version the location first"
        )
    lmdb: str | None = args.lmdb
    if lmdb is not None and lmdb not in names:
        raise UsageError(
            f"--lmdb {lmdb!r} is not an lmdb of the LS config ({', '.join(names)})"
        )
    if lmdb is None and len(names) > 1:
        raise UsageError(
            f"the LS config has {len(names)} lmdbs ({', '.join(names)}); say which one "
            "this migration changes with --lmdb NAME"
        )
    version = found.next_version
    path = directory / f"{version:04d}_{slugify(message)}.py"
    text = render(message, version, strategy, lmdb)
    try:
        # O_EXCL: never overwrite; 0644: the loader refuses world-writable migration files.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"{path} exists already") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    print(path)
    print(
        f"next: write upgrade(m) in {path.name}, test it (docs/migrations.md, \"Testing your migrations\"), "
        f"then `lssupervisor check -c {args.config}`",
        file=sys.stderr,
    )
    return 0
