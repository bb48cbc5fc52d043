"""The ``lssupervisor`` command line: one module per command family, dispatched by :mod:`.main`."""

from lssupervisor.cli.main import main

__all__ = ["main"]
