"""Baseline: the users DBI holds one record per key as text, name=Alice;email=a@x.

Version 1 of the demo application. An empty LMDB is stamped at the newest version without running
anything, so this step only runs for an LMDB that already holds data and was stamped at 0: it makes
sure the ``users`` DBI exists (the application creates it on its first write anyway).
"""

from lssupervisor.migrator import MigrationApi

VERSION = 1
STRATEGY = "prefix"


def upgrade(m: MigrationApi) -> None:
    m.db("users", create=True)
