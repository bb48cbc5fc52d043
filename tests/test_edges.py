"""Clear errors at the edges (issue 13 rows 11, 12, 15).

- Row 11: an LMDB on a full filesystem. A write through LMDB's memory map that finds no free block
  kills the worker with SIGBUS; the error now says "no space left on <filesystem> holding <path>".
  Reproduced on a real 2 MiB tmpfs in a private mount namespace (skipped where that is not allowed).
- Row 12: an LMDB lssupervisor creates gets what LS would give it (1 GiB map, 0664/0775 before the
  umask), and the map-full hint extrapolates from the data the step wrote instead of only doubling.
- Row 15: the target file takes ASCII digits only; non-finite numbers and zero time limits are refused
  with the key's name.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from lssupervisor.config import load_config, resolve_target
from lssupervisor.errors import ConfigError, MapFull
from lssupervisor.lsmodel import LS_DEFAULT_MAP_SIZE
from lssupervisor.testing.fixtures import build_lmdb, read_values, run_migrations
from tests.harness.e2e import ConfigSet

REPO = Path(__file__).resolve().parent.parent


def write_migration(directory: Path, version: int, body: str) -> None:
    directory.mkdir(exist_ok=True)
    text = f'"""Step {version}."""\nVERSION = {version}\n\n\ndef upgrade(m):\n'
    text += textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
    (directory / f"{version:04d}_step{version}.py").write_text(text)


def clock() -> int:
    return 1_700_000_000_000_000_000


# ---------------------------------------------------------------------------------------------------
# Row 12: the map-full hint, and LS's defaults for an LMDB we create


def test_row12_map_full_hint_extrapolates_from_the_data_written(tmp_path: Path) -> None:
    """A step that rewrites every record 8x bigger: doubling the map would not do; the hint does."""
    data = {"users": {f"user{i:06d}": "x" * 100 for i in range(20000)}}
    spec = build_lmdb(tmp_path / "db", data, marker=0, map_size=4 << 20)
    mdir = tmp_path / "migrations"
    write_migration(mdir, 1, 'for k, v in m.items("users"):\n    m.put("users", k, v * 8)')
    with pytest.raises(MapFull) as info:
        run_migrations(spec, mdir, clock=clock)
    needed = info.value.needed_bytes
    assert needed is not None and needed > 2 * (4 << 20), "no better than doubling"
    assert "of 20000 of DBI 'users'" in str(info.value), str(info.value)
    # The estimate is enough: one step with the map it names, no second map-full.
    result = run_migrations(dataclasses.replace(spec, map_size=needed), mdir, clock=clock)
    assert read_values(spec)["users"][b"user000007"] == b"x" * 800
    assert result.steps[0].map_size == needed


def test_row12_grow_map_grows_once_to_the_estimate(tmp_path: Path) -> None:
    data = {"users": {f"user{i:06d}": "x" * 100 for i in range(20000)}}
    spec = build_lmdb(tmp_path / "db", data, marker=0, map_size=4 << 20)
    mdir = tmp_path / "migrations"
    write_migration(
        mdir,
        1,
        'n = 0\nfor k, v in m.items("users"):\n    m.put("users", k, v * 8)\n    n += 1\n'
        "    m.progress(n, 20000)",
    )
    with pytest.raises(MapFull) as info:
        run_migrations(spec, mdir, clock=clock)
    assert "done (m.progress)" in str(info.value)
    result = run_migrations(spec, mdir, clock=clock, grow_map=True)
    assert result.steps[0].map_size == info.value.needed_bytes  # grown once, to the estimate


def test_row12_an_lmdb_created_offline_gets_ls_defaults(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    shutil.rmtree(cs.lmdb)
    done = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "migrate", "-c", str(cs.config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
        umask=0o002,
    )
    assert done.returncode == 0, done.stderr
    env = lmdb.open(str(cs.lmdb), readonly=True, lock=False, max_dbs=4, map_size=0)  # 0: the file's
    try:
        assert env.info()["map_size"] == LS_DEFAULT_MAP_SIZE == 1 << 30
    finally:
        env.close()
    assert stat.S_IMODE(cs.lmdb.stat().st_mode) == 0o775
    assert stat.S_IMODE((cs.lmdb / "data.mdb").stat().st_mode) == 0o664


# ---------------------------------------------------------------------------------------------------
# Row 11: SIGBUS on a full filesystem


_FULL_DISK = r"""
set -e
mount -t tmpfs -o size=2m tmpfs "$TINY" || exit 77
"$PY" -m lssupervisor migrate -c "$CFG" --to 1 >/dev/null
set +e
"$PY" -m lssupervisor migrate -c "$CFG" 2>"$ERR"
echo "exit=$?"
"$PY" -c "
import sys
from lssupervisor.testing.fixtures import read_marker_version
from lssupervisor.lsmodel import LmdbSpec
print('marker=%s' % read_marker_version(LmdbSpec(name='main', path=sys.argv[1]), 'e2e'))
" "$TINY/db"
"""


def test_row11_sigbus_on_a_full_filesystem_names_it(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a tiny tmpfs in a private mount namespace")
    cs = ConfigSet(tmp_path)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (cs.template).write_text(cs.template.read_text().replace(str(cs.lmdb), str(tiny / "db")))
    write_migration(
        cs.migrations,
        2,
        'm.db("blob", create=True)\nfor i in range(3000):\n    m.put("blob", b"k%06d" % i, b"v" * 4000)',
    )  # ~12 MB into a 2 MiB filesystem
    err = tmp_path / "stderr"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _FULL_DISK],
        env={**os.environ, "TINY": str(tiny), "PY": sys.executable, "CFG": str(cs.config), "ERR": str(err)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    if proc.returncode == 77 or "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stderr = err.read_text()
    assert "exit=65" in proc.stdout or "exit=1" in proc.stdout, proc.stdout + stderr
    assert f"no space left on {tiny} (tmpfs tmpfs" in stderr, stderr
    assert f"holding {tiny / 'db'}" in stderr and "(worker killed by SIGBUS)" in stderr, stderr
    assert "marker=1" in proc.stdout, proc.stdout  # the LMDB stayed at v1: the step never committed


# ---------------------------------------------------------------------------------------------------
# Row 15: values refused with the key's name


@pytest.mark.parametrize("text", ["\u0663", "\u00b2", "3\u0663", "+3", " 3x", "-1", "3.0", "0x3"])
def test_row15_target_file_takes_ascii_digits_only(tmp_path: Path, text: str) -> None:
    target = tmp_path / "target"
    target.write_text(text + "\n", encoding="utf-8")
    cfg_path = tmp_path / "lssupervisor.yaml"
    cfg_path.write_text(f"schema:\n  target_file: {target}\n")
    with pytest.raises(ConfigError, match=r"schema.target_file must hold a version number \(ASCII digits\)"):
        resolve_target(load_config(cfg_path))


def test_row15_target_file_with_digits_is_the_target(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("0012\n")
    (tmp_path / "lssupervisor.yaml").write_text(f"schema:\n  target_file: {tmp_path / 'target'}\n")
    assert resolve_target(load_config(tmp_path / "lssupervisor.yaml")) == 12


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("restart:\n  multiplier: .nan", "restart.multiplier: expected a finite number, got nan"),
        ("restart:\n  multiplier: .inf", "restart.multiplier: expected a finite number, got inf"),
        ("restart:\n  jitter: .nan", "restart.jitter: expected a finite number, got nan"),
        ("hooks:\n  timeout: 0s", "hooks.timeout: must be greater than 0"),
        ("hooks:\n  timeout: .inf", "hooks.timeout: expected a non-negative duration, got inf"),
        ("lightningstream:\n  ready_timeout: 0s", "lightningstream.ready_timeout: must be greater than 0"),
        ("lightningstream:\n  drain_timeout: 0", "lightningstream.drain_timeout: must be greater than 0"),
        ("lightningstream:\n  stop_timeout: .nan", "lightningstream.stop_timeout: expected a non-negative"),
        ("migrations:\n  timeout: 0s", "migrations.timeout: must be greater than 0"),
    ],
)
def test_row15_non_finite_numbers_and_zero_time_limits_are_refused_by_name(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    cfg = tmp_path / "lssupervisor.yaml"
    cfg.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == f"{cfg}: {message}" or str(info.value).startswith(f"{cfg}: {message}"), str(
        info.value
    )
