"""A faithful Lightning Stream v1.0 stand-in (docs/standin.md): ``python -m lssupervisor.testing.standin``
or the ``lightningstream-standin`` console script."""

from lssupervisor.testing.standin.cli import main

__all__ = ["main"]
