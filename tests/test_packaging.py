"""The wheel and the sdist, built offline from a copy of the source tree (``--no-build-isolation``: the
dev venv's setuptools; no index), and the wheel installed into a clean venv with no checkout, where
``lssupervisor demo`` must run."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lssupervisor import __version__, resources

ROOT = Path(__file__).resolve().parent.parent
JUNK = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".*_cache", ".hypothesis",
    ".import_linter_cache", "demo-work",
)
# What the build adds to an sdist beyond the source files.
SDIST_GENERATED = {"PKG-INFO", "setup.cfg"}


def source_files() -> list[str] | None:
    """The tree as git sees it (tracked, and new files not ignored); None outside a git checkout (an
    unpacked sdist)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    return sorted(name for name in out.split("\0") if name and (ROOT / name).is_file())


def copy_tree(dest: Path) -> Path:
    """The source tree to build from, copied so that the build leaves nothing in the checkout (and two
    test workers never share a build/ directory)."""
    files = source_files()
    if files is None:
        shutil.copytree(ROOT, dest, ignore=JUNK, symlinks=True)
        return dest
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    return dest


def build(tmp: Path, what: str) -> Path:
    """Build ``wheel`` or ``sdist`` offline with setuptools' PEP 517 hooks (what pip and `python -m
    build` call). Returns the artifact."""
    src = copy_tree(tmp / "src")
    out = tmp / "dist"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; b.build_{what}({str(out)!r})"],
        cwd=src, check=True, capture_output=True, timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    (artifact,) = out.iterdir()
    return artifact


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build(tmp_path_factory.mktemp("wheel"), "wheel")


def test_the_wheel_ships_the_units_configs_and_demo_migrations(wheel: Path) -> None:
    assert wheel.name == f"lssupervisor-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name, (source, installed) in resources.SHIPPED.items():
            shipped = sorted(
                p.relative_to(ROOT / source) for p in (ROOT / source).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            )
            assert shipped, name
            for rel in shipped:
                member = f"lssupervisor/{installed}/{rel}"
                assert zf.read(member) == (ROOT / source / rel).read_bytes(), member
        assert "lssupervisor/_data/systemd/lssupervisor.service" in names
        assert "lssupervisor/_data/config/pdns/lssupervisor.yaml" in names
        assert "lssupervisor/_data/demo-migrations/0002_users_json.py" in names
        # Every module of the package, and nothing of the tree around it.
        modules = {
            str(p.relative_to(ROOT)) for p in (ROOT / "lssupervisor").rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert modules <= names
        assert "lssupervisor/py.typed" in names
        assert not [n for n in names if n.startswith(("tests/", "docs/", "examples/", "benchmarks/"))]
        dist_info = f"lssupervisor-{__version__}.dist-info"
        assert zf.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = email.message_from_bytes(zf.read(f"{dist_info}/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert meta["License-Expression"] == "MIT"
    assert "License" not in meta  # the deprecated free-text field is gone with the SPDX string
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    urls = sorted(f"{k}, {v}" for k, v in project["urls"].items())
    assert sorted(meta.get_all("Project-URL") or []) == urls
    assert meta.get_all("Classifier") == project["classifiers"]
    assert "lssupervisor = lssupervisor.cli.main:main" in entry_points
    assert "lightningstream-standin = lssupervisor.testing.standin:main" in entry_points


def test_the_mit_license_is_the_one_declared() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"


def test_the_sdist_is_the_whole_source_tree_and_builds_the_same_wheel(wheel: Path, tmp_path: Path) -> None:
    """The sdist ships tests/, so it must ship what they read (docs/, examples/, units, Makefile...):
    it is exactly the tree git has, plus the build's metadata. A wheel built from it is the wheel."""
    files = source_files()
    if files is None:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    sdist = build(tmp_path, "sdist")
    prefix = f"lssupervisor-{__version__}/"
    with tarfile.open(sdist) as tf:
        members = {m.name.removeprefix(prefix) for m in tf.getmembers() if m.isfile()}
        tf.extractall(tmp_path / "unpacked", filter="data")
    generated = {m for m in members if m in SDIST_GENERATED or m.startswith("lssupervisor.egg-info/")}
    assert members - generated == set(files)
    out = tmp_path / "from-sdist"
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; b.build_wheel({str(out)!r})"],
        cwd=tmp_path / "unpacked" / prefix, check=True, capture_output=True, timeout=300,
    )
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(next(out.iterdir())) as b:
        assert {i.filename: i.CRC for i in a.infolist() if not i.filename.endswith("RECORD")} == {
            i.filename: i.CRC for i in b.infolist() if not i.filename.endswith("RECORD")
        }


@pytest.mark.slow
def test_lssupervisor_demo_runs_from_the_wheel_in_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    """No checkout anywhere near: a new venv, the wheel installed into it, run from an empty directory.
    The dependencies come from the dev venv through a path entry (offline, and what pip would install);
    that venv's own lssupervisor (an editable install of the checkout) stays invisible, because its
    .pth files are not processed from a path entry."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )
    deps = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site / "dev-deps.pth").write_text(f"{deps}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    # LS by the demo's rule (lssupervisor/testing/lsbinary.py): $LIGHTNINGSTREAM_BIN, else lightningstream
    # on PATH, else the stand-in installed with the wheel.
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(venv / "bin" / "lssupervisor"), "files", "demo-migrations"],
        cwd=work, env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    assert where == str(site / "lssupervisor" / "_data" / "demo-migrations")
    proc = subprocess.run(
        [str(venv / "bin" / "lssupervisor"), "demo", "--dir", str(work / "demo")],
        cwd=work, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout


def test_files_names_every_shipped_directory(capsys: pytest.CaptureFixture[str]) -> None:
    from lssupervisor.cli.main import main

    assert main(["files"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(resources.SHIPPED)
    for line in lines:
        assert Path(line.split()[1]).is_dir()
    assert main(["files", "config"]) == 0
    assert (Path(capsys.readouterr().out.strip()) / "pdns" / "lssupervisor.yaml").is_file()
