"""health.py against a real HTTP server serving LS-shaped /healthz JSON (go-healthz's Status)."""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.config import OutputMode
from lssupervisor.daemon import health
from lssupervisor.daemon.child import spawn_ls, stop_ls
from lssupervisor.daemon.health import HealthPoller, HealthProbe, HealthResult, parse_address, readiness
from lssupervisor.errors import ConfigError
from tests.harness import free_port, wait_for
from tests.harness.real_ls import real_ls_binary


def ls_healthz(startup: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    """The body LS v1.0 serves (go-healthz Status): startup flags live in ``metadata``."""
    metadata: dict[str, Any] = {f"startup_{db}": done for db, done in startup.items()}
    metadata.update({"version": "v1.0.0", "hostname": "test", "go_version": "go1.22"})
    return {
        "ok": ok,
        "has_warnings": False,
        "status": "OK" if ok else "Unavailable",
        "time": "2024-01-01T00:00:00Z",
        "since": "2024-01-01T00:00:00Z",
        "runtime": {"arch": "amd64", "os": "linux", "version": "go1.22", "goroutines_count": 9},
        "failures": {} if ok else {"main_storage_list_failed_duration": "failed to list"},
        "warnings": {},
        "metadata": metadata,
    }


class FakeLs:
    """A tiny LS /healthz: what it answers is set by the test (thread-safe enough: one reference)."""

    def __init__(self) -> None:
        self.body: bytes = json.dumps(ls_healthz({"main": False})).encode()
        self.status = 200
        self.requests = 0
        # LS v1.0.0's wedged health checker: connections are accepted, requests never answered.
        self.wedged = threading.Event()
        self.release = threading.Event()  # set at teardown: no request thread is left behind
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests += 1
                if fake.wedged.is_set():
                    fake.release.wait(60)
                    self.close_connection = True
                    return
                if self.path != "/healthz":
                    self.send_error(404)
                    return
                body = fake.body
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # A short poll interval keeps shutdown() (and so each test) fast.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-ls-http"
        )

    def set(self, doc: Any, status: int = 200) -> None:
        self.body = json.dumps(doc).encode()
        self.status = status


