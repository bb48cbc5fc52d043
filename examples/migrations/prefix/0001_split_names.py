"""Split users' "name" into "first" and "last", and index users by last name.

STRATEGY prefix: the LS storage prefix carries the schema version, so the migrated data goes to a new,
empty prefix. Rewritten entries keep their timestamps and the derived index entries take the timestamp
of the user they come from: instances that migrate later produce the very same entries, and LS merges
them by the real time of each change.
"""

import json

VERSION = 1
STRATEGY = "prefix"


def upgrade(m):
    for key, value in m.items("users"):
        user = json.loads(value)
        if "name" not in user:
            continue  # already in the new shape
        first, _, last = user.pop("name").partition(" ")
        user["first"], user["last"] = first, last
        m.put("users", key, json.dumps(user, sort_keys=True).encode())
        # A derived key: it gets the timestamp of the current source entry (this user).
        m.put("users_by_last", last.lower().encode() + b"/" + key, b"")
