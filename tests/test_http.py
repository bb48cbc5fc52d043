"""The status HTTP server, served for real on 127.0.0.1 with an OS-chosen port."""

from __future__ import annotations

import copy
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lssupervisor.daemon.http import REDACTED, StatusServer, encode_status, readiness, redact
from lssupervisor.errors import ConfigError
from tests.harness import wait_for

SECRET = "s3cr3t-value-never-served"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def running_snapshot(**overrides: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "state": "RUNNING",
        "substate": None,
        "reason": None,
        "pid": 4321,
        "since": "2024-05-01T10:00:00+00:00",
        "lightningstream": {
            "pid": 4322,
            "restarts": 3,
            "failures_total": 2,
            "ready": True,
            "config": "/var/lib/lssupervisor/lightningstream.yaml",
            "started_at": "2024-05-01T10:00:05+00:00",
            "env": {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": SECRET, "REGION": "eu"},
        },
        "lmdbs": {
            "main": {"path": "/var/lib/powerdns/pdns.lmdb", "schema_version": 4},
            "shard": {"path": "/var/lib/powerdns/pdns.lmdb-0", "schema_version": None},
        },
        "target_version": 5,
        "paused": False,
        "migration": {
            "progress": None,
            "last_result": "ok",
            "last_duration_s": 12.5,
            "last_success_at": "2024-05-01T09:59:00+00:00",
        },
        "backups": {
            "count": 2,
            "last": {"id": "b1", "created_at": "2024-05-01T09:58:00+00:00", "size_bytes": 4096},
        },
        "updated_at": "2024-05-01T10:00:06+00:00",
    }
    snap.update(overrides)
    return snap


@pytest.fixture
def make_server() -> Iterator[Callable[..., StatusServer]]:
    servers: list[StatusServer] = []

    def make(**kwargs: Any) -> StatusServer:
        s = StatusServer("127.0.0.1", 0, **kwargs)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.stop()


def get(server: StatusServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def get_json(server: StatusServer, path: str) -> tuple[int, Any]:
    code, _, body = get(server, path)
    return code, json.loads(body)


def metrics(server: StatusServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    code, _, body = get(server, "/metrics")
    assert code == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_binds_port_zero_and_reports_address(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    host, port = s.address
    assert host == "127.0.0.1"
    assert port > 0
    code, _, _ = get(s, "/livez")
    assert code == 200


def test_livez_follows_heartbeat(make_server: Callable[..., StatusServer]) -> None:
    clock = FakeClock()
    s = make_server(clock=clock, liveness_timeout=10.0)
    code, doc = get_json(s, "/livez")
    assert (code, doc["alive"]) == (200, True)
    clock.now += 10.5
    code, doc = get_json(s, "/livez")
    assert code == 503
    assert doc["alive"] is False
    assert doc["loop_tick_age_s"] == pytest.approx(10.5)
    s.heartbeat()
    code, doc = get_json(s, "/livez")
    assert (code, doc["alive"]) == (200, True)


def test_livez_with_loop_tick_callable(make_server: Callable[..., StatusServer]) -> None:
    clock = FakeClock()
    last_tick = [clock.now]
    s = make_server(clock=clock, liveness_timeout=5.0, loop_tick=lambda: last_tick[0])
    clock.now += 4.0
    assert get(s, "/livez")[0] == 200
    clock.now += 2.0
    assert get(s, "/livez")[0] == 503
    last_tick[0] = clock.now
    assert get(s, "/livez")[0] == 200


@pytest.mark.parametrize(
    ("overrides", "reason_part"),
    [
        ({"state": "RECONCILING", "substate": "MIGRATING", "reason": "schema 4 -> 5"}, "MIGRATING"),
        ({"state": "PAUSED", "reason": "operator"}, "state PAUSED"),
        ({"state": "PARKED", "reason": "migration 0005 failed"}, "migration 0005 failed"),
        ({"state": "STARTING"}, "state STARTING"),
        ({"state": "BACKOFF", "reason": "LS exited 1"}, "BACKOFF"),
        ({"paused": True}, "paused"),
        ({"lightningstream": {"pid": 1, "restarts": 0, "ready": False}}, "Lightning Stream not ready"),
        ({"lightningstream": None}, "Lightning Stream not ready"),
    ],
)
def test_readyz_503_with_reason(
    make_server: Callable[..., StatusServer], overrides: dict[str, Any], reason_part: str
) -> None:
    s = make_server()
    s.publish(running_snapshot(**overrides))
    code, doc = get_json(s, "/readyz")
    assert code == 503
    assert doc["ready"] is False
    assert reason_part in doc["reason"]


def test_readyz_200_when_running_and_ls_ready(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    code, doc = get_json(s, "/readyz")
    assert (code, doc["reason"]) == (503, "no status published yet")
    s.publish(running_snapshot())
    code, doc = get_json(s, "/readyz")
    assert (code, doc) == (200, {"ready": True, "reason": None})


def test_readiness_function_directly() -> None:
    assert readiness(running_snapshot()) == (True, None)
    ok, why = readiness({"state": "RECONCILING", "substate": "BACKING_UP"})
    assert not ok
    assert why == "state RECONCILING (BACKING_UP)"


def test_status_is_exactly_the_encoded_snapshot(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    code, _ = get_json(s, "/status")
    assert code == 503
    snap = running_snapshot()
    s.publish(snap)
    code, headers, body = get(s, "/status")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert body == encode_status(snap)
    doc = json.loads(body)
    assert doc["state"] == "RUNNING"
    assert doc["lmdbs"]["main"]["schema_version"] == 4
    # Publishing copies: a later change to the daemon's dict is not served until published again.
    snap["state"] = "STOPPING"
    assert json.loads(get(s, "/status")[2])["state"] == "RUNNING"


def test_secrets_never_served(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    snap = running_snapshot()
    snap["hooks"] = [{"argv": ["notify", "https://bob:" + SECRET + "@hooks.example/x"]}]
    snap["storage"] = {"options": {"secret_key": SECRET, "password": {"nested": SECRET}}}
    s.publish(snap)
    for path in ("/status", "/metrics", "/readyz", "/livez"):
        body = get(s, path)[2]
        assert SECRET.encode() not in body, path
    doc = json.loads(get(s, "/status")[2])
    assert doc["lightningstream"]["env"] == {
        "AWS_SECRET_ACCESS_KEY": REDACTED,
        "AWS_ACCESS_KEY_ID": REDACTED,
        "REGION": "eu",
    }
    assert doc["hooks"][0]["argv"][1] == f"https://{REDACTED}@hooks.example/x"


def test_redact_rules() -> None:
    value = {
        "Token": "t",
        "api_token": None,  # unset stays visibly unset
        "password": "",
        "credentials": ["a", "b"],
        "key_id": 7,
        "keys": {"public": "fine"},
        "list": [{"client_secret": "x"}, "plain", ("tuple", {"PASSWORD": "p"})],
        "n": 3,
    }
    original = copy.deepcopy(value)
    assert redact(value) == {
        "Token": REDACTED,
        "api_token": None,
        "password": "",
        "credentials": REDACTED,
        "key_id": REDACTED,
        "keys": {"public": "fine"},
        "list": [{"client_secret": REDACTED}, "plain", ["tuple", {"PASSWORD": REDACTED}]],
        "n": 3,
    }
    assert value == original


def test_metrics_from_snapshot(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    m = metrics(s)
    assert m["lssupervisor_status_published"] == [({}, 0.0)]
    assert "lssupervisor_state" not in m
    s.publish(running_snapshot())
    m = metrics(s)
    states = {labels["state"]: v for labels, v in m["lssupervisor_state"]}
    assert states["RUNNING"] == 1.0
    assert sum(states.values()) == 1.0
    assert {"STARTING", "RECONCILING", "PARKED", "PAUSED", "STOPPED"} <= set(states)
    assert m["lssupervisor_schema_version"] == [({"lmdb": "main"}, 4.0)]  # null version: no sample
    assert m["lssupervisor_target_schema_version"] == [({}, 5.0)]
    assert m["lssupervisor_lightningstream_restarts_total"] == [({}, 3.0)]
    assert m["lssupervisor_lightningstream_failures_total"] == [({}, 2.0)]
    assert m["lssupervisor_lightningstream_up"] == [({}, 1.0)]
    assert m["lssupervisor_lightningstream_ready"] == [({}, 1.0)]
    assert m["lssupervisor_migration_duration_seconds"] == [({}, 12.5)]
    results = {labels["result"]: v for labels, v in m["lssupervisor_migration_last_result"]}
    assert results == {"ok": 1.0, "failed": 0.0, "cancelled": 0.0}
    assert m["lssupervisor_last_successful_migration_timestamp_seconds"] == [({}, 1714557540.0)]
    assert m["lssupervisor_backups"] == [({}, 2.0)]
    assert m["lssupervisor_last_backup_size_bytes"] == [({}, 4096.0)]
    assert m["lssupervisor_last_backup_timestamp_seconds"] == [({}, 1714557480.0)]
    assert m["lssupervisor_paused"] == [({}, 0.0)]
    assert m["lssupervisor_main_loop_tick_age_seconds"][0][1] >= 0.0
    assert "process_cpu_seconds_total" in m  # the private registry carries this process's metrics


def test_metrics_tolerate_sparse_snapshot(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    s.publish({"state": "RECONCILING", "substate": "MIGRATING", "lightningstream": {"pid": None}})
    m = metrics(s)
    assert {labels["substate"]: v for labels, v in m["lssupervisor_substate"]}["MIGRATING"] == 1.0
    assert m["lssupervisor_lightningstream_up"] == [({}, 0.0)]
    assert "lssupervisor_target_schema_version" not in m
    assert "lssupervisor_migration_last_result" not in m
    assert "lssupervisor_backups" not in m
    s.publish({"state": "SOMETHING_NEW", "migration": {"last_result": None}})
    m = metrics(s)
    states = {labels["state"]: v for labels, v in m["lssupervisor_state"]}
    assert states["SOMETHING_NEW"] == 1.0
    assert sum(v for _, v in m["lssupervisor_migration_last_result"]) == 0.0


def test_two_servers_have_private_registries(make_server: Callable[..., StatusServer]) -> None:
    a = make_server(process_metrics=False)
    b = make_server(process_metrics=False)
    a.publish(running_snapshot(target_version=7))
    b.publish(running_snapshot(target_version=9))
    assert metrics(a)["lssupervisor_target_schema_version"] == [({}, 7.0)]
    assert metrics(b)["lssupervisor_target_schema_version"] == [({}, 9.0)]


def test_openmetrics_when_asked(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    s.publish(running_snapshot())
    host, port = s.address
    req = urllib.request.Request(
        f"http://{host}:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().rstrip().endswith(b"# EOF")


def test_unknown_path_head_and_methods(make_server: Callable[..., StatusServer]) -> None:
    s = make_server()
    assert get(s, "/nope")[0] == 404
    code, headers, body = get(s, "/livez", method="HEAD")
    assert (code, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    code, headers, _ = get(s, "/status", method="POST")
    assert code == 405
    assert headers["Allow"] == "GET, HEAD"
    assert get(s, "/readyz?verbose=1")[0] == 503  # query strings are ignored


def test_port_in_use_is_a_config_error(make_server: Callable[..., StatusServer]) -> None:
    taken = make_server()
    _, port = taken.address
    other = StatusServer("127.0.0.1", port)
    with pytest.raises(ConfigError, match=rf"http.address 127.0.0.1:{port}: cannot listen"):
        other.start()
    other.stop()  # never started: a no-op


def test_ipv6_loopback(make_server: Callable[..., StatusServer]) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    s = StatusServer("::1", 0)
    s.start()
    try:
        host, port = s.address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/livez", timeout=5) as resp:
            assert resp.status == 200
    finally:
        s.stop()


def test_stop_joins_every_thread_even_with_a_stalled_client() -> None:
    before = set(threading.enumerate())
    s = StatusServer("127.0.0.1", 0, request_timeout=0.5)
    s.start()
    host, port = s.address
    stalled = socket.create_connection((host, port), timeout=5)
    try:
        # The stalled client owns a request thread; wait until it exists.
        wait_for(lambda: len(set(threading.enumerate()) - before) >= 2, what="the request thread")
        s.stop()  # returns (a hang would end in pytest-timeout) with the stalled client still open
    finally:
        stalled.close()
    assert set(threading.enumerate()) - before == set()
    s.stop()  # idempotent
