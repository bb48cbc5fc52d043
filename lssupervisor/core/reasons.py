"""What the daemon tells operators: remedies worded for a running daemon, and shared phrases.

The worker reports a failure with a structured :class:`~lssupervisor.errors.Remedy`; the offline CLI
words it for a shell with the daemon stopped (:func:`lssupervisor.errors.offline_advice`), the daemon
words it here, for an operator whose daemon holds the lock (so `lssupervisor stamp` alone would refuse
with 75). docs/operations.md quotes these texts in its PARKED table.
"""

from __future__ import annotations

from lssupervisor.durations import human
from lssupervisor.errors import Remedy

UNMARKED_ADVICE = (
    "if its data is at schema version N: set schema.baseline: N and run `lssupervisor reload`, "
    "or stop lssupervisor, run `lssupervisor stamp N`, then start it"
)
FIX_WITH_STAMP_ADVICE = "fix it: stop lssupervisor, run `lssupervisor stamp N`, then start it"
RESUME = "run `lssupervisor resume`"


def daemon_advice(remedy: Remedy) -> str:
    match remedy:
        case Remedy.STAMP:
            return FIX_WITH_STAMP_ADVICE
        case Remedy.BASELINE_OR_STAMP:
            return UNMARKED_ADVICE


def with_advice(message: str, remedy: Remedy | None) -> str:
    """``message`` with the daemon's wording of ``remedy`` appended."""
    return message if remedy is None else f"{message}; {daemon_advice(remedy)}"


secs = human  # seconds for people, in reasons and log lines (a Go duration)
