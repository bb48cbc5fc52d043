"""Delete inactive users and their index entries (tombstones, so peers learn of the deletion)."""

import json

VERSION = 2
STRATEGY = "prefix"


def upgrade(m):
    inactive = [key for key, value in m.items("users") if not json.loads(value).get("active", True)]
    for key in inactive:
        last = json.loads(m.get("users", key) or b"{}").get("last", "")
        m.delete("users", key)
        m.delete("users_by_last", last.lower().encode() + b"/" + key)
    m.log.info("deleted %d inactive users", len(inactive))
