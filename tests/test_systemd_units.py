"""The systemd units, checked with the real systemd-analyze (never by booting systemd).

``systemd-analyze verify`` insists that ExecStart= names an existing executable. The units say
``ExecStart=lssupervisor ...`` (a bare name, looked up in systemd's fixed search path), and lssupervisor
is not installed there on a test machine, so the unit is copied to tmp_path with ONLY that name replaced
by a stub script; the test asserts that nothing else changed. ``--root=`` does not help: verify then
needs a whole systemd unit tree (sysinit.target...) under the root. verify exits 0 even for unknown keys
or bad values (it only warns), so any output about the unit counts as a failure.

What ``lssupervisor install-units`` writes (the units, and the ExecStart= drop-in for an installation
systemd would not find) is verified as it is, unpatched: verify reads drop-ins beside the unit file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lssupervisor.cli.files import DROPIN_NAME, install_units
from lssupervisor.config import LightningStreamConfig
from lssupervisor.errors import ExitCode, UsageError

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = {
    "lssupervisor.service": "lssupervisor.service",
    "lssupervisor@.service": "lssupervisor@demo.service",  # verify a template through an instance
}
INSTALLED_BINARY = "lssupervisor"  # a bare name: systemd >= 239 looks it up in its fixed search path
MAX_EXPOSURE = 2.0
FAIL_CLOSED = {ExitCode.CONFIG, ExitCode.MIGRATION, ExitCode.PARKED, ExitCode.TOO_NEW, ExitCode.LS_RUNNING}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (package systemd)"
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned (systemd allows repeating keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD_DIR / name).read_text())["Service"]


def one(svc: dict[str, list[str]], key: str) -> str:
    values = svc[key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span like 90s, 10min, 1min 30s into seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def verifiable_copy(tmp_path: Path, source: str, target: str) -> Path:
    stub = tmp_path / "bin" / "lssupervisor"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    original = (SYSTEMD_DIR / source).read_text()
    patched = original.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stub} ")
    changed = [
        (a, b) for a, b in zip(original.splitlines(), patched.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and changed[0][0].startswith("ExecStart="), changed
    dest = tmp_path / target
    dest.write_text(patched)
    return dest


@needs_analyze
@pytest.mark.parametrize(("source", "target"), UNITS.items())
def test_systemd_analyze_verify_is_clean(tmp_path: Path, source: str, target: str) -> None:
    unit = verifiable_copy(tmp_path, source, target)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert output == "", output


@needs_analyze
def test_verify_does_report_a_broken_unit(tmp_path: Path) -> None:
    # Guards the test above: verify warns (exit 0) on a bad value, so silence must mean something.
    unit = verifiable_copy(tmp_path, "lssupervisor.service", "lssupervisor.service")
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    assert "notifyy" in proc.stdout + proc.stderr


@needs_analyze
@pytest.mark.parametrize(("source", "target"), UNITS.items())
def test_security_exposure_is_low(tmp_path: Path, source: str, target: str) -> None:
    unit = tmp_path / target
    shutil.copy(SYSTEMD_DIR / source, unit)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


@pytest.mark.parametrize("name", UNITS)
def test_lifecycle_settings(name: str) -> None:
    svc = service(name)
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert one(svc, "KillMode") == "mixed"
    assert one(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(svc, "ExecStart").startswith(f"{INSTALLED_BINARY} run -c /etc/lssupervisor/")
    assert one(svc, "Restart") == "on-failure"
    prevented = {int(v) for v in one(svc, "RestartPreventExitStatus").split()}
    assert prevented == {int(c) for c in FAIL_CLOSED}
    assert int(ExitCode.LOCKED) not in prevented  # another supervisor may go away: retry


@pytest.mark.parametrize("name", UNITS)
def test_timeouts_match_config_defaults(name: str) -> None:
    svc = service(name)
    ls = LightningStreamConfig()
    stop = seconds(one(svc, "TimeoutStopSec"))
    # Stopping LS must fit, plus cancelling a drain in flight, with margin for the proof and state.
    assert stop >= ls.stop_timeout + ls.drain_timeout + 10
    start = seconds(one(svc, "TimeoutStartSec"))
    assert start >= ls.stop_timeout + ls.drain_timeout + ls.ready_timeout
    watchdog = seconds(one(svc, "WatchdogSec"))
    # The loop wakes at least every ~1s and pings at half the period; leave room for a slow tick.
    assert 10 <= watchdog <= stop


@pytest.mark.parametrize("name", UNITS)
def test_hardening_settings(name: str) -> None:
    svc = service(name)
    expected = {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "UMask": "0077",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert one(svc, key) == value, key
    assert "@system-service" in svc["SystemCallFilter"]
    assert "RemoveIPC" not in svc  # would delete the application's IPC objects (same user)
    assert "ProcSubset" not in svc  # psutil needs /proc/stat (boot time) for process create times
    assert svc["ReadWritePaths"], "the LMDB directory must be writable under ProtectSystem=strict"
    assert one(svc, "User") and one(svc, "Group")


def test_template_differs_only_in_instance_settings() -> None:
    plain = parse_unit((SYSTEMD_DIR / "lssupervisor.service").read_text())
    templ = parse_unit((SYSTEMD_DIR / "lssupervisor@.service").read_text())
    instance_keys = {
        "Description", "ExecStart", "User", "Group", "StateDirectory", "RuntimeDirectory", "ReadWritePaths"
    }
    for section in plain.keys() | templ.keys():
        a, b = plain.get(section, {}), templ.get(section, {})
        for key in a.keys() | b.keys():
            if key in instance_keys:
                assert any("%i" in v for v in b[key]), f"{section}.{key} should use the instance"
            else:
                assert a.get(key) == b.get(key), f"{section}.{key} differs between the units"
    assert one(templ["Service"], "ExecStart").endswith("-c /etc/lssupervisor/%i.yaml")
    assert one(templ["Service"], "StateDirectory") == "lssupervisor/%i"


def stub_executable(tmp_path: Path) -> Path:
    stub = tmp_path / "venv" / "bin" / "lssupervisor"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def test_install_units_adds_a_drop_in_when_systemd_would_not_find_us(tmp_path: Path) -> None:
    stub = stub_executable(tmp_path)
    units = tmp_path / "units"
    lines = install_units(units, executable=stub, search_path=())
    for name in UNITS:
        assert (units / name).read_text() == (SYSTEMD_DIR / name).read_text()  # never edited
        assert (units / name).stat().st_mode & 0o777 == 0o644
        dropin = parse_unit((units / f"{name}.d" / DROPIN_NAME).read_text())["Service"]
        assert dropin["ExecStart"] == ["", f"{stub} {one(service(name), 'ExecStart').split(' ', 1)[1]}"]
    assert f"wrote {units / 'lssupervisor.service'}" in lines
    # Idempotent: a second run changes nothing.
    again = install_units(units, executable=stub, search_path=())
    assert again and all(line.startswith("unchanged ") for line in again)


def test_install_units_needs_no_drop_in_when_systemd_finds_us(tmp_path: Path) -> None:
    stub = stub_executable(tmp_path)
    on_path = tmp_path / "usr-local-bin"
    on_path.mkdir()
    (on_path / "lssupervisor").symlink_to(stub)
    units = tmp_path / "units"
    install_units(units, executable=stub, search_path=())  # first without: a drop-in
    lines = install_units(units, executable=stub, search_path=(str(on_path),))
    assert not (units / "lssupervisor.service.d" / DROPIN_NAME).exists()  # ours, removed
    assert f"removed {units / 'lssupervisor.service.d' / DROPIN_NAME}" in lines


def test_install_units_keeps_a_changed_unit_unless_forced(tmp_path: Path) -> None:
    stub = stub_executable(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    (units / "lssupervisor.service").write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(UsageError, match="exists and differs from the shipped file; pass --force"):
        install_units(units, executable=stub, search_path=())
    install_units(units, executable=stub, search_path=(), force=True)
    assert (units / "lssupervisor.service").read_text() == (SYSTEMD_DIR / "lssupervisor.service").read_text()


@needs_analyze
@pytest.mark.parametrize(("source", "target"), UNITS.items())
def test_installed_units_with_their_drop_in_verify_clean(tmp_path: Path, source: str, target: str) -> None:
    stub = stub_executable(tmp_path)
    units = tmp_path / "units"
    install_units(units, executable=stub, search_path=())
    if target != source:  # verify a template through an instance, its drop-in directory with it
        (units / target).symlink_to(units / source)
        (units / f"{target}.d").symlink_to(units / f"{source}.d")
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(units / target)],
        capture_output=True, text=True, timeout=60, cwd=units, check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and output == "", output