@pytest.fixture
def fake_ls() -> Iterator[FakeLs]:
    fake = FakeLs()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()
    fake.thread.join(5)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (":8500", ("127.0.0.1", 8500)),
        ("0.0.0.0:8500", ("127.0.0.1", 8500)),
        ("127.0.0.1:8500", ("127.0.0.1", 8500)),
        ("[::1]:8500", ("::1", 8500)),
        ("[::]:8500", ("::1", 8500)),
        ("localhost:9000", ("localhost", 9000)),
        (":http", ("127.0.0.1", 80)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "8500", ":", "::1:8500", ":70000", "host:nope-not-a-service"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.address"):
        parse_address(address)


@pytest.mark.parametrize(
    ("doc", "dbs", "ready", "detail"),
    [
        (ls_healthz({"main": True}), ["main"], True, "startup complete for main"),
        (ls_healthz({"main": False}), ["main"], False, "startup pending for main"),
        (ls_healthz({"a": True, "b": False}), ["a", "b"], False, "startup pending for b"),
        (ls_healthz({"a": True, "b": True}), ["a", "b"], True, "startup complete for a, b"),
        (ls_healthz({"a": True}), ["a", "b"], False, "startup pending for b"),  # b's syncer not started
        # 503 with a storage failure after startup: still started; failures are LS's business.
        (ls_healthz({"main": True}, ok=False), ["main"], True, "startup complete for main"),
        ({"ok": True, "status": "OK"}, ["main"], False, "startup pending for main"),  # metadata omitted
        (ls_healthz({"main": "true"}), ["main"], False, "startup pending for main"),  # not a JSON true
        ([], ["main"], False, "healthz: expected a JSON object"),
        ({"metadata": []}, ["main"], False, "healthz: metadata is not an object"),
        ({"ok": True}, [], True, "healthz answered (no lmdbs to wait for)"),
    ],
)
def test_readiness(doc: Any, dbs: list[str], ready: bool, detail: str) -> None:
    result = readiness(doc, dbs)
    assert (result.ready, result.detail) == (ready, detail)
    assert not result.timed_out
    assert result.answered == detail.startswith(("startup", "healthz answered"))
    assert result.pending == (tuple(detail.removeprefix("startup pending for ").split(", "))
                              if detail.startswith("startup pending") else ())


def test_probe_against_server(fake_ls: FakeLs) -> None:
    probe = HealthProbe(f":{fake_ls.port}", ["main", "other"])
    fake_ls.set(ls_healthz({"main": False, "other": False}))
    assert probe.check() == HealthResult(
        False, "startup pending for main, other", answered=True, pending=("main", "other")
    )
    fake_ls.set(ls_healthz({"main": True, "other": False}))
    assert probe.check() == HealthResult(
        False, "startup pending for other", answered=True, pending=("other",)
    )
    fake_ls.set(ls_healthz({"main": True, "other": True}, ok=False), status=503)
    assert probe.check() == HealthResult(True, "startup complete for main, other", answered=True)


def test_probe_bad_answers(fake_ls: FakeLs) -> None:
    probe = HealthProbe(f"127.0.0.1:{fake_ls.port}", ["main"])
    fake_ls.set(ls_healthz({"main": True}), status=500)
    result = probe.check()
    assert not result.ready
    assert result.detail == f"healthz: HTTP 500 from 127.0.0.1:{fake_ls.port}"
    fake_ls.body = b"<html>not json"
    fake_ls.status = 200
    result = probe.check()
    assert not result.ready
    assert result.detail.startswith("healthz: invalid JSON")


def test_probe_connection_refused() -> None:
    port = free_port()  # nothing listens there
    result = HealthProbe(f":{port}", ["main"]).check()
    assert result == HealthResult(False, f"healthz: connection refused on 127.0.0.1:{port}")


def test_probe_times_out() -> None:
    # A socket that accepts (the kernel completes the handshake from the backlog) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        result = HealthProbe(f"127.0.0.1:{port}", ["main"], timeout=0.2).check()
    assert result == HealthResult(
        False, f"healthz: no answer from 127.0.0.1:{port} within 0.2s", timed_out=True
    )


def test_probe_ipv6(fake_ls: FakeLs) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with server6:
        port = server6.getsockname()[1]
        server6.close()  # now refused on ::1: proves we dialled ::1, not 127.0.0.1
        result = HealthProbe(f"[::1]:{port}", ["main"]).check()
    assert result == HealthResult(False, f"healthz: connection refused on ::1:{port}")


def test_poller_calls_on_ready_once(fake_ls: FakeLs) -> None:
    calls: list[int] = []
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["main"]), 4242, calls.append, interval=0.01)
    try:
        wait_for(lambda: fake_ls.requests >= 3, what="a few polls while not ready")
        assert calls == []
        last = poller.last
        assert last is not None
        assert last.detail == "startup pending for main"
        fake_ls.set(ls_healthz({"main": True}))
        wait_for(lambda: calls, what="on_ready")
        wait_for(lambda: not poller.running, what="poller thread to end after ready")
        requests = fake_ls.requests
        assert calls == [4242]
        assert fake_ls.requests == requests  # no polling after ready
    finally:
        poller.stop()
    assert not poller.running


def test_poller_stop_before_ready(fake_ls: FakeLs) -> None:
    calls: list[int] = []
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["main"]), 1, calls.append, interval=30)
    wait_for(lambda: poller.last is not None, what="first poll")
    poller.stop()  # cuts the 30 s interval short
    assert not poller.running
    poller.stop()  # idempotent
    assert calls == []


def test_poller_keeps_polling_while_refused() -> None:
    port = free_port()  # LS not listening yet
    calls: list[int] = []
    poller = HealthPoller(HealthProbe(f":{port}", ["main"]), 7, calls.append, interval=0.01)
    try:
        wait_for(lambda: poller.last is not None, what="first poll")
        assert poller.last == HealthResult(False, f"healthz: connection refused on 127.0.0.1:{port}")
        assert poller.running
    finally:
        poller.stop()
    assert calls == []
    assert not poller.running


def test_poller_survives_a_failing_callback(fake_ls: FakeLs) -> None:
    seen: list[int] = []

    def on_ready(pid: int) -> None:
        seen.append(pid)
        raise RuntimeError("queue closed")

    fake_ls.set(ls_healthz({"main": True}))
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["main"]), 7, on_ready, interval=0.01)
    wait_for(lambda: not poller.running, what="poller to end after ready")
    poller.stop()
    assert seen == [7]


def test_poller_not_started(fake_ls: FakeLs) -> None:
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["main"]), 1, lambda pid: None, start=False)
    assert not poller.running
    poller.stop()  # joining a never-started poller is fine


@pytest.fixture
def quick_wedge(monkeypatch: pytest.MonkeyPatch) -> float:
    """A wedge is concluded after 0.3 s of silence instead of 3 s (probes time out after 0.05 s)."""
    monkeypatch.setattr(health, "WEDGE_AFTER_S", 0.3)
    return 0.05


