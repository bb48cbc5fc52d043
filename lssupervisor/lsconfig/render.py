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

import bisect
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lssupervisor.durations import parse_ns as parse_go_duration
from lssupervisor.errors import ConfigError, TemplateError
from lssupervisor.lsconfig.goenv import (
    IDENTIFIER,
    SHELL_OPERATORS,
    DollarRef,
    go_alnum,
    go_expand,
    go_expand_env,
    scan_dollars,
)
from lssupervisor.lsconfig.schema import (
    LS_CONFIG_KEYS,
    STORAGE_OPTIONS,
    Decoder,
    check_dupes,
    ls_check,
    ls_defaults,
    node_at,
)
from lssupervisor.lsconfig.values import sanitize_instance
from lssupervisor.lsmodel import DEFAULT_MAX_DBS, LmdbSpec, LsView
from lssupervisor.proc import child_env
from lssupervisor.redaction import is_credential_name

if TYPE_CHECKING:
    from lssupervisor.config import Config



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
    if not IDENTIFIER.fullmatch(variable):
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
                and go_alnum(previous.name[:1])
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
        elif IDENTIFIER.fullmatch(ref.name):
            if ref.name not in ls_env:
                unset.append((ref.name, line, ref.braced))
            elif ls_env[ref.name] == "":
                warnings.append(f"{where}: {written} is set but empty in LS's environment; LS will use ''")
        else:
            base = re.match(r"[A-Za-z_][A-Za-z0-9_]*", ref.name)
            if base is not None and ref.name[base.end() :].startswith(SHELL_OPERATORS):
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


# Where LS reads credentials: the only places a credential variable may be expanded. Anywhere else LS
# would put it on the wire (a global_prefix is in every S3 request path), in logs or in /storage.
CREDENTIAL_KEYS = frozenset(
    ("storage", "options", key) for key in ("access_key", "secret_key", "account_key")
)
# In a credential's value these would change the YAML around it (LS expands before parsing): a newline
# folds into a different secret, a quote ends the string, a backslash starts an escape.
_CREDENTIAL_UNSAFE = {"\n": "a newline", "\r": "a carriage return", '"': "a double quote",
                      "'": "a single quote", "\\": "a backslash"}


