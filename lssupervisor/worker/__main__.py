"""``python -m lssupervisor.worker``: serve one request (see :mod:`lssupervisor.worker.main`)."""

from lssupervisor.worker.main import main

main()
