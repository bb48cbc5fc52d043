"""Test ports come from outside the ephemeral range, from the worker's own slice, never twice."""

from __future__ import annotations

import socket

import pytest

from lssupervisor.testing import ports


def test_ports_are_outside_the_ephemeral_range_and_unique() -> None:
    low, high = ports._ephemeral()
    got = [ports.free_port() for _ in range(50)]
    assert len(set(got)) == 50
    assert all(not low <= p <= high for p in got)
    for p in got:  # free when handed out
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@pytest.mark.parametrize("worker", ["gw0", "gw1"])
def test_xdist_workers_get_disjoint_slices(worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    first = ports._pool()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    second = ports._pool()
    assert first.stop <= second.start and len(first) > 1000 and len(second) > 1000
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    assert ports.free_port() in (first if worker == "gw0" else second)
