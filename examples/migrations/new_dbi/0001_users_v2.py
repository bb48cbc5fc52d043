"""Move users from "name,email" CSV values in DBI users to JSON values in the new DBI users_v2.

STRATEGY new-dbi: the storage prefix stays; old application versions keep reading and writing
"users", new ones use "users_v2". The step may only write DBIs that did not exist before it, and the
copies keep the timestamps of their sources.
"""

import json

VERSION = 1
STRATEGY = "new-dbi"


def to_json(key, value):
    name, _, email = value.decode().partition(",")
    if not email:
        return None  # a broken record is not carried over
    return key, json.dumps({"name": name, "email": email}, sort_keys=True).encode()


def upgrade(m):
    copied = m.copy_dbi("users", "users_v2", to_json)
    m.log.info("copied %d users", copied)
