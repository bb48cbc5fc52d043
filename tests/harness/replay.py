"""Replaying event histories through the pure core (honcho's ``tests/test_manager.py`` style).

A :class:`Replay` holds a :class:`~lssupervisor.core.lifecycle.Lifecycle` and its state; calling it
with an event and a literal time feeds the event through ``handle`` and keeps every action. The
shell's side (spawn results, worker results, exits) is played by feeding the result events by hand.
No processes, no clock, no sleeps.
"""

from __future__ import annotations

from lssupervisor.core.actions import Action, AnnounceState, LogLine
from lssupervisor.core.events import Event
from lssupervisor.core.lifecycle import Lifecycle
from lssupervisor.core.states import State, SupervisorState


class Replay:
    """Feeds a history through ``core``, keeping the state and every action."""

    def __init__(self, core: Lifecycle, st: SupervisorState | None = None) -> None:
        self.core = core
        self.st = st or SupervisorState()
        self.acts: list[Action] = []

    def __call__(self, ev: Event, now: float) -> list[Action]:
        """Feed ``ev`` at monotonic time ``now``; the actions it produced."""
        self.st, acts = self.core.handle(self.st, ev, now)
        self.acts.extend(acts)
        return acts

    def state(self) -> State:
        # A call, not an attribute: mypy would otherwise keep an earlier assert's narrowing.
        return self.st.state

    def states(self) -> list[tuple[str, str]]:
        """Every announced transition, (old, new)."""
        return [(a.old.value, a.new.value) for a in self.acts if isinstance(a, AnnounceState)]

    def announced(self) -> list[tuple[str, str | None]]:
        """Every announcement, (new state, sub-step or None)."""
        return [
            (a.new.value, a.substep.value if a.substep else None)
            for a in self.acts
            if isinstance(a, AnnounceState)
        ]

    def substeps(self) -> list[str]:
        """The RECONCILING sub-steps in order, as status and logs show them."""
        return [sub for new, sub in self.announced() if new == "RECONCILING" and sub is not None]

    def of(self, kind: type[Action]) -> list[Action]:
        return [a for a in self.acts if isinstance(a, kind)]

    def logged(self) -> str:
        return "\n".join(a.msg for a in self.acts if isinstance(a, LogLine))
