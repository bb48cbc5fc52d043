"""The daemon: the imperative shell around :mod:`lssupervisor.core`.

It owns the LS child, signals, files, the HTTP server and systemd notifications, and runs every LMDB
operation in a worker process (:mod:`lssupervisor.worker.client`). It never imports ``lmdb``: a test and
an import contract guard that boundary.
"""
