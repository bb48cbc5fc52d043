"""Lower-case every user's email address, in place.

STRATEGY in-place: same storage prefix, same DBI. Every rewritten entry gets a fresh timestamp
(above its old one), or Lightning Stream would load its own older snapshot at the next start, see equal
timestamps and keep the lower (old) value: the migration would be silently reverted. The price: the
rewrite wins over concurrent edits of the same key made elsewhere before it.
"""

import json

VERSION = 1
STRATEGY = "in-place"


def upgrade(m):
    total = m.txn.stat(m.db("users"))["entries"]
    for done, (key, value) in enumerate(m.items("users"), start=1):
        user = json.loads(value)
        email = user.get("email", "")
        if email != email.lower():
            user["email"] = email.lower()
            m.put("users", key, json.dumps(user, sort_keys=True).encode())
        m.progress(done, total)
