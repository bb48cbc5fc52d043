"""The public API for migration files and their tests: ``from lssupervisor.migrator import MigrationApi``.

Migration authors type ``upgrade(m: MigrationApi)`` and read :class:`Progress` in their tests; those
names are a promise kept across releases. The implementation lives in the worker plane
(:mod:`lssupervisor.worker.migrator`), which is free to move: this module only re-exports. Only the
worker process imports it (it loads ``lmdb``); the daemon never does.
"""

from lssupervisor.worker.migrator import (
    Cancel,
    MigrateResult,
    MigrationApi,
    Progress,
    ProgressFn,
    RawCursor,
    RawTxn,
    StepResult,
)

__all__ = [
    "Cancel",
    "MigrateResult",
    "MigrationApi",
    "Progress",
    "ProgressFn",
    "RawCursor",
    "RawTxn",
    "StepResult",
]
