"""What a secret looks like, and how it is masked wherever we show something: status, metrics, logs.

One place for the rules, used by every plane: the daemon's status document and HTTP endpoints
(:func:`redact`), log lines that show a command line (:func:`redact_argv`: hooks, ``m.run`` tools, LS's
own argv), and the LS template's credential rules (:func:`is_credential_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REDACTED = "<redacted>"
# Key names whose values are credentials wherever they appear (env maps, storage options, hooks...).
SECRET_KEY_RE = re.compile(
    r"secret|password|passwd|token|key[_-]?id|access[_-]?key|private[_-]?key|credential", re.I
)
# Environment variable names that hold credentials (the storage keys LS reads, and the usual suspects).
CREDENTIAL_NAME_RE = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|ACCOUNT_KEY|CREDENTIAL|PRIVATE_KEY|KEY_ID", re.I
)
# user:password@ in URLs (an S3 endpoint or hook argument written with credentials).
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# --flag=value, -flag=value, NAME=value
_ASSIGNMENT_RE = re.compile(r"^(?P<name>-{0,2}[A-Za-z0-9_.-]+)=(?P<value>.*)$", re.S)


def is_credential_name(name: str) -> bool:
    """Does an environment variable of this name hold a credential?"""
    return CREDENTIAL_NAME_RE.search(name) is not None


def redact_text(text: str) -> str:
    """Credentials in URLs (``https://user:pass@host``) masked."""
    return _URL_USERINFO_RE.sub(r"\g<scheme>" + REDACTED + "@", text)


def redact(value: Any) -> Any:
    """A deep copy of ``value`` with secret-named keys' values masked, URL credentials removed and
    every ``argv`` list masked as :func:`redact_argv` does.

    Masks the value of every mapping key matching :data:`SECRET_KEY_RE` (the whole subtree, whatever
    its type), except None and "" which carry no secret and show that the setting is unset.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if SECRET_KEY_RE.search(key) and v is not None and v != "":
                out[key] = REDACTED
            elif key.endswith("argv") and isinstance(v, list | tuple) and all(isinstance(a, str) for a in v):
                out[key] = redact_argv(v)
            else:
                out[key] = redact(v)
        return out
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_argv(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """A command line fit for a log: the value of a secret-named option (``--password=x``,
    ``--token x``) or assignment (``AWS_SECRET_ACCESS_KEY=x``), URL credentials, and any argument equal
    to (or containing) one of ``secrets`` (values of credential variables) masked."""
    known = [s for s in secrets if len(s) >= 4]  # a 1-3 character "secret" would mask half the line
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        m = _ASSIGNMENT_RE.match(arg)
        if m is not None and SECRET_KEY_RE.search(m["name"]):
            out.append(f"{m['name']}={REDACTED}")
            continue
        if arg.startswith("-") and SECRET_KEY_RE.search(arg):
            out.append(arg)
            hide_next = True  # "--password VALUE"
            continue
        text = redact_text(arg)
        for secret in known:
            text = text.replace(secret, REDACTED)
        out.append(text)
    return out


def credential_values(environ: Mapping[str, str]) -> list[str]:
    """The values of the credential variables of ``environ`` (to mask them wherever they show up)."""
    return [v for k, v in environ.items() if v and is_credential_name(k)]
