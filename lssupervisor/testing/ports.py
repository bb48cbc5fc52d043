"""Loopback ports for tests that start servers (LS's ``http.address``, our status server).

"Bind port 0, read the number, close" is racy: between the close and the real bind, the kernel may
hand the same port to anyone else — an outgoing connection's local port (urllib in a neighbouring
test), or another test's port-0 bind — and the server under test then dies with "address already in
use". So ports are drawn from OUTSIDE the kernel's ephemeral range (which serves port-0 binds and
outgoing connections), from a slice of that space private to each pytest-xdist worker, and never
handed out twice by one process.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading

_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST = 10000  # below: well-known and commonly configured service ports
_lock = threading.Lock()
_given: set[int] = set()


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in open(_EPHEMERAL_RANGE).read().split())  # noqa: SIM115
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _pool() -> range:
    """The ports this process may use: outside the ephemeral range, this xdist worker's slice."""
    low, high = _ephemeral()
    start, stop = (_LOWEST, low) if low - _LOWEST >= 4000 else (high + 1, 65536)
    m = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    if m is None:
        return range(start, stop)
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(m.group(1)) + 1)
    size = (stop - start) // workers
    first = start + int(m.group(1)) * size
    return range(first, first + size)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that is free now and will not be handed out again by this process."""
    pool = _pool()
    with _lock:
        for _ in range(200):
            port = random.choice(pool)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    raise RuntimeError(f"no free loopback port found in {pool.start}-{pool.stop - 1}")