@pytest.mark.parametrize(
    ("last_answer", "dbs"),
    [({"main": False}, ["main"]), ({"a": True, "b": False}, ["a", "b"])],
    ids=["one-lmdb", "the-last-pending-of-two"],
)
def test_a_wedged_healthz_after_the_last_pending_lmdb_is_readiness(
    fake_ls: FakeLs, quick_wedge: float, last_answer: dict[str, bool], dbs: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """LS v1.0.0 deadlocks its health checker only on the evaluation that completes a startup; once
    /healthz answered with one LMDB pending, lasting silence means that LMDB completed."""
    fake_ls.set(ls_healthz(last_answer))
    calls: list[int] = []
    probe = HealthProbe(f":{fake_ls.port}", dbs, timeout=quick_wedge)
    poller = HealthPoller(probe, 9, calls.append, interval=0.01)
    try:
        wait_for(lambda: poller.last is not None and poller.last.answered, what="LS answered")
        fake_ls.wedged.set()
        wait_for(lambda: calls, what="readiness from the wedge")
        assert calls == [9]
        last = poller.last
        assert last is not None and last.ready
        assert "wedged" in last.detail
        assert any("deadlocked" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    finally:
        poller.stop()


def test_silence_with_two_lmdbs_pending_is_not_readiness(
    fake_ls: FakeLs, quick_wedge: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Two LMDBs pending at the last answer: the wedge proves one of them done, not both."""
    fake_ls.set(ls_healthz({"a": False, "b": False}))
    calls: list[int] = []
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["a", "b"], timeout=quick_wedge), 9, calls.append,
                          interval=0.01)
    try:
        wait_for(lambda: poller.last is not None and poller.last.answered, what="LS answered")
        fake_ls.wedged.set()
        wait_for(lambda: any("cannot say which LMDB" in r.getMessage() for r in caplog.records),
                 what="the warning that readiness waits for ready_timeout")
        assert calls == []
        assert poller.running
    finally:
        poller.stop()


def test_silence_before_any_answer_is_a_slow_start(fake_ls: FakeLs, quick_wedge: float) -> None:
    """A /healthz that never answered is a slow LS, not the wedge: no readiness from silence."""
    fake_ls.wedged.set()
    calls: list[int] = []
    poller = HealthPoller(HealthProbe(f":{fake_ls.port}", ["main"], timeout=quick_wedge), 9, calls.append,
                          interval=0.01)
    try:
        # 0.05 s per probe: 20 unanswered probes are a second of silence, three times the wedge limit.
        wait_for(lambda: fake_ls.requests >= 20, what="probes going unanswered")
        assert calls == []
        last = poller.last
        assert last is not None and last.timed_out and not last.ready
    finally:
        poller.stop()


def _ls_argv(which: str, config: Path) -> list[str]:
    if which == "standin":
        return [sys.executable, "-m", "lssupervisor.testing.standin", "--config", str(config), "sync"]
    return [real_ls_binary(), "--config", str(config), "sync"]


@pytest.mark.parametrize("which", ["standin", pytest.param("real", marks=pytest.mark.real_ls)])
def test_poller_against_ls(tmp_path: Path, which: str) -> None:
    """The real shape, from the LS stand-in (or real LS): not ready until startup_main flips, then
    on_ready once; the stop is by group and LS's exit is -15 (no signal handler)."""
    port = free_port()
    config = tmp_path / "ls.yaml"
    config.write_text(
        "instance: a\n"
        f"lmdbs:\n  main:\n    path: {tmp_path / 'lmdb'}\n    options: {{create: true, map_size: 16MB}}\n"
        f"storage:\n  type: fs\n  options:\n    root_path: {tmp_path / 'store'}\n"
        "lmdb_poll_interval: 100ms\nstorage_poll_interval: 100ms\n"
        f"http:\n  address: :{port}\n"
    )
    probe = HealthProbe(f":{port}", ["main"])
    assert probe.check() == HealthResult(False, f"healthz: connection refused on 127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSSTANDIN_")}
    env["LSSTANDIN_HEALTH_INTERVAL_MS"] = "50"
    argv = _ls_argv(which, config)
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    child = spawn_ls(argv, env, output=OutputMode.PREFIX, cwd=tmp_path, on_line=lambda line: None)
    try:
        poller = HealthPoller(probe, child.pid, events.put_nowait, interval=0.02)
        try:
            assert events.get(timeout=20) == child.pid  # real LS evaluates startup once a second
            wait_for(lambda: not poller.running, what="poller to end")
            assert events.empty()
            assert poller.last == HealthResult(True, "startup complete for main", answered=True)
        finally:
            poller.stop()
        # Another db name never becomes ready: LS has no such syncer.
        assert HealthProbe(f":{port}", ["main", "other"]).check() == HealthResult(
            False, "startup pending for other", answered=True, pending=("other",)
        )
    finally:
        result = stop_ls(child, timeout=5)
        assert child.join_output(5)
    assert (result.returncode, result.killed) == (-15, False)
