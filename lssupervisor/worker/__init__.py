"""The data plane: every LMDB operation runs in a worker process, never in the daemon.

``client`` and ``protocol`` are the daemon's side (no ``lmdb`` import); ``main`` and ``ops`` run in the
worker process (``python -m lssupervisor.worker``) with ``migrator``, ``marker``, ``lsheader`` and
``backup``. This ``__init__`` imports nothing, so that importing the client does not load LMDB.
"""