def _scalar_paths(text: str) -> list[tuple[int, int, tuple[str, ...]]] | None:
    """(start, end, key path) of every scalar of the template: values by the keys that lead to them,
    a mapping key by its own path plus ``<key>``. None when the template does not parse as YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    out: list[tuple[int, int, tuple[str, ...]]] = []

    def walk(node: yaml.Node | None, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                key = str(knode.value) if isinstance(knode, yaml.ScalarNode) else "?"
                out.append((knode.start_mark.index, knode.end_mark.index, (*path, key, "<key>")))
                walk(vnode, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, f"[{i}]"))
        elif isinstance(node, yaml.ScalarNode):
            out.append((node.start_mark.index, node.end_mark.index, path))

    walk(root, ())
    return out


def check_credentials(template: Template, ls_env: Mapping[str, str]) -> None:
    """Credentials only where LS reads them (I8's sibling: what we render never leaks a secret).

    A credential variable (its name says so, like ``AWS_SECRET_ACCESS_KEY``, or it is used in one of
    :data:`CREDENTIAL_KEYS`) may be expanded only in those keys: anywhere else LS would send it out
    (``global_prefix: app/${AWS_SECRET_ACCESS_KEY}/`` puts it in every S3 request). Its value must
    not contain a newline, quote or backslash, and no variable's value may contain a newline (it would
    change the YAML around it). Raises TemplateError naming the variable and where, never its value."""
    text = template.text
    places = _scalar_paths(text)
    refs: list[tuple[DollarRef, tuple[str, ...] | None]] = []
    for ref in scan_dollars(text):
        if not IDENTIFIER.fullmatch(ref.name) or ref.name == template.variable:
            continue
        where = None
        if places is not None:
            where = next((p for start, end, p in places if start <= ref.start < end), None)
            if where is None:
                continue  # outside every scalar: a comment (expanded by LS, sent nowhere)
        refs.append((ref, where))
    in_keys = {ref.name: ".".join(where) for ref, where in refs if where in CREDENTIAL_KEYS}
    allowed = ", ".join(".".join(k) for k in sorted(CREDENTIAL_KEYS))
    for ref, where in refs:
        name = ref.name
        line = f"{template.path}:{_line_of(text, ref.start)}"
        credential = is_credential_name(name) or name in in_keys
        if credential and where not in CREDENTIAL_KEYS:
            named = is_credential_name(name)
            why = "its name says it is a credential" if named else f"it is also used in {in_keys[name]}"
            place = "an unparsable template" if where is None else ".".join(p for p in where if p != "<key>")
            raise TemplateError(
                f"{line}: ${{{name}}} is used in {place}, but {why}: LS would send it out (object names, "
                f"request paths, logs); use credential variables only in {allowed}"
            )
        value = ls_env.get(name)
        if not value:
            continue
        if "\n" in value or "\r" in value:
            raise TemplateError(
                f"{line}: the value of ${{{name}}} in LS's environment contains a line break; LS pastes it "
                "into the YAML before parsing, so it would change the config around it (value not shown)"
            )
        if credential:
            bad = [what for c, what in _CREDENTIAL_UNSAFE.items() if c in value]
            if bad:
                raise TemplateError(
                    f"{line}: the value of ${{{name}}} in LS's environment contains {bad[0]}; LS pastes it "
                    "into the YAML before parsing, so the secret LS would use is not the one you set "
                    "(value not shown); use the *_file option for such a secret"
                )


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


# Kept whole: mirrors LS's own checks one by one, so the two can be read side by side.
def _validate(  # noqa: PLR0912
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
    check_dupes(root, errors)
    decoder = Decoder()
    cfg = decoder.decode(root, LS_CONFIG_KEYS, ls_defaults(), "")
    errors.extend(decoder.errors)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TemplateError(f"{where}: {errors[0]}{more}")
    problems = ls_check(cfg)
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
        if not isinstance(node_at(root, "storage", "options"), yaml.MappingNode):
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
    check_credentials(template, ls_env)
    text, warnings = _substitute(template, version, ls_env)
    expanded = go_expand_env(text, ls_env)
    view = _validate(expanded, f"{template.path} (rendered for version {version})", warnings)
    return Rendered(text=text, view=view, warnings=tuple(warnings))


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """The storage part of a rendered, expanded LS config (credentials included: memory only)."""

    type: str
    options: dict[str, Any] = field(repr=False)
    poll_interval_s: float  # storage_poll_interval


def storage_settings(template: Template, version: int, ls_env: Mapping[str, str]) -> StorageSettings:
    """The storage LS would use with the config rendered for ``version`` and expanded with ``ls_env``
    (the environment LS gets). The config is checked by :func:`render` first."""
    rendered = render(template, version, ls_env)
    doc = yaml.safe_load(go_expand_env(rendered.text, ls_env)) or {}
    storage = doc.get("storage") or {}
    options = dict(storage.get("options") or {})
    if storage.get("root_path"):
        options.setdefault("root_path", storage["root_path"])  # LS's deprecated spelling
    poll = doc.get("storage_poll_interval")
    if isinstance(poll, str):
        poll_s = parse_go_duration(poll) / 1e9
    elif isinstance(poll, int | float) and not isinstance(poll, bool):
        poll_s = poll / 1e9  # a bare number is nanoseconds
    else:
        poll_s = 1.0  # LS's default
    return StorageSettings(type=rendered.view.storage_type, options=options, poll_interval_s=poll_s)


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
    watchdog and socket-activation variables removed (:func:`lssupervisor.proc.child_env`: they belong to
    lssupervisor, never to LS)."""
    _check_version(version)
    env = child_env(base)
    env.update(child_env(cfg.lightningstream.env))
    env[cfg.schema.variable] = str(version)
    return env
