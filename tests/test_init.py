"""lssupervisor init: a ready-to-run config set that loads, renders and keeps secrets out of files."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from lssupervisor.cli.main import main
from lssupervisor.config import load_config
from lssupervisor.errors import ExitCode, TemplateError
from lssupervisor.lsconfig.render import inspect_template, load_template, ls_environment, render

STANDIN = Path(sys.executable).parent / "lightningstream-standin"


def init(tmp_path: Path, *extra: str, storage: str | None = None, lmdb: Path | None = None) -> int:
    return main([
        "init", str(tmp_path / "set"),
        "--lmdb", str(lmdb or tmp_path / "db"),
        "--storage", storage or f"fs://{tmp_path}/snapshots",
        "--instance", "node-1",
        *extra,
    ])


def rendered(tmp_path: Path, version: int, env: dict[str, str] | None = None) -> tuple[str, object]:
    cfg = load_config(tmp_path / "set" / "lssupervisor.yaml")
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    r = render(template, version, ls_environment(cfg, version, env or {}))
    assert r.warnings == ()
    return r.text, r.view


def test_init_state_dir_for_the_systemd_units(tmp_path: Path) -> None:
    # The units' StateDirectory= is /var/lib/lssupervisor; /etc is read-only under ProtectSystem=strict.
    state = tmp_path / "var" / "lib" / "lssupervisor"
    assert init(tmp_path, "--lightningstream", "/opt/ls/lightningstream", "--state-dir", str(state)) == 0
    d = tmp_path / "set"
    names = sorted(p.name for p in d.iterdir())
    assert names == ["lightningstream.yaml.in", "lssupervisor.yaml", "migrations"]
    assert not state.exists()  # created by its owner (systemd's StateDirectory=, or the daemon)
    assert Path(load_config(d / "lssupervisor.yaml").state_dir) == state


def test_init_fs_writes_a_set_that_loads_and_renders(tmp_path: Path) -> None:
    assert init(tmp_path, "--lightningstream", "/opt/ls/lightningstream") == 0
    d = tmp_path / "set"
    assert sorted(p.name for p in d.iterdir()) == [
        "lightningstream.yaml.in", "lssupervisor.yaml", "migrations", "state"
    ]
    assert list((d / "migrations").iterdir()) == []
    assert stat.S_IMODE((d / "state").stat().st_mode) == 0o700
    cfg = load_config(d / "lssupervisor.yaml")
    assert cfg.lightningstream.binary == "/opt/ls/lightningstream"
    assert Path(cfg.state_dir) == d / "state"
    assert cfg.migrations.path == str(d / "migrations")
    assert cfg.lightningstream.env == {}
    text, view = rendered(tmp_path, 3)
    assert f'root_path: "{tmp_path}/snapshots/v3"' in text
    assert view.instance == "node-1"  # type: ignore[attr-defined]
    assert view.storage_type == "fs"  # type: ignore[attr-defined]
    assert view.storage_location == f"{tmp_path}/snapshots/v3"  # type: ignore[attr-defined]
    (spec,) = view.lmdbs  # type: ignore[attr-defined]
    assert (spec.name, spec.path, spec.no_subdir, spec.native) == ("main", str(tmp_path / "db"), False, True)
    assert view.http_address == ""  # type: ignore[attr-defined]


def test_init_s3_takes_credentials_from_the_environment_only(tmp_path: Path) -> None:
    url = "s3://ls-bucket/apps/dns?endpoint=http://127.0.0.1:9000&region=eu-west-1"
    assert init(tmp_path, storage=url) == 0
    d = tmp_path / "set"
    cfg = load_config(d / "lssupervisor.yaml")
    assert cfg.lightningstream.env == {}
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    with pytest.raises(TemplateError, match="AWS_ACCESS_KEY_ID"):
        render(template, 2, ls_environment(cfg, 2, {}))
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    text, view = rendered(tmp_path, 2, secrets)
    assert 'access_key: "${AWS_ACCESS_KEY_ID}"' in text
    assert 'secret_key: "${AWS_SECRET_ACCESS_KEY}"' in text
    assert 'global_prefix: "apps/dns/v2/"' in text
    assert 'endpoint_url: "http://127.0.0.1:9000"' in text and 'region: "eu-west-1"' in text
    assert view.storage_location == "ls-bucket/apps/dns/v2/"  # type: ignore[attr-defined]
    for path in d.rglob("*"):
        if path.is_file():
            assert "s3cr3t" not in path.read_text() and "AKIAEXAMPLE" not in path.read_text()


def test_init_s3_without_prefix_versions_the_whole_bucket_root(tmp_path: Path) -> None:
    assert init(tmp_path, storage="s3://b") == 0
    _, view = rendered(tmp_path, 4, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert view.storage_location == "b/v4/"  # type: ignore[attr-defined]


def test_init_options_shadow_http_and_file_lmdb(tmp_path: Path) -> None:
    lmdb_file = tmp_path / "pdns.lmdb"
    lmdb_file.write_bytes(b"")  # an existing file: a no_subdir LMDB like PowerDNS's
    assert init(tmp_path, "--shadow", "--ls-http", "127.0.0.1:8500", "--http", "", "--lmdb-name", "pdns",
                lmdb=lmdb_file) == 0
    cfg = load_config(tmp_path / "set" / "lssupervisor.yaml")
    assert cfg.http.address == ""
    _, view = rendered(tmp_path, 1)
    (spec,) = view.lmdbs  # type: ignore[attr-defined]
    assert (spec.name, spec.no_subdir, spec.native) == ("pdns", True, False)
    assert view.http_address == "127.0.0.1:8500"  # type: ignore[attr-defined]


def test_init_default_instance_is_the_sanitised_hostname(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "web_1.example.org")
    assert main(["init", str(tmp_path / "set"), "--lmdb", str(tmp_path / "db"),
                 "--storage", f"fs://{tmp_path}/s"]) == 0
    _, view = rendered(tmp_path, 1)
    assert view.instance == "web-1-example-org"  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["null", "yes", "off", "true", "0x10", "1e3"])
def test_init_instance_that_yaml_reads_as_another_type_stays_a_string(tmp_path: Path, name: str) -> None:
    """An instance (or host name) like ``null`` or ``yes`` written unquoted is YAML null/bool: LS would
    read null as "no instance" (and fall back to the host name), and the set would not render."""
    assert main(["init", str(tmp_path / "set"), "--lmdb", str(tmp_path / "db"),
                 "--storage", f"fs://{tmp_path}/s", "--instance", name]) == 0
    _, view = rendered(tmp_path, 1)
    assert view.instance == name  # type: ignore[attr-defined]


@pytest.mark.parametrize("lmdb_name", ["a: b", "$HOME", "x#y", ""])
def test_init_refuses_an_lmdb_name_that_does_not_survive_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lmdb_name: str
) -> None:
    argv = ["init", str(tmp_path / "set"), "--lmdb", str(tmp_path / "db"), "--storage",
            f"fs://{tmp_path}/s", "--instance", "n1", "--lmdb-name", lmdb_name]
    assert main(argv) == ExitCode.USAGE
    assert "--lmdb-name" in capsys.readouterr().err
    assert not (tmp_path / "set" / "lssupervisor.yaml").exists()


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path) == 0
    config = tmp_path / "set" / "lssupervisor.yaml"
    config.write_text(config.read_text() + "# local edit\n")
    capsys.readouterr()
    assert init(tmp_path) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; use --force" in err
    assert config.read_text().endswith("# local edit\n")
    assert init(tmp_path, "--force", "--http", "127.0.0.1:9999") == 0
    assert (tmp_path / "set" / "lssupervisor.yaml.prev").read_text().endswith("# local edit\n")
    assert load_config(config).http.address == "127.0.0.1:9999"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--storage", "fs://relative/dir"], "three slashes"),
        (["--storage", "gs://bucket"], "expected fs:///abs/dir or s3://"),
        (["--storage", "s3://b/p?endpoint=http://x&acl=private"], "unknown parameter 'acl'"),
        (["--instance", "web_1"], "letters, digits and '-'"),
        (["--lmdb", "/data/$HOME/db"], "'$' cannot be written"),
        (["--ls-http", "8500"], "expected host:port"),
    ],
)
def test_init_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    base = {"--lmdb": str(tmp_path / "db"), "--storage": f"fs://{tmp_path}/s", "--instance": "n1"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["init", str(tmp_path / "set")] + [x for kv in base.items() for x in kv]
    assert main(argv) in (ExitCode.USAGE, ExitCode.CONFIG)
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "set" / "lssupervisor.yaml").exists()


def test_init_without_lightningstream_on_path_writes_the_name_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert init(tmp_path) == 0
    assert load_config(tmp_path / "set" / "lssupervisor.yaml").lightningstream.binary == "lightningstream"
    assert "lightningstream is not on PATH" in capsys.readouterr().err


def test_init_finds_lightningstream_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "lightningstream"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    assert init(tmp_path) == 0
    assert load_config(tmp_path / "set" / "lssupervisor.yaml").lightningstream.binary == str(fake)


def test_init_comments_explain_and_keep_dollars_out_of_comments(tmp_path: Path) -> None:
    assert init(tmp_path, storage="s3://b/p") == 0
    text = (tmp_path / "set" / "lightningstream.yaml.in").read_text()
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 10
    assert not any("$" in line for line in comments)  # LS expands comments too


@pytest.mark.skipif(not STANDIN.exists(), reason="the LS stand-in console script is not installed")
def test_init_then_check_passes_with_the_standin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert init(tmp_path, "--lightningstream", str(STANDIN), "--ls-http", "127.0.0.1:0") == 0
    capsys.readouterr()
    assert main(["check", "-c", str(tmp_path / "set" / "lssupervisor.yaml")]) == 0
    out = capsys.readouterr().out
    assert "accepts the rendered config" in out
    assert re.search(r"check: 0 error\(s\)", out)
    cfg = load_config(tmp_path / "set" / "lssupervisor.yaml")
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = inspect_template(template, os.environ)
    assert view.lmdbs[0].path == str(tmp_path / "db")


def test_init_s3_credentials_with_yaml_special_characters_reach_ls_intact(tmp_path: Path) -> None:
    """LS expands ${VAR} in the text BEFORE parsing YAML: an unquoted secret with ' #' would be cut
    at the comment, a leading '*' read as an alias. init quotes the references."""
    import yaml

    from lssupervisor.lsconfig.render import go_expand_env

    url = "s3://ls-bucket/apps?endpoint=http://127.0.0.1:9000&region=eu-west-1"
    assert init(tmp_path, storage=url) == 0
    secrets = {"AWS_ACCESS_KEY_ID": "*AKIA", "AWS_SECRET_ACCESS_KEY": "ab #cd: &x"}
    text, _view = rendered(tmp_path, 2, secrets)
    options = yaml.safe_load(go_expand_env(text, secrets))["storage"]["options"]
    assert options["access_key"] == "*AKIA"
    assert options["secret_key"] == "ab #cd: &x"
