"""Format change: users records move from name=Alice;email=a@x text to JSON.

Version 2 of the demo application writes {"email": "a@x", "name": "Alice"}. Strategy ``prefix``: the
new version syncs under its own storage prefix, so every rewritten record keeps its LS timestamp and
instances still on version 1 (another prefix) never see, nor overwrite, a JSON record. Once every
instance has migrated, their data merges per key by the real time of each change.
"""

import json

from lssupervisor.migrator import MigrationApi

VERSION = 2
STRATEGY = "prefix"


def _parse_v1(text: str) -> dict[str, str]:
    record: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"not a version 1 record: {text!r}")
        record[name] = value
    return record


def upgrade(m: MigrationApi) -> None:
    if not m.exists("users"):
        return
    # Read first, then write: each put keeps the entry's own timestamp (prefix strategy).
    rows = list(m.items("users"))
    for done, (key, value) in enumerate(rows, start=1):
        if value.startswith(b"{"):
            continue  # already JSON (a re-run after a partial restore): nothing to change
        record = _parse_v1(value.decode())
        m.put("users", key, json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
        m.progress(done, len(rows))
    m.log.info("converted %d users records to JSON", len(rows))
