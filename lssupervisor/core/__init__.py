"""The pure core: states, events, actions, the restart policy and the state machines.

Nothing here does I/O, reads a clock or starts a process: time and randomness are passed in, and the
daemon (:mod:`lssupervisor.daemon`) executes the actions the core returns. A test in the suite checks
that this package imports only the standard library's pure modules and itself.
"""
